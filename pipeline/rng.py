"""Counter-based randomness: every draw is a pure function of (seed, example id, call, stream, index).

A defense or attack never consumes a stateful generator. The noise of an RDC timestep, an MI
draw, an LM step, is hashed from its coordinates, so it does not depend on batch size,
example order, worker count, grid split or retry. Hashing is integer arithmetic on CPU
(exact on any machine); floats are formed in float64 on CPU and then cast and moved, so
the same draw has the same bits on every device.

The mixer is `lowbias32` (C. Wellons' hash-prospector), applied Merkle-Damgard style to
32-bit words. Values are held in int64 tensors below 2**32; products are split so that
nothing overflows int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9

# Streams: one tag per kind of draw, so two kinds never share numbers.
ELBO_NOISE = 1
LM_TIMESTEP = 2
LM_NOISE = 3
MI_CLASS = 4
MI_SAMPLE = 5
ATTACK = 6
SCORE = 7


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h: torch.Tensor, word: torch.Tensor | int) -> torch.Tensor:
    """Fold one word (any int64, taken as two 32-bit halves) into the running hash h."""
    if isinstance(word, int):
        word = torch.tensor(word, dtype=torch.int64)
    h = _mix(h ^ (word & _M32))
    h = _mix((h + _GOLDEN) & _M32 ^ ((word >> 32) & _M32))
    return h


def hash_words(*words: torch.Tensor | int) -> torch.Tensor:
    """A 32-bit hash (int64 tensor in [0, 2**32)) of the broadcast of the words."""
    h = torch.tensor(0x2545F491, dtype=torch.int64)
    for w in words:
        h = _absorb(h, torch.as_tensor(w, dtype=torch.int64).cpu())
    return h


def uniform(*words: torch.Tensor | int) -> torch.Tensor:
    """float64 in (0, 1), one per element of the broadcast words, on CPU."""
    return (hash_words(*words).double() + 0.5) / 2.0**32


def seed_of(*words: int) -> int:
    """A derived 63-bit seed for a sub-task (a pass, a restart) from integer words."""
    hi = int(hash_words(*words, 1))
    lo = int(hash_words(*words, 2))
    return ((hi << 32) | lo) & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Draw:
    """The randomness of one call of a defense on a batch.

    seed: the job (or pass) seed; example_ids: int64 (B,), the example id of each row;
    calls: int64 (B,), how many calls of the defense this example has seen before, so that
    repeated calls (EOT, restarts) draw fresh numbers that are still reproducible.
    """

    seed: int
    example_ids: torch.Tensor
    calls: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.example_ids.shape[0])

    def _prefix(self, stream: int) -> torch.Tensor:
        """Hash of (seed, stream, example id, call) per row: int64 (B,)."""
        return hash_words(self.seed, stream, self.example_ids.cpu(), self.calls.cpu())

    def uniform(self, stream: int, index: torch.Tensor) -> torch.Tensor:
        """float64 (B, *index.shape) in (0, 1): the draw `index` of each row."""
        pre = self._prefix(stream).view((-1,) + (1,) * index.dim())
        return (_absorb(pre, index.cpu().long()).double() + 0.5) / 2.0**32

    def integers(self, stream: int, index: torch.Tensor, high: torch.Tensor | int) -> torch.Tensor:
        """int64 (B, *index.shape), uniform in [0, high) (high broadcast against the result)."""
        u = self.uniform(stream, index)
        return torch.minimum((u * torch.as_tensor(high)).floor().long(), torch.as_tensor(high) - 1)

    def normal(self, stream: int, index: torch.Tensor, shape: tuple[int, ...],
               dtype=torch.float32, device=None) -> torch.Tensor:
        """Standard normals (B, len(index), *shape): a fresh field per (row, index) by Box-Muller."""
        n_el = math.prod(shape)
        pre = _absorb(self._prefix(stream).view(-1, 1), index.cpu().long().view(1, -1))  # (B, n)
        el = torch.arange(n_el, dtype=torch.int64)
        h1 = _mix(pre.unsqueeze(-1) ^ (2 * el))
        h2 = _mix(((pre.unsqueeze(-1) + _GOLDEN) & _M32) ^ (2 * el + 1))
        u1 = (h1.double() + 0.5) / 2.0**32
        u2 = (h2.double() + 0.5) / 2.0**32
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return z.to(dtype).view(self.batch, index.numel(), *shape).to(device or "cpu")

    def subset(self, rows: torch.Tensor) -> "Draw":
        """The draw of a subset of the rows (same numbers for the same examples)."""
        rows = rows.cpu()
        return Draw(self.seed, self.example_ids.cpu()[rows], self.calls.cpu()[rows])


class DrawCounter:
    """Hands out Draws and counts the calls of each example, so that EOT sees fresh noise.

    The state is the seed and one counter per example id; `reset` starts over, so a rerun of
    the same sequence of calls reproduces the same numbers.
    """

    def __init__(self, seed: int = 0):
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.seed = int(seed)
        self._calls: dict[int, int] = {}

    def next(self, example_ids: torch.Tensor) -> Draw:
        """The Draw of one call; a row whose id repeats in the batch counts as a further call."""
        ids = example_ids.detach().cpu().long()
        calls = []
        for i in ids.tolist():
            n = self._calls.get(i, 0)
            calls.append(n)
            self._calls[i] = n + 1
        return Draw(self.seed, ids, torch.tensor(calls, dtype=torch.int64))
