"""How a job runs (not what it computes): the options `run_job`, `submit_job` and their commands share."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError

DEFAULT_OUT = "results"
# A unit measured at the run's speed and predicted at its upper count would need a quarter of its
# deadline; five minutes covers a first unit's model load, a cold cache, a busy node.
DEADLINE_FACTOR = 4.0
DEADLINE_FLOOR = 300.0


@dataclass(frozen=True)
class RunOptions:
    """out: a folder or s3://bucket/prefix (a relative folder of a submitted job lands in its working
    dir on the head node). workers: actors (default: one per GPU, else per CPU). gpus_per_worker:
    in (0, 1]; fractions pack small models several to a GPU. address: the Ray cluster (None starts a
    local one; "auto"; ray://host:port). min_gpus: wait for this many GPUs before sizing the pool.
    endpoint_url: S3 endpoint. run_id: default the job's name and hash. fresh: a new run instead of
    resuming. report: print the report at the end. unit_timeout: seconds a unit may run before its
    actor is replaced and the unit requeued (None: a deadline from the cost model, below).
    deadline_factor, deadline_floor: without unit_timeout, a unit may run deadline_factor x its
    predicted (upper) network evaluations x the seconds per evaluation measured in this run on
    committed units of its defense, and never less than deadline_floor seconds; no deadline
    before such a unit has committed (runtime/run.py `unit_deadline`). speculate: a second copy
    of each of the last stragglers on an idle actor, the first commit wins."""

    out: str = DEFAULT_OUT
    workers: int | None = None
    gpus_per_worker: float = 1.0
    address: str | None = None
    min_gpus: int = 0
    endpoint_url: str | None = None
    run_id: str | None = None
    fresh: bool = False
    report: bool = True
    unit_timeout: float | None = None
    speculate: bool = False
    deadline_factor: float = DEADLINE_FACTOR
    deadline_floor: float = DEADLINE_FLOOR
    max_gpu_hours: float | None = None  # refuse a job estimated above this many device-hours (over the job file's)
    device: str = "h100"  # the device profile the budget is counted on (runtime/estimate.py)
    efficiency: float | None = None  # the fraction of the profile's peak a run reaches (default: the profile's)

    def __post_init__(self):
        if self.unit_timeout is not None and not self.unit_timeout > 0:
            raise ConfigError(f"unit_timeout (--unit-timeout) must be > 0 seconds, got {self.unit_timeout:g}")
        if not (self.deadline_factor >= 1 and self.deadline_factor < float("inf")):
            raise ConfigError(f"deadline_factor (--deadline-factor) must be a number >= 1, got {self.deadline_factor:g}")
        if not (self.deadline_floor > 0 and self.deadline_floor < float("inf")):
            raise ConfigError(f"deadline_floor (--deadline-floor) must be > 0 seconds, got {self.deadline_floor:g}")
        if not 0 < self.gpus_per_worker <= 1:
            raise ConfigError(f"gpus_per_worker (--gpus-per-worker) must be in (0, 1], got {self.gpus_per_worker:g}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers (--workers) must be >= 1, got {self.workers}")
        if self.min_gpus < 0:
            raise ConfigError(f"min_gpus (--min-gpus) must be >= 0, got {self.min_gpus}")
        if self.max_gpu_hours is not None and not (0 < self.max_gpu_hours < float("inf")):
            raise ConfigError(f"max_gpu_hours (--max-gpu-hours) must be a positive number, got {self.max_gpu_hours:g}")
        if self.efficiency is not None and not 0 < self.efficiency <= 1:
            raise ConfigError(f"efficiency (--efficiency) must be in (0, 1], got {self.efficiency:g}")

    def run_flags(self) -> list[str]:
        """The options as `robustsweep run` flags (those left at their defaults omitted), without --address."""
        flags = []
        if self.out != DEFAULT_OUT:
            flags += ["--out", self.out]
        if self.workers is not None:
            flags += ["--workers", str(self.workers)]
        if self.run_id is not None:
            flags += ["--run-id", self.run_id]
        if self.fresh:
            flags.append("--fresh")
        if self.endpoint_url is not None:
            flags += ["--endpoint-url", self.endpoint_url]
        if not self.report:
            flags.append("--no-report")
        if self.gpus_per_worker != 1.0:
            flags += ["--gpus-per-worker", f"{self.gpus_per_worker:g}"]
        if self.min_gpus:
            flags += ["--min-gpus", str(int(self.min_gpus))]
        if self.unit_timeout is not None:
            flags += ["--unit-timeout", f"{self.unit_timeout:g}"]
        if self.speculate:
            flags.append("--speculate")
        if self.deadline_factor != DEADLINE_FACTOR:
            flags += ["--deadline-factor", f"{self.deadline_factor:g}"]
        if self.deadline_floor != DEADLINE_FLOOR:
            flags += ["--deadline-floor", f"{self.deadline_floor:g}"]
        if self.max_gpu_hours is not None:
            flags += ["--max-gpu-hours", f"{self.max_gpu_hours:g}"]
        if self.device != "h100":
            flags += ["--device", self.device]
        if self.efficiency is not None:
            flags += ["--efficiency", f"{self.efficiency:g}"]
        return flags
