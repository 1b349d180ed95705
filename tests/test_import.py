"""Published checkpoints: NVlabs pickles read without running them, RobustBench and RDC-author
state dicts, `import-model`, model references in defense tables and the shipped job files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

from pipeline.config import spec
from pipeline.config.job import load_job, parse_job
from pipeline.config.model_ref import parse_model_ref
from pipeline.defenses import build_defense
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models import build_edm, build_model, load
from pipeline.models.checkpoint import load_checkpoint
from pipeline.models.importer import check_job_models, import_model, import_to_folder
from pipeline.models.safe_pickle import read_network, read_pickle

REPO = Path(__file__).resolve().parent.parent
# A DDPM++ (SongUNet, VP) network of the published CIFAR-10 layout, shrunk: 8x8, two levels.
TINY_EDM = {"preset": "edm-cifar10-cond-vp", "img_resolution": 8, "model_channels": 16, "channel_mult": [1, 2],
            "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}

# A stand-in for NVlabs' torch_utils.persistence: the same reduce (a class record holding the
# module's source and state, rebuilt by _reconstruct_persistent_obj), written here from its
# documented behaviour. It only pickles; loading is the restricted reader's job.
PERSISTENCE = '''
import copy, inspect, sys

_version = 6

def persistent_class(orig_class):
    src = inspect.getsource(sys.modules[orig_class.__module__])

    class Decorator(orig_class):
        _orig_module_src = src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type="class", version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0], fields[1], fields[2] = _reconstruct_persistent_obj, (meta,), None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__module__ = orig_class.__module__
    return Decorator

def _reconstruct_persistent_obj(meta):
    raise RuntimeError("the stand-in only writes pickles")
'''
EASYDICT = '''
class EasyDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)
'''
LOSS = '''
from torch_utils import persistence

@persistence.persistent_class
class VPLoss:
    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t
'''


@pytest.fixture
def nvlabs(tmp_path, monkeypatch):
    """The stand-in packages torch_utils, dnnlib and training on sys.path, removed afterwards."""
    root = tmp_path / "nvlabs"
    for name, text in {"torch_utils/persistence.py": PERSISTENCE, "dnnlib/util.py": EASYDICT, "training/loss.py": LOSS}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).parent.joinpath("__init__.py").touch()
        (root / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(root))
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "training", "training.loss"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import dnnlib.util
    import torch_utils.persistence
    import training.loss

    yield torch_utils.persistence, dnnlib.util, training.loss
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "training", "training.loss"):
        sys.modules.pop(name, None)


def _nvlabs_snapshot(nvlabs, config: dict) -> tuple[dict, torch.nn.Module, dict]:
    """(snapshot dict as NVlabs' training loop pickles it, the network, its init kwargs).

    Every module but the torch containers becomes persistent, as EDM decorates all of its own
    classes; the network records the keyword arguments it was built from.
    """
    persistence, util, loss = nvlabs
    torch.manual_seed(0)
    net = build_edm(config).eval().requires_grad_(False)
    for module in net.modules():
        if not isinstance(module, (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Sequential)):
            module.__class__ = persistence.persistent_class(type(module))
    from pipeline.models.edm.config import resolve

    kwargs = {k: v for k, v in resolve(config).items() if k != "precond"}
    net._init_args, net._init_kwargs = (), kwargs
    # Buffers and parameters of random values, so that a swap or a wrong offset shows.
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    data = {"ema": net, "loss_fn": loss.VPLoss(beta_d=19.9), "augment_pipe": None,
            "dataset_kwargs": dict(util.EasyDict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip",
                                                 use_labels=True, xflip=False, cache=True, resolution=32, max_size=50000))}
    return data, net, kwargs


@pytest.mark.parametrize("container", ["pickle-4", "pickle-5", "torch.save", "torch.save-legacy"])
def test_nvlabs_pickle_loads_to_the_same_tensors_and_init_kwargs(nvlabs, tmp_path, container):
    data, net, kwargs = _nvlabs_snapshot(nvlabs, TINY_EDM)
    path = tmp_path / "network-snapshot-000000.pkl"
    with open(path, "wb") as f:
        if container.startswith("pickle"):
            pickle.dump(data, f, protocol=int(container[-1]))
        else:
            torch.save(data, f, _use_new_zipfile_serialization=container == "torch.save")
    record = read_network(path)
    assert record.class_name == "VPPrecond"
    assert record.init_kwargs == kwargs
    want = net.state_dict()
    assert list(record.state_dict) == list(want)  # the names and order of state_dict()
    for name, tensor in want.items():
        assert torch.equal(record.state_dict[name], tensor), name
        assert record.state_dict[name].dtype == tensor.dtype
    tree = read_pickle(path)
    assert tree["dataset_kwargs"]["max_size"] == 50000 and type(tree["dataset_kwargs"]) is dict
    assert tree["loss_fn"].class_name == "VPLoss" and tree["loss_fn"].state["beta_d"] == 19.9


@pytest.mark.parametrize("case", ["ddpmpp-vp", "ncsnpp-ve", "adm-edm"])
def test_edm_pkl_imports_to_a_folder_with_provenance_and_equal_outputs(nvlabs, tmp_path, case):
    from edm_cases import TINY  # tiny DDPM++, NCSN++ and ADM configurations

    data, net, _ = _nvlabs_snapshot(nvlabs, TINY[case])
    src = tmp_path / "edm-tiny.pkl"
    src.write_bytes(pickle.dumps(data))
    folder, config, meta = import_to_folder(src, "edm-pkl", tmp_path / "out")
    precond = case.split("-")[1]
    assert config["precond"] == precond and config["arch"] == "edm"
    assert meta["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["source"]["format"] == "edm-pkl"
    assert meta["source"]["class_name"] == {"vp": "VPPrecond", "ve": "VEPrecond", "edm": "EDMPrecond"}[precond]
    loaded = load(folder)
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2, 3]), 4).float()
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


class _Shell:
    """Unpickling this runs a shell command: the hostile pickle."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Import:
    """Unpickling this imports a module by name (and would run its top level)."""

    def __reduce__(self):
        import importlib

        return (importlib.import_module, ("this",))


class _Persistent:
    """An NVlabs-style persistent record whose source writes a file if anyone executed it."""

    def __init__(self, marker: Path, reconstruct):
        self.marker, self.reconstruct = marker, reconstruct

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=f"open({str(self.marker)!r}, 'w').write('ran')",
                    class_name="VPPrecond", state={})
        return (self.reconstruct, (meta,))


