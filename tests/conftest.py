"""Shared pytest fixtures and the test tiers.

Hermetic: the session gets its own model cache, $ROBUSTSWEEP_CACHE set to a folder under pytest's
temp dir before any test module is imported and restored when the session ends (so is
OMP_NUM_THREADS, 1 for the session: see THREAD_ENV), so nothing
depends on the home folder or on the order of the files. A default model is trained once per
session into it by `default_models` (the `prepare` step of a run, for tests that build defenses
directly). A trained copy is reused across sessions only under a key that hashes every source
file that decides its weights (see `models_key`), so a change to the training code, the
architectures, the data, the draws or torch trains it afresh.

Sessions: `make test` runs two pytest-xdist workers (`-n 2 --dist loadfile`), each its own pytest
session with its own model cache, Ray cluster and S3 server, started on first use; a test file
runs whole in one worker. The briefly trained `unet` is trained once and shared by the workers.

Tiers: `slow` marks tests that start Ray, an S3 server or a subprocess CLI, run torch.compile
(the C compiler in subprocesses), or train a model for many steps; tests that ask for the Ray, S3 or head fixtures are marked here, the others carry
`@pytest.mark.slow`. `gpu` marks
tests that need CUDA. `make test-fast` runs `-m "not slow and not gpu"`.

Digits: `digits` is the one way tests load the digits splits (train and test, as tensors).

S3: `s3_server` runs moto's real S3 server on 127.0.0.1 for the whole session (requests go
over loopback HTTP exactly as they would to a remote endpoint); `s3_bucket` gives each test a
fresh, empty bucket on it. Pass `s3_server.storage_options` to anything that takes fsspec
storage options (load_split, the store, s3fs.S3FileSystem(**...)). To make another bucket,
call `fs.call_s3("create_bucket", Bucket=name)`: `fs.mkdir(bucket)` fails with region us-east-1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE_ENV = "ROBUSTSWEEP_CACHE"
# Tests asking for one of these fixtures start Ray, an S3 server or a Ray head: the slow tier.
SLOW_FIXTURES = {"ray_nodes", "ray_cluster", "s3_server", "s3_bucket", "head"}
TRAINING_TIMEOUT_S = 1800  # the time limit of a test that may train a default model first
# One torch thread in the test process and everything it starts (CLI subprocesses, Ray nodes):
# the suite runs Ray actors and subprocesses beside the test process on few cores, where OpenMP
# threads of several processes contend and tiny networks slow down many times over. Results do
# not depend on it (the tests compare within one process or across equal settings).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_saved_env: list[dict[str, str | None]] = []


def pytest_sessionstart(session) -> None:
    """Point the model cache at a fresh folder of this session and give torch one thread, before
    any test module is imported (torch reads OMP_NUM_THREADS when it loads)."""
    _saved_env.append({k: os.environ.get(k) for k in (CACHE_ENV, *THREAD_ENV)})
    folder = session.config._tmp_path_factory.mktemp("model-cache", numbered=True)
    os.environ[CACHE_ENV] = str(folder)
    os.environ.update(THREAD_ENV)
    if "torch" in sys.modules:  # loaded already by a plugin: tell it too
        sys.modules["torch"].set_num_threads(1)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _saved_env:
        _restore_env(_saved_env.pop())


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        # The first test to ask for a default model (or the session's UNet) trains it (minutes on a busy machine) within
        # its own time limit; give those tests room unless they set a limit themselves.
        if fixtures & {"default_models", "unet"} and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TRAINING_TIMEOUT_S))


def models_key() -> str:
    """A hash of everything that decides the default models' weights: the sources of data,
    models, diffusion, training and the draws, and the torch version."""
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    for package in ("data", "models", "diffusion", "training"):
        for path in sorted((REPO / "pipeline" / package).rglob("*.py")):
            h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    h.update((REPO / "pipeline" / "rng.py").read_bytes())
    return h.hexdigest()[:20]


@pytest.fixture(scope="session")
def default_models(request):
    """prepare(role, dataset="digits"): puts that default model in the session cache, as the `prepare`
    step of a run does, and returns its folder. Call it before building a defense on a default model.

    Each model is trained once per session; a trained copy is kept under pytest's cache folder
    keyed by `models_key()` and copied from there when the key matches, so unchanged sources
    never train twice."""
    from pipeline.models.zoo import default_path
    from pipeline.training.defaults import ensure_default_model

    store = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: train, keep nothing
    keep = store.mkdir("robustsweep-models") / models_key() if store is not None else None

    def prepare(role: str, dataset: str = "digits") -> Path:
        name = f"{dataset}-{role}"
        target = default_path(dataset, role)
        if keep is not None and (keep / name / "config.json").is_file() and not target.exists():
            shutil.copytree(keep / name, target)
        folder = ensure_default_model(dataset, role, progress=False)
        if keep is not None and not (keep / name).exists():
            tmp = keep / f".{name}.{os.getpid()}.tmp"
            shutil.copytree(folder, tmp)
            try:
                tmp.rename(keep / name)
            except OSError:  # another session kept the same model first
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    return prepare


class Digits(NamedTuple):
    """The digits splits as tensors: x float32 (N, 1, 8, 8) in [0, 1], y int64 (N,)."""

    x_train: "torch.Tensor"
    y_train: "torch.Tensor"
    x_test: "torch.Tensor"
    y_test: "torch.Tensor"


@pytest.fixture(scope="session")
def digits() -> Digits:
    from pipeline.data import load_split

    return Digits(*load_split("digits", "train"), *load_split("digits", "test"))


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    """Stand-in files in the published layouts (tests/standins.py), each written once a session."""
    from standins import StandIns

    return StandIns(tmp_path_factory.mktemp("standins"))


@pytest.fixture(scope="session")
def cnn(tmp_path_factory) -> str:
    """A checkpoint folder of a randomly initialised digits SmallCNN (seed 0): a plain model that
    builds in milliseconds, for tests of the runtime and the store rather than of the model."""
    import torch

    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.models.registry import build_model

    folder = tmp_path_factory.mktemp("cnn") / "ckpt"
    torch.manual_seed(0)
    model = build_model({"arch": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 8})
    save_checkpoint(folder, model, model.config, {})
    return str(folder)

@pytest.fixture(scope="session")
def unet(tmp_path_factory) -> str:
    """A checkpoint folder of the digits UNet (the default architecture, `unet_config("digits")`)
    trained briefly (300 steps; the default recipe runs 1000): a real, classifying diffusion model
    for tests of the engine, the benchmarks and the runtime, at a fraction of the default's
    training time. Tests of the default model itself use `default_models`."""
    from filelock import FileLock

    from pipeline.data import load_split
    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.models.unet import unet_config
    from pipeline.training.diffusion import train_diffusion

    # Under pytest-xdist (make test: -n 2) the workers share the parent of their temp folders:
    # the first to get the lock trains, the others load its checkpoint.
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder = shared / "session-unet"
    with FileLock(str(shared / "session-unet.lock")):
        if not (folder / "config.json").is_file():
            x, y = load_split("digits", "train")
            config = unet_config("digits")
            model, stats = train_diffusion(x, y, config, steps=300, batch_size=128, lr=2e-3, ema_decay=0.99,
                                           warmup=50, progress=False)
            save_checkpoint(folder, model, config, {"kind": "diffusion", "dataset": "digits", "steps": stats["steps"]})
    return str(folder)


FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible endpoint.

    endpoint_url: "http://127.0.0.1:{port}".
    storage_options: fsspec/s3fs options that reach it with the fake credentials.
    """

    endpoint_url: str
    storage_options: dict = field(repr=False)

    def filesystem(self):
        """An s3fs filesystem on this server (fsspec may hand back a cached instance)."""
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 at a free port, for the session; stopped at the end.

    Also sets AWS_ACCESS_KEY_ID/SECRET to "testing" where unset, so that code reading
    credentials from the environment (boto3, s3fs without options) never looks for real ones;
    the previous environment is restored when the session ends.
    """
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in FAKE_CREDENTIALS}
    for key, value in FAKE_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    # Port 0: the OS picks a free port at bind time, so parallel sessions never collide.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        yield S3Server(
            endpoint_url=url,
            storage_options={
                "key": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "secret": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": url, "region_name": REGION},
            },
        )
    finally:
        server.stop()
        _restore_env(saved)


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh bucket with a unique name on `s3_server`; yields "s3://{name}", emptied and removed after."""
    fs = s3_server.filesystem()
    name = f"test-{uuid.uuid4().hex[:16]}"
    # Not fs.mkdir: s3fs would send LocationConstraint=us-east-1, which S3 (and moto) refuse.
    fs.call_s3("create_bucket", Bucket=name)
    fs.invalidate_cache()
    yield f"s3://{name}"
    # Teardown is best effort: a test may already have removed the bucket, and the server's
    # memory goes away with the session anyway.
    try:
        fs.rm(name, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


GPU_NODES = 3  # worker nodes of the session cluster, each declaring one (fake) GPU


@pytest.fixture(scope="session")
def ray_nodes(s3_server, tmp_path_factory):
    """One multi-node Ray cluster for the whole session: a head (2 CPUs, no GPU) and GPU_NODES
    worker nodes of 1 CPU and 1 fake GPU each, so GPU pinning and gangs run on CPU. Started
    after the S3 fixture so that its workers inherit the fake credentials. Yields the
    `ray.cluster_utils.Cluster` (tests add and remove nodes through it)."""
    import ray
    from ray.cluster_utils import Cluster

    # Quick health checks, so a removed node is declared dead in seconds rather than a minute.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 4}})
    for _ in range(GPU_NODES):
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(ray_nodes):
    """The session cluster's GCS address, for subprocess drivers."""
    return ray_nodes.address


@pytest.fixture(scope="session")
def linear_classifier(digits):
    """A linear softmax classifier on digits (about 95% test accuracy), trained in a second."""
    import torch

    x, y = digits.x_train, digits.y_train
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def evaluate_table(defense, table: dict, x, y, ids, seed: int, *, surrogate=None, **options):
    """evaluate() of an attack table on (x, y, ids): the table parsed and built as a worker does."""
    from pipeline.config import spec
    from pipeline.protocol import Batch, build_attack, evaluate

    attack = build_attack(spec(table), defense.num_classes, surrogate=surrogate)
    return evaluate(defense, attack, Batch(x, y, ids), seed, **options)


def attack_records(defense, table: dict, x, y, ids, seed: int, **kwargs) -> list[dict]:
    """The records of `evaluate_table`, as the dicts a unit's table is made of."""
    return [r.as_dict() for r in evaluate_table(defense, table, x, y, ids, seed, **kwargs).records]
