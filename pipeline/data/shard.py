"""Deterministic sharding of a split into units of example ids.

An example id is the row index in its split (as returned by `load_split`). Sharding is a pure
function of its arguments, so a planner that runs twice makes the same shards, and a unit's
content hash (and so its resume key) stays stable.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError, DatasetError


@dataclass(frozen=True)
class Shard:
    """One unit of examples: its position among the shards and its example ids, in order."""

    index: int
    example_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.example_ids)


def make_shards(n_examples: int, shard_size: int, ids: Sequence[int] | None = None,
                limit: int | None = None) -> list[Shard]:
    """Cut the example ids of a split of `n_examples` into shards of at most `shard_size`.

    ids: the examples to cover, in the order given (default: 0 .. n_examples-1); each must be
    in [0, n_examples) and appear once. limit: keep only the first `limit` of them.
    Every kept id lands in exactly one shard; only the last shard may be shorter.
    Raises ConfigError for shard_size < 1, limit < 0, non-integer or repeated ids, and
    DatasetError for an id outside the split.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be an integer >= 0 or None, got {limit!r}")
    chosen = _checked_ids(n_examples, ids)
    if limit is not None:
        chosen = chosen[:limit]
    return [Shard(i, chosen[start:start + shard_size])
            for i, start in enumerate(range(0, len(chosen), shard_size))]


def _checked_ids(n_examples: int, ids: Sequence[int] | None) -> tuple[int, ...]:
    if n_examples < 0:
        raise ConfigError(f"n_examples must be >= 0, got {n_examples}")
    if ids is None:
        return tuple(range(n_examples))
    chosen = tuple(_as_id(i) for i in ids)
    _check_in_range(chosen, n_examples, "split")
    repeated = sorted(i for i, count in Counter(chosen).items() if count > 1)
    if repeated:
        raise ConfigError(f"example ids must be distinct; repeated: {repeated[:10]}")
    return chosen


def _as_id(value) -> int:
    # operator.index accepts Python and numpy integers but refuses floats like 3.0 or 3.5,
    # which would otherwise pick a row silently.
    if isinstance(value, bool):
        raise ConfigError(f"example id must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError as err:
        raise ConfigError(f"example id must be an integer, got {value!r}") from err


def _check_in_range(ids: Sequence[int], n_examples: int, what: str) -> None:
    bad = [i for i in ids if not 0 <= i < n_examples]
    if bad:
        raise DatasetError(f"example ids {bad[:10]}{' ...' if len(bad) > 10 else ''} are out of range "
                           f"for a {what} of {n_examples} examples (ids 0..{n_examples - 1})")


def select(x: torch.Tensor, y: torch.Tensor, ids: Sequence[int] | Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (x, y) for these example ids, in their order: x (len(ids), ...), y (len(ids),).

    Raises DatasetError naming ids outside [0, len(x)), or when x and y differ in length.
    """
    if len(x) != len(y):
        raise DatasetError(f"x has {len(x)} rows but y has {len(y)}; they must describe the same examples")
    chosen = ids.example_ids if isinstance(ids, Shard) else tuple(_as_id(i) for i in ids)
    _check_in_range(chosen, len(x), "split")
    index = torch.tensor(chosen, dtype=torch.long)
    return x[index], y[index]