def _hostile(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "edm-cifar10-32x32-cond-vp.pkl"
    path.write_bytes(pickle.dumps({"ema": _Shell(f"touch {marker}")}))
    return path, marker


class _Eval:
    """Unpickling this evaluates Python text that writes the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize("how", ["pickle", "torch.save", "torch.save-legacy"])
def test_a_pickle_that_runs_a_shell_command_is_refused_and_runs_nothing(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "edm-cifar10-32x32-cond-vp.pkl"
    data = {"ema": _Shell(f"touch {marker}")}
    if how == "pickle":
        path.write_bytes(pickle.dumps(data))
    else:
        torch.save(data, path, _use_new_zipfile_serialization=how == "torch.save")
    with pytest.raises(CheckpointError, match=r"refers to (posix|os)\.system.*refusing to load it"):
        read_network(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", ["import", "eval"])
def test_a_pickle_that_imports_a_module_or_evaluates_text_is_refused(tmp_path, monkeypatch, payload):
    marker = tmp_path / "ran"
    path = tmp_path / "payload.pkl"
    path.write_bytes(pickle.dumps({"ema": _Import() if payload == "import" else _Eval(marker)}))
    monkeypatch.delitem(sys.modules, "this", raising=False)
    with pytest.raises(CheckpointError, match=r"importlib\.import_module" if payload == "import" else r"builtins\.eval"):
        read_pickle(path)
    assert "this" not in sys.modules and not marker.exists()


def test_persistent_source_is_kept_as_text_never_executed(nvlabs, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "src.pkl"
    path.write_bytes(pickle.dumps({"ema": _Persistent(marker, nvlabs[0]._reconstruct_persistent_obj)}))
    tree = read_pickle(path)
    assert "open(" in tree["ema"].module_src
    with pytest.raises(CheckpointError, match="no init_kwargs"):
        read_network(path)
    assert not marker.exists()


@pytest.mark.slow
def test_import_model_cli_refuses_a_hostile_pickle_with_exit_2(tmp_path):
    path, marker = _hostile(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "import-model", str(path), "--format", "edm-pkl",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "refusing to load it" in proc.stderr and "system" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("container", ["pickle", "torch.save", "torch.save-legacy"])
def test_damaged_files_raise_checkpoint_error_only(tmp_path, container):
    import io
    import random

    buf = io.BytesIO()
    tree = {"ema": {"w": torch.randn(3, 4), "b": [1, 2.0, "x", {"z": torch.arange(5)}]}}
    if container == "pickle":
        pickle.dump(tree, buf)
    else:
        torch.save(tree, buf, _use_new_zipfile_serialization=container == "torch.save")
    good, rnd, path = buf.getvalue(), random.Random(0), tmp_path / "damaged.pkl"
    for i in range(200):
        damaged = bytearray(good)
        if i % 2:
            for _ in range(rnd.randint(1, 4)):
                damaged[rnd.randrange(len(damaged))] = rnd.randrange(256)
        else:
            damaged = damaged[: rnd.randrange(len(damaged))]
        path.write_bytes(bytes(damaged))
        try:
            read_pickle(path)
        except CheckpointError:
            pass


# --- RobustBench classifiers ---------------------------------------------------------------------

def _rb_state(config: dict, seed: int = 0, mu_sigma: bool = False) -> tuple[torch.nn.Module, dict]:
    """A model of `config` with random weights and BN statistics, and its state dict as RobustBench stores it."""
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.1)
        if mu_sigma:
            model.mu.copy_(torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1))
            model.sigma.copy_(torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


RB_CASES = {
    # name: (our config that writes the file, what import-model is told, extra file layout)
    "wrn-small": ({"arch": "wrn", "depth": 10, "widen_factor": 2, "normalization": "none"},
                  {"config": {"arch": "wrn", "depth": 10, "widen_factor": 2}}, None),
    "wrn-small-mu-sigma-sub-block1": ({"arch": "wrn", "depth": 16, "widen_factor": 1, "normalization": "mu_sigma",
                                       "sub_block1": True}, {"config": {"arch": "wrn", "depth": 16, "widen_factor": 1}},
                                      "state_dict"),
    "preact-resnet-18-mu-sigma": ({"arch": "preact-resnet18", "normalization": "mu_sigma"},
                                  {"preset": "preact-resnet-18"}, "module."),
    "resnet-18": ({"arch": "resnet18", "normalization": "none"}, {"preset": "resnet-18"}, None),
    "small-cnn": ({"arch": "cnn", "in_channels": 3, "image_size": 32, "width": 32}, {"preset": "small-cnn"}, None),
}


@pytest.mark.parametrize("case", list(RB_CASES))
def test_robustbench_state_dicts_round_trip_with_identical_logits(tmp_path, case):
    config, told, layout = RB_CASES[case]
    model, state = _rb_state({**config, "num_classes": 10}, mu_sigma=config.get("normalization") == "mu_sigma")
    if layout == "module.":
        state = {"module." + k: v for k, v in state.items()}
    src = tmp_path / "model.pt"
    torch.save({"state_dict": state, "epoch": 100} if layout == "state_dict" else state, src)
    folder, cfg, meta = import_to_folder(src, "robustbench", tmp_path / "out", **told)
    assert cfg.get("normalization") == config.get("normalization")
    assert cfg.get("sub_block1", False) == config.get("sub_block1", False)
    assert meta["source"] == {"file": "model.pt", "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                              "format": "robustbench", "preset": told.get("preset")}
    loaded, _, _ = load_checkpoint(folder, build_model)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_wrn_28_10_has_robustbench_names_and_size():
    # RobustBench's WideResNet(28, 10): 36,479,194 parameters; its first block widens 16 -> 160
    # through convShortcut, the third ends at 640 channels.
    model = build_model({"arch": "wrn", "depth": 28, "widen_factor": 10, "num_classes": 10})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 36_479_194
    assert shapes["block1.layer.0.convShortcut.weight"] == (160, 16, 1, 1)
    assert "block1.layer.1.convShortcut.weight" not in shapes
    assert shapes["block3.layer.3.conv2.weight"] == (640, 640, 3, 3)
    assert shapes["fc.weight"] == (10, 640) and shapes["bn1.running_var"] == (640,)
    assert len(shapes) == 1 + 12 * 12 + 3 + 5 + 2  # conv1, 12 blocks of 2 BN + 2 conv, 3 shortcuts, bn1, fc


def test_wrong_architecture_or_class_count_names_the_first_mismatching_key(tmp_path):
    _, state = _rb_state({"arch": "wrn", "depth": 10, "widen_factor": 2, "num_classes": 10})
    src = tmp_path / "wrn-10-2.pt"
    torch.save(state, src)
    deeper = {"arch": "wrn", "depth": 16, "widen_factor": 2}
    with pytest.raises(CheckpointError, match=r"first mismatch: tensor 'block1\.layer\.1\.bn1\.weight' \(shape \(32,\)\) "
                                              r"is missing from the file"):
        import_model(src, "robustbench", config=deeper)
    with pytest.raises(CheckpointError, match=r"first mismatch: tensor 'fc\.weight' has shape \(10, 128\) in the file, "
                                              r"the model expects \(100, 128\)"):
        import_model(src, "robustbench", config={"arch": "wrn", "depth": 10, "widen_factor": 2}, num_classes=100)
    with pytest.raises(CheckpointError, match=r"first mismatch: tensor 'conv1\.weight' has shape \(16, 3, 3, 3\) in the file, "
                                              r"the model expects \(64, 3, 3, 3\)"):
        import_model(src, "robustbench", preset="preact-resnet-18")


@pytest.mark.slow
def test_import_model_cli_wrong_class_count_exits_2(tmp_path):
    _, state = _rb_state({"arch": "preact-resnet18", "normalization": "none", "num_classes": 10})
    src = tmp_path / "Standard.pt"
    torch.save(state, src)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "import-model", str(src), "--format", "robustbench",
                           "--arch", "preact-resnet-18", "--num-classes", "100", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "'linear.weight' has shape (10, 512) in the file, the model expects (100, 512)" in proc.stderr.replace("\n", "")
    assert not (tmp_path / "out").exists()


# --- the RDC authors' state dicts ----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["model.", "bare-unet", "wrapped"])
def test_edm_pt_state_dict_round_trips_through_build_edm(tmp_path, layout):
    torch.manual_seed(1)
    net = build_edm(TINY_EDM).eval()
    state = net.state_dict()
    assert all(k.startswith("model.") for k in state)  # the preconditioner holds the UNet as `model`
    if layout == "bare-unet":
        state = {k[len("model."):]: v for k, v in state.items()}
    src = tmp_path / "edm_cifar_cond_vp.pt"
    torch.save({"model": state} if layout == "wrapped" else state, src)
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(TINY_EDM))
    model, cfg, meta = import_model(src, "edm-pt", config=json.loads(config_file.read_text()))
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 3.0])
    labels = torch.eye(10)[[1, 7]]
    with torch.no_grad():
        assert torch.equal(model(x, sigma, labels), net(x, sigma, labels))
    assert meta["source"]["format"] == "edm-pt"
    with pytest.raises(CheckpointError, match=r"label_dim 100.*first mismatch: tensor 'model\.map_label\.weight' has shape"):
        import_model(src, "edm-pt", config=TINY_EDM, num_classes=100)


def test_edm_pt_needs_a_configuration(tmp_path):
    src = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1)}, src)
    with pytest.raises(ConfigError, match="carries no configuration"):
        import_model(src, "edm-pt")


def test_a_full_pickle_is_not_a_weights_only_state_dict(tmp_path):
    path, marker = _hostile(tmp_path)
    with pytest.raises(CheckpointError, match="cannot be read as a weights-only state dict"):
        import_model(path, "edm-pt", preset="edm-cifar10-cond-vp")
    assert not marker.exists()


# --- model references in defense tables and the shipped jobs -------------------------------------

def test_model_references_parse_once():
    assert parse_model_ref("robustbench:wrn-28-10:ckpt/Standard.pt").preset == "wrn-28-10"
    ref = parse_model_ref("edm:rdc-cifar10-cond-edm:ckpt/edm_cifar_cond_vp.pt")
    assert (ref.kind, ref.preset, ref.path, ref.format) == ("edm", "rdc-cifar10-cond-edm", "ckpt/edm_cifar_cond_vp.pt", "edm-pt")
    assert parse_model_ref("edm:ckpt/edm-cifar10-32x32-cond-vp.pkl").format == "edm-pkl"
    assert parse_model_ref("checkpoints/cifar10-unet").kind == "folder"
    with pytest.raises(ConfigError, match="needs an architecture"):
        parse_model_ref("robustbench:Standard.pt")
    with pytest.raises(ConfigError, match=r"defense plain-erm: model robustbench:wrn-99-1:x\.pt: 'wrn-99-1' is not a robustbench preset"):
        check_job_models(parse_job({"data": {"dataset": "cifar10"}, "attacks": [{"kind": "none"}],
                                    "defenses": [{"kind": "plain", "model": "robustbench:wrn-99-1:x.pt"}]}))
    with pytest.raises(ConfigError, match="carries no configuration"):
        parse_model_ref("edm:edm_cifar_cond_vp.pt")
    with pytest.raises(ConfigError, match="unknown prefix 'hf'"):
        parse_model_ref("hf:org/model")


def test_a_robustbench_file_is_a_plain_defense(tmp_path):
    model, state = _rb_state({"arch": "resnet18", "normalization": "none", "num_classes": 10})
    src = tmp_path / "Modas2021PRIMEResNet18.pt"
    torch.save(state, src)
    defense = build_defense(spec({"kind": "plain", "dataset": "cifar10", "model": f"robustbench:resnet-18:{src}"}))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(defense(x), model(x))
    with pytest.raises(ConfigError, match="cannot be a classifier"):
        build_defense(spec({"kind": "plain", "dataset": "cifar10", "model": f"edm:{src}.pkl"}))


def test_a_robustbench_file_is_mis_base_classifier(tmp_path):
    import numpy as np
    from test_data import CIFAR10_TRAIN_FILES, binary_records  # the official CIFAR-10 binary layout

    # MI's pool needs every class: two train images a batch, classes 0..9 over the five batches.
    folder = tmp_path / "cifar10"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(CIFAR10_TRAIN_FILES + ["test_batch.bin"]):
        pixels = rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
        (folder / name).write_bytes(binary_records(pixels, np.array([2 * i % 10, (2 * i + 1) % 10]), cifar100=False))
    model, state = _rb_state({"arch": "preact-resnet18", "normalization": "mu_sigma", "num_classes": 10}, mu_sigma=True)
    src = tmp_path / "Wong2020Fast.pt"
    torch.save(state, src)
    mi = build_defense(spec({"kind": "mi", "mode": "pl", "dataset": "cifar10", "data_root": str(tmp_path / "cifar10"),
                             "model": f"robustbench:preact-resnet-18:{src}"}))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(mi.classifier(x), model(x))


def test_missing_transfer_surrogate_file_is_named(tmp_path):
    doc = {"data": {"dataset": "cifar10"}, "defenses": [{"kind": "rdc", "model": "optimal"}],
           "attacks": [{"kind": "transfer", "surrogate": {"kind": "plain", "model": f"robustbench:wrn-34-10:{tmp_path}/TRADES.pt"},
                        "attack": {"kind": "pgd", "eps": 8 / 255}}]}
    with pytest.raises(CheckpointError, match=r"attack transfer-pgd-ce \(on rdc-optimal\): surrogate: model file \S+TRADES\.pt not found"):
        check_job_models(parse_job(doc))
    (tmp_path / "TRADES.pt").write_bytes(b"stand-in")
    check_job_models(parse_job(doc))


def _job_doc(name: str) -> dict:
    return tomllib.loads((REPO / "jobs" / name).read_text())


def _point_models_at(doc: dict, files: dict[str, Path]) -> dict:
    """The job with every model file path replaced by the small stand-in file of its kind."""
    for table in doc["defenses"]:
        ref = parse_model_ref(table["model"])
        if ref.path:
            table["model"] = table["model"][: -len(ref.path)] + str(files[ref.format])
    return doc


@pytest.mark.parametrize("name", ["rdc_cifar10_edm.toml", "rdc_cifar10_edm_honest.toml", "mi_cifar10.toml"])
def test_shipped_published_model_jobs_validate_and_name_missing_files(tmp_path, name):
    doc = _job_doc(name)
    job = parse_job(doc)
    with pytest.raises(CheckpointError, match=r"defense [\w.-]+: model file \S+ not found; download it"):
        check_job_models(job)
    files = {fmt: tmp_path / f"{fmt}.bin" for fmt in ("edm-pkl", "edm-pt", "robustbench")}
    for f in files.values():
        f.write_bytes(b"stand-in")
    check_job_models(parse_job(_point_models_at(doc, files)))


def test_rdc_edm_jobs_are_the_authors_demo_and_our_protocol():
    job = load_job(REPO / "jobs" / "rdc_cifar10_edm.toml")
    assert job.spec.data.dataset == "cifar10" and job.spec.data.limit == 512
    (defense,) = job.defenses
    assert defense.table["timesteps"] == "authors" and defense.table["elbo"] == "edm" and defense.table["draws"] == "fixed"
    assert parse_model_ref(defense.table["model"]).kind == "edm" and parse_model_ref(defense.table["lm"]["model"]).kind == "edm"
    attacks = {(a.table["kind"], a.table.get("version") or a.table.get("preset"), a.table.get("norm", "Linf"), a.table["eps"])
               for a in job.attacks}
    assert attacks == {("autoattack", "custom", "Linf", 8 / 255), ("autoattack", "standard", "Linf", 8 / 255)}
    honest = load_job(REPO / "jobs" / "rdc_cifar10_edm_honest.toml")
    (fresh,) = honest.defenses
    assert fresh.table["draws"] == "fresh" and fresh.table["lm"] == defense.table["lm"]
    attacks = {(a.table["kind"], a.table.get("version") or a.table.get("preset")) for a in honest.attacks}
    assert attacks == {("autoattack", "rand"), ("pgd", "lee-kim")}


@pytest.mark.slow
def test_validate_cli_names_the_missing_model_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(REPO / "jobs" / "mi_cifar10.toml")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "not found; download it" in proc.stderr and ".pt" in proc.stderr
