"""Counter-based randomness: every draw is a pure function of (seed, example id, call, stream, index).

A defense or attack never consumes a stateful generator. The noise of an RDC timestep, an MI
draw, an LM step, is hashed from its coordinates, so it does not depend on batch size,
example order, worker count, grid split or retry.

The mixer is `lowbias32` (C. Wellons' hash-prospector), applied Merkle-Damgard style to
32-bit words. Two implementations compute the same integers:

- the reference (`hash_words`, `reference_uniform`, `reference_normal`): int64 tensors below
  2**32 on the CPU, products split so that nothing overflows int64; floats formed in float64
  on the CPU, then cast and moved;
- the device path (`Draw.uniform`, `Draw.integers`, `Draw.normal`): the same hash computed on
  the device that consumes the draw. Per-row words use the int64 mixer; the per-element mixer
  runs in int32 lanes, where a product wraps modulo 2**32 (torch's integer multiply on CPU and
  CUDA) and right shifts are masked to be logical, so its bits are those of the reference.
  Uniforms are (h + 0.5) / 2**32 in float64, exact everywhere. Normals use the reference's
  Box-Muller transform in float64 and are cast on the device. On a CPU a large field is one
  torch.compile'd kernel instead of dozens of tensor passes (`compiled_field`); it calls the
  same vectorised log and cos as eager torch, so on a CPU every path gives the reference's bits
  (tested). On CUDA, float64 log and cos come from CUDA's math library: a float64 normal may
  differ from the CPU's in its last few bits and a float32 normal by at most one unit in the
  last place (docs/math.md, "Randomness"; tests/test_rng.py and the gpu tests hold them to it).
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
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

# Normal fields of at least this many values go through the compiled CPU kernel; smaller ones
# run eager (the same bits), so that a small draw never waits for a compilation.
COMPILE_MIN_ELEMENTS = 1 << 20


# --- the mixer on int64 words below 2**32 (reference, and per-row words on any device) -----
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
        word = torch.tensor(word, dtype=torch.int64, device=h.device)
    h = _mix(h ^ (word & _M32))
    h = _mix((h + _GOLDEN) & _M32 ^ ((word >> 32) & _M32))
    return h


# --- the same mixer on Python integers (scalar words: derived seeds, a draw's seed and stream) --
_START = 0x2545F491


def _mix_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _absorb_int(h: int, word: int) -> int:
    """_absorb on a Python integer state and word (Python's >> on a negative int is
    arithmetic, as torch's is on int64, so the halves are the same)."""
    h = _mix_int(h ^ (word & _M32))
    return _mix_int(((h + _GOLDEN) & _M32) ^ ((word >> 32) & _M32))


def _leading_ints(words: tuple) -> tuple[int, tuple]:
    """The hash state after the leading Python-integer words, and the words left (tensors).

    A dozen tensor operations cost far more than the arithmetic on a scalar, and every draw
    starts from scalar words (the seed, the stream), so those are absorbed in Python."""
    h, i = _START, 0
    while i < len(words) and not isinstance(words[i], torch.Tensor):
        h = _absorb_int(h, operator.index(words[i]))
        i += 1
    return h, words[i:]


def hash_words(*words: torch.Tensor | int) -> torch.Tensor:
    """A 32-bit hash (int64 tensor in [0, 2**32)) of the broadcast of the words, on CPU."""
    h = torch.tensor(_START, dtype=torch.int64)
    for w in words:
        h = _absorb(h, torch.as_tensor(w, dtype=torch.int64).cpu())
    return h


def _hash_on(device: torch.device, *words: torch.Tensor | int) -> torch.Tensor:
    """hash_words computed on `device` (the same integers)."""
    start, words = _leading_ints(words)
    h = torch.tensor(start, dtype=torch.int64, device=device)
    for w in words:
        h = _absorb(h, torch.as_tensor(w, dtype=torch.int64).to(device))
    return h


# --- the same mixer in int32 lanes (the device path's per-element work) ---------------------
def _signed32(c: int) -> int:
    """The int32 with the bits of c in [0, 2**32)."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 x in [0, 2**32) as the int32 with the same low 32 bits (no out-of-range cast)."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _mix_i32(x: torch.Tensor) -> torch.Tensor:
    """_mix on int32 lanes: multiplies wrap mod 2**32, right shifts masked to be logical."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _signed32(0x7FEB352D)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _signed32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def _unit(h: torch.Tensor) -> torch.Tensor:
    """float64 in (0, 1) from a 32-bit hash (int64 in [0, 2**32)): (h + 0.5) / 2**32, exact."""
    return (h.double() + 0.5) / 2.0**32


def _box_muller(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """sqrt(-2 log u1) cos(2 pi u2) in float64, u the uniforms of the hashes h1, h2."""
    return torch.sqrt(-2.0 * torch.log(_unit(h1))) * torch.cos(2.0 * math.pi * _unit(h2))


def normal_field(pre: torch.Tensor, n_el: int, dtype: torch.dtype) -> torch.Tensor:
    """Normals (R, n_el) in dtype on pre's device: value e of row r from the row hash pre[r].

    u1 hashes pre ^ 2e, u2 hashes ((pre + golden) mod 2**32) ^ (2e + 1), as the reference does.
    """
    el2 = 2 * torch.arange(n_el, dtype=torch.int32, device=pre.device)
    p = pre.reshape(-1, 1)
    h1 = _mix_i32(_to_int32(p) ^ el2).long() & _M32
    h2 = _mix_i32(_to_int32((p + _GOLDEN) & _M32) ^ (el2 + 1)).long() & _M32
    return _box_muller(h1, h2).to(dtype)


@functools.lru_cache(maxsize=1)
def compiled_field():
    """normal_field as one torch.compile'd CPU kernel (dynamic shapes: one compilation per dtype)."""
    return torch.compile(normal_field, dynamic=True)


_EAGER_ONLY: list[str] = []  # why the compiled kernel is not used in this process, once it failed


def _field(pre: torch.Tensor, n_el: int, dtype: torch.dtype) -> torch.Tensor:
    """normal_field, through the compiled kernel where it pays (a large field on a CPU)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    R = pre.numel()
    if (pre.device.type != "cpu" or R * n_el < COMPILE_MIN_ELEMENTS or _EAGER_ONLY
            or _get_current_dispatch_mode() is not None):  # a FLOP counter or profiler mode: stay eager
        return normal_field(pre, n_el, dtype)
    try:
        # Sizes 0 and 1 would compile a specialised kernel of their own: pad to >= 2 (values
        # are elementwise, so the padding changes none of the others).
        rows = pre.reshape(-1)
        padded = torch.cat([rows, rows[:1]]) if R == 1 else rows
        return compiled_field()(padded, max(n_el, 2), dtype)[:R, :n_el]
    except Exception as exc:  # no C++ compiler, an inductor failure: the eager path gives the same bits
        _EAGER_ONLY.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"rng: the compiled CPU kernel is unavailable ({_EAGER_ONLY[0][:200]}); drawing eagerly",
                      RuntimeWarning, stacklevel=2)
        return normal_field(pre, n_el, dtype)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable floats lie between a and b, elementwise (int64; float32 or float64)."""
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"ulps_apart needs two float32 or two float64 tensors, got {a.dtype} and {b.dtype}")
    bits = torch.int32 if a.dtype == torch.float32 else torch.int64
    sign = torch.iinfo(bits).min

    def ordered(x):  # the float's bits as an integer that grows with the float
        i = x.contiguous().view(bits).long()
        return torch.where(i < 0, sign - i, i)

    return (ordered(a) - ordered(b.to(a.device))).abs()


def seed_of(*words: int) -> int:
    """A derived 63-bit seed for a sub-task (a pass, a restart) from integer words."""
    h = _START
    for w in words:
        h = _absorb_int(h, operator.index(w))
    hi, lo = _absorb_int(h, 1), _absorb_int(h, 2)
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

    def _prefix(self, stream: int, device=None) -> torch.Tensor:
        """Hash of (seed, stream, example id, call) per row: int64 (B,), on device (default CPU)."""
        return _hash_on(torch.device(device or "cpu"), self.seed, stream, self.example_ids, self.calls)

    def _rows(self, stream: int, index: torch.Tensor, device) -> torch.Tensor:
        """Hash of (prefix, index) per row and index: int64 (B, *index.shape) on device."""
        pre = self._prefix(stream, device).view((-1,) + (1,) * index.dim())
        return _absorb(pre, index.long().to(pre.device))

    def uniform(self, stream: int, index: torch.Tensor, device=None) -> torch.Tensor:
        """float64 (B, *index.shape) in (0, 1): the draw `index` of each row, on device (default CPU)."""
        return _unit(self._rows(stream, index, device))

    def integers(self, stream: int, index: torch.Tensor, high: torch.Tensor | int, device=None) -> torch.Tensor:
        """int64 (B, *index.shape), uniform in [0, high) (high broadcast against the result)."""
        u = self.uniform(stream, index, device)
        high = torch.as_tensor(high).to(u.device)
        return torch.minimum((u * high).floor().long(), high - 1)

    def normal(self, stream: int, index: torch.Tensor, shape: tuple[int, ...],
               dtype=torch.float32, device=None) -> torch.Tensor:
        """Standard normals (B, len(index), *shape) on device: a fresh field per (row, index) by Box-Muller."""
        pre = self._rows(stream, index.reshape(-1), device)  # (B, n)
        z = _field(pre, math.prod(shape), dtype)
        return z.view(self.batch, index.numel(), *shape)

    def subset(self, rows: torch.Tensor) -> "Draw":
        """The draw of a subset of the rows (same numbers for the same examples)."""
        rows = rows.cpu()
        return Draw(self.seed, self.example_ids.cpu()[rows], self.calls.cpu()[rows])


# --- the reference: hashed on the CPU in int64, floats formed in float64, cast and moved ----
def reference_uniform(draw: Draw, stream: int, index: torch.Tensor) -> torch.Tensor:
    """Draw.uniform as computed on the CPU before the device path: float64 (B, *index.shape)."""
    pre = hash_words(draw.seed, stream, draw.example_ids.cpu(), draw.calls.cpu()).view((-1,) + (1,) * index.dim())
    return (_absorb(pre, index.cpu().long()).double() + 0.5) / 2.0**32


def reference_integers(draw: Draw, stream: int, index: torch.Tensor, high: torch.Tensor | int) -> torch.Tensor:
    """Draw.integers as computed on the CPU before the device path."""
    u = reference_uniform(draw, stream, index)
    return torch.minimum((u * torch.as_tensor(high)).floor().long(), torch.as_tensor(high) - 1)


def reference_normal(draw: Draw, stream: int, index: torch.Tensor, shape: tuple[int, ...],
                     dtype=torch.float32, device=None) -> torch.Tensor:
    """Draw.normal as computed on the CPU before the device path (int64 passes, float64 Box-Muller)."""
    n_el = math.prod(shape)
    pre = hash_words(draw.seed, stream, draw.example_ids.cpu(), draw.calls.cpu())
    pre = _absorb(pre.view(-1, 1), index.cpu().long().view(1, -1))  # (B, n)
    el = torch.arange(n_el, dtype=torch.int64)
    h1 = _mix(pre.unsqueeze(-1) ^ (2 * el))
    h2 = _mix(((pre.unsqueeze(-1) + _GOLDEN) & _M32) ^ (2 * el + 1))
    u1 = (h1.double() + 0.5) / 2.0**32
    u2 = (h2.double() + 0.5) / 2.0**32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype).view(draw.batch, index.numel(), *shape).to(device or "cpu")


def uniform(*words: torch.Tensor | int) -> torch.Tensor:
    """float64 in (0, 1), one per element of the broadcast words, on CPU."""
    return (hash_words(*words).double() + 0.5) / 2.0**32


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
