"""Shared pytest fixtures.

S3: `s3_server` runs moto's real S3 server on 127.0.0.1 for the whole session (requests go
over loopback HTTP exactly as they would to a remote endpoint); `s3_bucket` gives each test a
fresh, empty bucket on it. Pass `s3_server.storage_options` to anything that takes fsspec
storage options (load_split, the store, s3fs.S3FileSystem(**...)). To make another bucket,
call `fs.call_s3("create_bucket", Bucket=name)`: `fs.mkdir(bucket)` fails with region us-east-1.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

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

    os.environ.setdefault("ROBUSTSWEEP_CACHE", str(tmp_path_factory.mktemp("model-cache")))
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
def linear_classifier():
    """A linear softmax classifier on digits (about 95% test accuracy), trained in a second."""
    import torch

    from pipeline.data import load_split

    x, y = load_split("digits", "train")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()
