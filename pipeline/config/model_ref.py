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

Which presets exist is the models' business (pipeline.models.importer checks the names); here
only the shape of the string is checked, so that a job parses where its files are not.
"""

from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path

from pipeline.errors import ConfigError

PUBLISHED = ("edm", "robustbench")
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

    @property
    def format(self) -> str | None:
        """The import format of a published file: edm-pkl, edm-pt or robustbench."""
        if self.kind == "robustbench":
            return "robustbench"
        if self.kind == "edm":
            return "edm-pkl" if self.path.endswith(".pkl") else "edm-pt"
        return None

    def missing(self, dataset: str | None = None) -> str | None:
        """What a user must fix if the file or folder this names is not there, else None (a zoo
        entry without a path needs the dataset that places it)."""
        if self.kind in ("default", "optimal"):
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
    if spec in ("default", "optimal"):
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
