"""A defense table's `model` string, parsed once into a ModelRef.

    "default"                               the cached default model of the dataset and role
    "optimal"                               RDC's closed-form optimal model (no weights)
    "path/to/folder"                        a checkpoint folder (model.safetensors + config.json)
    "edm:path/to/file.pkl"                  an NVlabs EDM pickle, configured by the file itself
    "edm:PRESET:path/to/file.pt"            a state dict of an EDM preset (the RDC authors' files)
    "robustbench:ARCH:path/to/file.pt"      a RobustBench state dict of a classifier preset
    "robustbench:THREAT/NAME"               RobustBench's zoo entry NAME (THREAT: Linf or L2) of the
                                            defense's dataset, where RobustBench's loader keeps it:
                                            {$ROBUSTBENCH_MODELS or ./models}/{dataset}/{THREAT}/{NAME}.pt
    "robustbench:THREAT/NAME:path/to/file.pt"   the same entry, from that file

The specs hold a ModelRef (`ModelRefField`): parsed from the string when a table is validated,
written back as the same string when a spec is dumped, so hashes and plan.json see the text the
job file has. Which presets exist and whether the files fit is the models' business
(pipeline.models.check, run by the preflight); here only the shape of the string is checked,
so that a job parses where its files are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
import os
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

from pipeline.errors import ConfigError

PUBLISHED = ("edm", "robustbench")
WORDS = ("default", "optimal")
KINDS = ("default", "optimal", "folder", *PUBLISHED)
# RobustBench's threat models with a zoo here, and where its loader keeps the files.
ZOO_THREATS = ("Linf", "L2")
ZOO_ENV = "ROBUSTBENCH_MODELS"


@dataclass(frozen=True)
class ModelRef:
    """kind: "default", "optimal", "folder", "edm" or "robustbench"; path: the folder or file;
    preset: the architecture preset of an edm or robustbench file, where given; threat and
    name: a RobustBench zoo entry (path None: where RobustBench keeps it, see `zoo_path`)."""

    kind: str
    path: str | None = None
    preset: str | None = None
    threat: str | None = None
    name: str | None = None

    @property
    def zoo(self) -> bool:
        """Whether this names an entry of RobustBench's zoo."""
        return self.name is not None

    def zoo_path(self, dataset: str) -> Path:
        """The file of a zoo entry: the given path, else RobustBench's place for it."""
        if self.path is not None:
            return Path(self.path)
        return Path(os.environ.get(ZOO_ENV) or "models") / dataset / self.threat / f"{self.name}.pt"

    def __str__(self) -> str:
        """The reference as a job file writes it: parse_model_ref(str(ref)) == ref."""
        if self.kind in WORDS:
            return self.kind
        if self.kind == "folder":
            return self.path
        if self.zoo:
            return ":".join(p for p in (self.kind, f"{self.threat}/{self.name}", self.path) if p is not None)
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

    @property
    def label(self) -> str | None:
        """What a default defense name says of the model: the file's stem (Wong2020Fast,
        edm-cifar10-32x32-cond-vp) or the folder's name, in name-safe characters; None for
        "default" and "optimal", which the defense kind already names."""
        if self.kind in WORDS:
            return None
        if self.zoo and self.path is None:
            return self.name
        path = PurePosixPath(self.path.replace("\\", "/").rstrip("/"))
        stem = path.name if self.kind == "folder" else path.stem
        return re.sub(r"[^A-Za-z0-9_.+-]+", "-", stem).strip("-.") or self.kind

    def missing(self, dataset: str | None = None) -> str | None:
        """What a user must fix if the file or folder this names is not there, else None (a zoo
        entry without a path needs the dataset that places it)."""
        if self.kind in WORDS:
            return None
        if self.zoo:
            if self.path is None and dataset is None:
                return None
            path = self.zoo_path(dataset)
            if not path.is_file():
                return (f"model file {path} not found; download it with RobustBench's load_model "
                        f"(which keeps {self.name} there), set ${ZOO_ENV} to the folder that holds "
                        f"{dataset or 'DATASET'}/{self.threat}/, or give its path: robustbench:{self.threat}/{self.name}:PATH")
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
    if colon and kind == "robustbench" and "/" in rest.partition(":")[0]:
        entry, _, path = rest.partition(":")
        threat, _, name = entry.partition("/")
        if threat not in ZOO_THREATS or not name or "/" in name:
            raise ConfigError(f"model {spec!r}: a RobustBench zoo name is robustbench:THREAT/NAME[:PATH] with THREAT "
                              f"one of {ZOO_THREATS} (e.g. robustbench:Linf/Wang2023Better_WRN-28-10)")
        if colon and rest.endswith(":"):
            raise ConfigError(f"model {spec!r}: the path after the name is empty")
        return ModelRef("robustbench", path or None, None, threat, name)
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
