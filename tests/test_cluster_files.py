"""The files in cluster/ and the cluster docs (docs/clusters.md) name things that exist: Ray's own
schema accepts the `ray up` file, the RayJob's entrypoint is a real `robustsweep` command with
options `run` takes and a job file that validates, and the images, versions and pins agree."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import ray
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config.job import load_job

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"  # the Ray that submits is the Ray that runs


def _load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    assert len(docs) == 1
    return docs[0]


def _check_command(words: list[str]) -> None:
    """`robustsweep CMD [JOB] [--options]`: CMD is a command, its options exist, a job file named
    in the repo exists and validates."""
    assert words[0] == "robustsweep", words
    res = CliRunner().invoke(app, [words[1], "--help"])
    assert res.exit_code == 0, f"robustsweep {words[1]}: not a command"
    options = set(re.findall(r"--[a-z][a-z-]*", res.output))
    for word in words[2:]:
        if word.startswith("--"):
            assert word.split("=")[0] in options, f"robustsweep {words[1]} has no option {word}"
        elif word.startswith("jobs/"):
            assert (REPO / word).is_file(), f"{word} is not in the repository"
            load_job(REPO / word)


def test_ray_up_config_is_valid_for_ray():
    import jsonschema

    config = _load("ray-up-gpu.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == IMAGE
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert gpu and all(t["resources"]["GPU"] == 1 and t["min_workers"] >= 1 for t in gpu)
    # The checkout the setup commands install is this repository, with the GPU constraints.
    assert config["file_mounts"] == {"~/robustsweep": "."}
    setup = " ".join(config["setup_commands"])
    assert "-c ~/robustsweep/cluster/constraints-gpu.txt -e ~/robustsweep" in setup
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    # The head offers no CPU to worker actors, to Ray (--num-cpus=0) and to the autoscaler alike:
    # `resources: {}` leaves the machine's CPUs on offer.
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    starts = [shlex.split(c.split(";")[-1]) for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert all("--num-cpus=0" in words for words in starts)
    # The submission the file's header shows waits for the GPUs of min_workers.
    (submit,) = [line.split("#", 1)[1].split("#")[0].strip() for line in (CLUSTER / "ray-up-gpu.yaml").read_text().splitlines()
                 if line.startswith("#") and "robustsweep submit" in line]
    words = shlex.split(submit)
    _check_command(words)
    assert 1 <= int(words[words.index("--min-gpus") + 1]) <= min(t["min_workers"] for t in gpu)
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_gpu_constraints_pin_every_dependency_at_the_tested_version():
    pins = dict(line.split("==") for line in (CLUSTER / "constraints-gpu.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    cpu = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
               if line and not line.startswith("#"))
    assert pins["torch"] == cpu["torch"].split("+")[0]  # same version, the CUDA build
    assert {**cpu, "torch": pins["torch"]} == pins  # every other pin the same: what `make setup` installed
    assert pins["ray"] == ray.__version__
    spec = importlib.util.spec_from_file_location("gpu_constraints", REPO / "scripts" / "gpu_constraints.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # Every distribution the package needs here, at the version installed here; regenerate with
    # `python scripts/gpu_constraints.py > cluster/constraints-gpu.txt` after an upgrade.
    assert pins == script.pins()
    assert {"numpy", "pyarrow", "s3fs", "botocore", "pydantic", "duckdb", "safetensors"} <= set(pins)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"pip install .*-c cluster/constraints-gpu\.txt -e \.", dockerfile)


def test_rayjob_names_a_real_entrypoint():
    job = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    words = shlex.split(job["spec"]["entrypoint"])
    _check_command(words)
    assert words[1] == "run"
    assert words[words.index("--address") + 1] == "auto"
    assert words[words.index("--out") + 1].startswith("s3://")
    groups_gpus = sum(g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert 1 <= int(words[words.index("--min-gpus") + 1]) <= groups_gpus  # never a GPU sweep on CPUs
    head_params = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert str(head_params.get("num-cpus")) == "0"  # the head's CPUs are not offered to worker actors

    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    groups = cluster["workerGroupSpecs"]
    workers = [g["template"]["spec"]["containers"][0] for g in groups]
    assert all(c["resources"]["limits"]["nvidia.com/gpu"] == 1 for c in workers)
    assert all(g["minReplicas"] == g["replicas"] for g in groups)  # the pool is sized at start
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert re.search(rf"^FROM {re.escape(IMAGE)}$", dockerfile, re.M)
    for container in [head, *workers]:
        assert container["image"] == head["image"]
        assert container["workingDir"] == workdir  # where the job file's relative paths resolve
        secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert secrets == ["robustsweep-aws"]  # S3 credentials from a Secret, head and workers


def test_cluster_docs_name_real_commands_and_files():
    readme = (REPO / "docs" / "clusters.md").read_text()
    section = readme.split("## From zero to a sweep on a cluster", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
                for line in block.replace("\\\n", " ").splitlines()]
    ours = [shlex.split(c) for c in commands if c.startswith("robustsweep ")]
    assert {w[1] for w in ours} >= {"submit", "status", "logs", "report"}
    for words in ours:
        _check_command(words)
    for path in set(re.findall(r"cluster/[\w.-]+", section)):
        assert (REPO / path).is_file(), path
