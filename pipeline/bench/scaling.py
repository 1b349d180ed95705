"""`robustsweep bench scaling`: the runtime's Ray workers against independent processes.

The same job runs three ways on this machine: through `run_job` on a local Ray cluster with
1 and 2 worker actors (one torch thread each), and split by hand into 1 and 2 independent
OS processes, the published code's `--begin/--end` way: each process takes a contiguous
slice of the job's units and runs each through `Worker.run_unit` in its own process (the
evaluation protocol, then the unit's records and adversarial images committed as Parquet),
without Ray's scheduling; one torch thread each. Both include starting their processes and
loading the models. The ratio of their throughputs is what the queue, the actors and the driver cost;
spread over the units it is the Ray overhead per unit.

A process slice is also a module entry point:
`python -m pipeline.bench.scaling --job job.json --begin 0 --end 6 --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.bench.common import load_average, local_ray, machine_info, timed
from pipeline.data import load_split
from pipeline.runtime.plan import plan
from pipeline.runtime.run import prepare_models, run_job
from pipeline.runtime.worker import Worker, WorkerContext
from pipeline.config.job import parse_job
from pipeline.config.run import RunOptions


def scaling_job(examples: int = 48, shard_size: int = 4, timesteps: int = 10, steps: int = 5, passes: int = 2,
                model: str = "default") -> dict:
    """The job both sides run: RDC on a digits diffusion model (`model`: "default", the digits
    UNet, or a checkpoint folder) with `timesteps` timesteps under PGD (`steps` steps, Linf
    8/255), scored over `passes` passes, on `examples` digits test images in units of `shard_size`."""
    return {
        "name": "bench-scaling", "seed": 0,
        "data": {"dataset": "digits", "split": "test", "limit": examples, "shard_size": shard_size},
        "defenses": [{"kind": "rdc", "model": model, "timesteps": timesteps}],
        "attacks": [{"kind": "pgd", "steps": steps, "eps": 8 / 255, "passes": passes}],
    }


def split_by_hand(n_units: int, parts: int) -> list[tuple[int, int]]:
    """[begin, end) unit ranges of `parts` processes: contiguous, near-equal, covering every unit once."""
    parts = max(1, min(parts, n_units))
    edges = [round(i * n_units / parts) for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


def run_slice(doc: dict, begin: int, end: int, out: str) -> int:
    """Units [begin, end) of the job `doc`, each through `Worker.run_unit` as a Ray actor runs
    it, here in this process; returns rows. One torch thread; the files go under `out`."""
    job = parse_job(doc)
    data = job.spec.data
    x_all, _ = load_split(data.dataset, data.split, root=data.root)
    worker = Worker(f"process-{begin}", "cpu", threads=1)
    ctx = WorkerContext("by-hand", job.hash, out, job.spec.seed, data)
    return sum(worker.run_unit(u, ctx).rows for u in plan(job, x_all.shape[0])[begin:end])


def _by_hand(doc: dict, n_units: int, processes: int, out: Path) -> float:
    """Seconds for the job split over `processes` independent processes, from their start to the last exit."""
    job_file = out / "job.json"
    job_file.write_text(json.dumps(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run_all():
        procs = [subprocess.Popen([sys.executable, "-m", "pipeline.bench.scaling", "--job", str(job_file), "--begin",
                                   str(b), "--end", str(e), "--out", str(out / "records")], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for b, e in split_by_hand(n_units, processes)]
        return procs, [p.communicate()[1] for p in procs]

    seconds, (procs, errors) = timed(run_all)
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            raise RuntimeError(f"a process of the hand split failed:\n{err[-2000:]}")
    return seconds


def _with_ray(job, workers: int, out: Path) -> tuple[float, str]:
    """Seconds of run_job with `workers` actors (one thread each) on the running cluster, and the run folder."""
    seconds, result = timed(lambda: run_job(job, RunOptions(out=str(out), workers=workers, fresh=True), progress=False))
    if not result.ok:
        raise RuntimeError(f"the Ray run failed units: {result.failed}")
    return seconds, str(out / result.run_id)


def predictions(folder: str | Path) -> dict[int, tuple]:
    """example_id -> (clean_pred, adv_pred, clean_logits) from the records Parquet files under folder."""
    out = {}
    for path in sorted(Path(folder).rglob("records/**/*.parquet")):
        table = pq.read_table(path, columns=["example_id", "clean_pred", "adv_pred", "clean_logits"]).to_pylist()
        for r in table:
            if r["example_id"] in out:
                raise AssertionError(f"example {r['example_id']} appears twice under {folder}")
            out[r["example_id"]] = (r["clean_pred"], r["adv_pred"], tuple(r["clean_logits"]))
    return out


def bench_scaling(examples: int = 48, shard_size: int = 4, timesteps: int = 10, steps: int = 5, passes: int = 2,
                  workers: tuple[int, ...] = (1, 2), repeat: int = 1, model: str = "default") -> dict:
    """Throughput of the job through Ray (run_job, `workers` actors) and split by hand into as many
    independent processes, side by side; best of `repeat` rounds, the two sides alternating.

    Returns per worker count: seconds and examples/s of each side, `ratio` (Ray throughput over
    the processes'), `overhead_per_unit_s` ((Ray seconds - process seconds) x workers / units:
    worker-seconds Ray adds to a unit), and whether both gave the same predictions and logits.
    """
    import ray

    doc = scaling_job(examples, shard_size, timesteps, steps, passes, model)
    job = parse_job(doc)
    x, _ = load_split("digits", "test")
    n_units = len(plan(job, x.shape[0]))
    prepare_models(job, progress=False)  # trained once here, not inside either timing
    load_before = load_average()
    rows = []
    with local_ray(2):
        with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
            for w in workers:
                best_ray = best_hand = float("inf")
                for r in range(repeat):
                    hand_dir, ray_dir = Path(tmp) / f"hand-{w}-{r}", Path(tmp) / f"ray-{w}-{r}"
                    hand_dir.mkdir()
                    best_hand = min(best_hand, _by_hand(doc, n_units, w, hand_dir))
                    t_ray, run_folder = _with_ray(job, w, ray_dir)
                    best_ray = min(best_ray, t_ray)
                same = predictions(hand_dir / "records") == predictions(run_folder)
                if not same:
                    raise AssertionError(f"Ray and the hand split disagree with {w} workers")
                rows.append({"workers": w, "ray_seconds": best_ray, "processes_seconds": best_hand,
                             "ray_examples_per_s": examples / best_ray, "processes_examples_per_s": examples / best_hand,
                             "ratio": best_hand / best_ray, "overhead_per_unit_s": (best_ray - best_hand) * w / n_units,
                             "same_predictions": same})
    return {"job": doc, "units": n_units, "examples": examples, "repeat": repeat, "runs": rows,
            "threads_per_worker": 1, **machine_info("cpu"), "ray": ray.__version__,
            "load_before": load_before, "load_after": load_average()}


def main(argv: list[str] | None = None) -> int:
    """One process of the hand split: --job FILE --begin B --end E --out DIR."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.scaling", description=main.__doc__)
    parser.add_argument("--job", required=True, help="the job as JSON")
    parser.add_argument("--begin", type=int, required=True, help="first unit (in plan order)")
    parser.add_argument("--end", type=int, required=True, help="one past the last unit")
    parser.add_argument("--out", required=True, help="folder for the units' Parquet files")
    args = parser.parse_args(argv)
    run_slice(json.loads(Path(args.job).read_text()), args.begin, args.end, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def format_scaling(result: dict) -> list[str]:
    """The lines `robustsweep bench scaling` prints for a result of `bench_scaling`."""
    lines = [f"{r['workers']} worker(s), {result['units']} units: Ray {r['ray_seconds']:.1f} s "
             f"({r['ray_examples_per_s']:.2f} ex/s), independent processes {r['processes_seconds']:.1f} s "
             f"({r['processes_examples_per_s']:.2f} ex/s); Ray at {100 * r['ratio']:.0f}% of their throughput, "
             f"overhead {r['overhead_per_unit_s']:+.3f} s per unit; same predictions: {r['same_predictions']}"
             for r in result["runs"]]
    lines.append(f"load average {result['load_before']} before, {result['load_after']} after")
    return lines
