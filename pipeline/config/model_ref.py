"""A defense table's `model` string, parsed once into a ModelRef.

    "default"                               the cached default model of the dataset and role
    "optimal"                               RDC's closed-form optimal model (no weights)
    "path/to/folder"                        a checkpoint folder (model.safetensors + config.json)
    "edm:path/to/file.pkl"                  an NVlabs EDM pickle, configured by the file itself
    "edm:PRESET:path/to/file.pt"            a state dict of an EDM preset (the RDC authors' files)
    "robustbench:ARCH:path/to/file.pt"      a RobustBench state dict of a classifier preset

Which presets exist is the models' business (pipeline.models.importer checks the names); here
only the shape of the string is checked, so that a job parses where its files are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.errors import ConfigError

PUBLISHED = ("edm", "robustbench")


@dataclass(frozen=True)
class ModelRef:
    """kind: "default", "optimal", "folder", "edm" or "robustbench"; path: the folder or file;
    preset: the architecture preset of an edm or robustbench file, where given."""

    kind: str
    path: str | None = None
    preset: str | None = None

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
        if self.kind in ("default", "optimal"):
            return None
        path = PurePosixPath(self.path.replace("\\", "/").rstrip("/"))
        stem = path.name if self.kind == "folder" else path.stem
        return re.sub(r"[^A-Za-z0-9_.+-]+", "-", stem).strip("-.") or self.kind

    def missing(self) -> str | None:
        """What a user must fix if the file or folder this names is not there, else None."""
        if self.kind in ("default", "optimal"):
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
    if spec in ("default", "optimal"):
        return ModelRef(spec)
    kind, colon, rest = spec.partition(":")
    if colon and kind in PUBLISHED:
        preset, _, path = rest.partition(":") if ":" in rest else (None, "", rest)
        if not path or preset == "":
            raise ConfigError(f"model {spec!r}: expected {kind}:{'' if kind == 'edm' else 'ARCH:'}PATH"
                              + (" or edm:PRESET:PATH" if kind == "edm" else ""))
        if kind == "robustbench" and preset is None:
            raise ConfigError(f"model {spec!r}: a RobustBench file needs an architecture: robustbench:ARCH:PATH "
                              "(ARCH e.g. wrn-28-10)")
        if kind == "edm" and preset is None and not path.endswith(".pkl"):
            raise ConfigError(f"model {spec!r}: a state dict (.pt) carries no configuration; write edm:PRESET:PATH "
                              "(PRESET e.g. rdc-cifar10-cond-edm)")
        return ModelRef(kind, path, preset)
    if colon and kind.isalpha() and len(kind) > 1 and not rest.startswith("//"):
        raise ConfigError(f"model {spec!r}: unknown prefix {kind!r}; expected edm:, robustbench:, "
                          "'default', 'optimal' or a checkpoint folder")
    return ModelRef("folder", spec)


__all__ = ["ModelRef", "parse_model_ref", "PUBLISHED"]
