"""A defense table's `model` string, parsed once into a ModelRef.

    "default"                               the cached default model of the dataset and role
    "optimal"                               RDC's closed-form optimal model (no weights)
    "path/to/folder"                        a checkpoint folder (model.safetensors + config.json)
    "edm:path/to/file.pkl"                  an NVlabs EDM pickle, configured by the file itself
    "edm:PRESET:path/to/file.pt"            a state dict of an EDM preset (the RDC authors' files)
    "robustbench:ARCH:path/to/file.pt"      a RobustBench state dict of a classifier preset

The specs hold a ModelRef (`ModelRefField`): parsed from the string when a table is validated,
written back as the same string when a spec is dumped, so hashes and plan.json see the text the
job file has. Which presets exist and whether the files fit is the models' business
(pipeline.models.check, run by the preflight); here only the shape of the string is checked,
so that a job parses where its files are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

from pipeline.errors import ConfigError

PUBLISHED = ("edm", "robustbench")
WORDS = ("default", "optimal")
KINDS = ("default", "optimal", "folder", *PUBLISHED)


@dataclass(frozen=True)
class ModelRef:
    """kind: "default", "optimal", "folder", "edm" or "robustbench"; path: the folder or file;
    preset: the architecture preset of an edm or robustbench file, where given."""

    kind: str
    path: str | None = None
    preset: str | None = None

    def __str__(self) -> str:
        """The reference as a job file writes it: parse_model_ref(str(ref)) == ref."""
        if self.kind in WORDS:
            return self.kind
        if self.kind == "folder":
            return self.path
        return ":".join(p for p in (self.kind, self.preset, self.path) if p is not None)

    @property
    def published(self) -> bool:
        """Whether it names a published file that is imported in memory (edm:, robustbench:)."""
        return self.kind in PUBLISHED

    @property
    def format(self) -> str | None:
        """The import format of a published file: edm-pkl, edm-pt or robustbench."""
        if self.kind == "robustbench":
            return "robustbench"
        if self.kind == "edm":
            return "edm-pkl" if self.path.endswith(".pkl") else "edm-pt"
        return None

    def missing(self) -> str | None:
        """What a user must fix if the file or folder this names is not there, else None."""
        if self.kind in WORDS:
            return None
        path = Path(self.path)
        if self.kind == "folder":
            if not (path / "config.json").is_file():
                return (f"checkpoint folder {path} not found (no {path / 'config.json'}); train or import a model "
                        "there (`robustsweep import-model`) or change `model`")
            return None
        if not path.is_file():
            return f"model file {path} not found; download it (docs/models.md, 'Evaluate a published model') or change `model`"
        return None


def parse_model_ref(spec: str) -> ModelRef:
    """Parse a `model` string; ConfigError names what is wrong with it."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"model must be a non-empty string, got {spec!r}")
    if spec in WORDS:
        return ModelRef(spec)
    kind, colon, rest = spec.partition(":")
    if colon and kind in PUBLISHED:
        return _PUBLISHED_PARSERS[kind](spec, rest)
    if colon and kind.isalpha() and len(kind) > 1 and not rest.startswith("//"):
        raise ConfigError(f"model {spec!r}: unknown prefix {kind!r}; expected edm:, robustbench:, "
                          "'default', 'optimal' or a checkpoint folder")
    return ModelRef("folder", spec)


def _preset_and_path(rest: str) -> tuple[str | None, str]:
    """"PRESET:PATH" -> (PRESET, PATH); "PATH" -> (None, PATH)."""
    if ":" in rest:
        preset, _, path = rest.partition(":")
        return preset, path
    return None, rest


def _parse_edm(spec: str, rest: str) -> ModelRef:
    preset, path = _preset_and_path(rest)
    if not path or preset == "":
        raise ConfigError(f"model {spec!r}: expected edm:PATH or edm:PRESET:PATH")
    if preset is None and not path.endswith(".pkl"):
        raise ConfigError(f"model {spec!r}: a state dict (.pt) carries no configuration; write edm:PRESET:PATH "
                          "(PRESET e.g. rdc-cifar10-cond-edm)")
    return ModelRef("edm", path, preset)


def _parse_robustbench(spec: str, rest: str) -> ModelRef:
    preset, path = _preset_and_path(rest)
    if not path or preset == "":
        raise ConfigError(f"model {spec!r}: expected robustbench:ARCH:PATH")
    if preset is None:
        raise ConfigError(f"model {spec!r}: a RobustBench file needs an architecture: robustbench:ARCH:PATH "
                          "(ARCH e.g. wrn-28-10)")
    return ModelRef("robustbench", path, preset)


# One parser per published prefix: a new form of a prefix is a change to its parser alone.
_PUBLISHED_PARSERS = {"edm": _parse_edm, "robustbench": _parse_robustbench}


def _validate(value: Any) -> ModelRef:
    if isinstance(value, ModelRef):
        return value
    try:
        return parse_model_ref(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


# The type of a spec's `model` field: a ModelRef in Python, the job file's string when dumped.
ModelRefField = Annotated[ModelRef, PlainValidator(_validate), PlainSerializer(str, return_type=str),
                          WithJsonSchema({"type": "string"})]


__all__ = ["ModelRef", "ModelRefField", "parse_model_ref", "PUBLISHED", "WORDS", "KINDS"]
