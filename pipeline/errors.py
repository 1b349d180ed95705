"""Errors a user can catch; each message names what is wrong and what to do about it."""


class RobustsweepError(Exception):
    """Base of every error raised on purpose by robustsweep."""


class DatasetError(RobustsweepError):
    """A dataset folder or file is missing, truncated or holds invalid values."""


class InputError(RobustsweepError, ValueError):
    """A tensor given to a model or defense has the wrong shape, range or values."""


class CheckpointError(RobustsweepError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


class ConfigError(RobustsweepError, ValueError):
    """A configuration table (defense, attack, model, job) is invalid; the message names the field."""


class GridError(RobustsweepError):
    """A grid split does not cover the defense's cells, or a defense cannot be split."""


def config_error(exc, where: str, tags: tuple[str, ...] = ()) -> ConfigError:
    """A ConfigError from a pydantic ValidationError: one clause per field, naming the field.

    Union members and discriminator tags (`tags`) that pydantic puts in an error's location
    are dropped, and the alternatives of one field are joined with "or".
    """
    by_field: dict[str, list[str]] = {}
    shown: dict[str, str] = {}
    for err in exc.errors():
        parts = ([where] if where else []) + [str(p) for p in err.get("loc", ())
                           if not (isinstance(p, str) and (p in tags or any(c in p for c in "[]-'")))]
        loc = ".".join(parts)
        by_field.setdefault(loc, [])
        if err.get("msg") not in by_field[loc]:
            by_field[loc].append(err.get("msg"))
        got = err.get("input")
        if err.get("type") != "missing" and not isinstance(got, dict):
            shown[loc] = f" (got {got!r})"
    lines = [f"{loc}: {' or '.join(msgs)}{shown.get(loc, '')}" for loc, msgs in by_field.items()]
    return ConfigError("; ".join(lines) if lines else str(exc))


class AttackError(RobustsweepError):
    """An attack produced an invalid result (outside its eps ball or the [0, 1] box)."""


class StoreError(RobustsweepError):
    """A results store cannot be reached or written, or holds a file or record that does not fit
    the record schema; the message names the path or field (never credentials)."""


class ClusterError(RobustsweepError):
    """A Ray cluster cannot be reached, refuses a request, or does not know a submission id; the
    message names the address and what to check (never credentials)."""


class BudgetError(ConfigError):
    """A job whose estimated device-hours are above its budget (max_gpu_hours / --max-gpu-hours)."""


class RunMismatchError(ConfigError):
    """A run id is reused with a job other than the one its plan.json records; the message names
    the fields that differ."""


class BadFileError(StoreError):
    """Files under a run's records/ that are unreadable, truncated, corrupted or not written by
    robustsweep; the message names each file and why (pass --skip-bad to go on without them)."""

    def __init__(self, message: str, files: dict[str, str] | None = None):
        super().__init__(message)
        self.files = dict(files or {})


class LeaseHeldError(StoreError):
    """Another driver holds the run folder's lease; the message says who (host, pid, since)."""


class LeaseLostError(StoreError):
    """Another driver took the run folder's lease over while this one ran (this one had stopped
    renewing it, cut off from S3 past its expiry); this driver stopped handing out units."""


class ClusterUnreachableError(ClusterError):
    """Nothing answers at a Ray cluster's address (after retrying); the message names it."""


class CommitRefusedError(StoreError):
    """A fenced commit found its file already there: another attempt of the unit committed first
    (a speculative copy, or a worker the driver had given up on); the file is left as it was."""


class CredentialsError(StoreError):
    """The store refuses who we are (no credentials, wrong key, access denied): retrying the same
    call from the same place cannot help."""
