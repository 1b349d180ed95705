"""What every defense shares: input checks, randomness binding, and the grid protocol.

A defense is an `nn.Module` from x (B, C, H, W) in [0, 1] to logits (B, K). Its output is a
reduction over independent cells (docs/ARCHITECTURE.md, "The grid"):

    forward(x) = finish(x, sum over cells c of partial(x, [c], draw), draw)

`grid()` lists the cells as an int64 tensor (n_cells, k); `partial` of any subset of rows of
that tensor gives the additive piece of those cells; `finish` maps the sum to logits (the
identity for RDC, a log of averaged probabilities for MI). `partial_vjp` gives the
vector-Jacobian product of a partial, so a sharded defense can sum gradients across workers.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import GridError, InputError
from pipeline.rng import Draw, DrawCounter


def check_input(x: torch.Tensor, channels: int, size: int | None, who: str) -> None:
    """Raise InputError unless x is a finite float (B, channels, size, size) tensor in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{who}: input must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{who}: input must be a float tensor of images in [0, 1], got dtype {x.dtype}")
    if x.dim() != 4:
        raise InputError(f"{who}: input must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise InputError(f"{who}: input has {x.shape[1]} channels, expected {channels} (shape {tuple(x.shape)})")
    if size is not None and tuple(x.shape[2:]) != (size, size):
        raise InputError(f"{who}: input images are {x.shape[2]}x{x.shape[3]}, expected {size}x{size}")
    if x.numel() == 0:
        return
    x = x.detach()
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InputError(f"{who}: input holds {bad} NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InputError(f"{who}: input values must lie in [0, 1], found range [{lo:.4g}, {hi:.4g}]")


def check_labels(y: torch.Tensor, n: int, num_classes: int, who: str) -> None:
    """Raise InputError unless y is an integer tensor (n,) of classes in [0, num_classes)."""
    if not isinstance(y, torch.Tensor):
        raise InputError(f"{who}: labels must be a torch.Tensor, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(f"{who}: labels must be an integer tensor, got dtype {y.dtype}")
    if tuple(y.shape) != (n,):
        raise InputError(f"{who}: labels must have shape ({n},), one per image, got {tuple(y.shape)}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"{who}: labels must lie in [0, {num_classes}) for a {num_classes}-class defense, found "
                         f"range [{int(y.min())}, {int(y.max())}]")


def _vjp(fn, x: torch.Tensor, cells: torch.Tensor, draw: Draw, grad_total: torch.Tensor) -> torch.Tensor:
    """grad_total^T d fn(x, cells, draw) / dx by autograd, zeros where fn does not depend on x."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = fn(xg, cells, draw)
        (g,) = torch.autograd.grad(out, xg, grad_total.to(out), allow_unused=True)
    return torch.zeros_like(x) if g is None else g


class Cost:
    """Network evaluations spent by a defense: images through a network, forward and backward."""

    def __init__(self):
        self.forward = 0
        self.backward = 0

    def reset(self) -> None:
        self.forward = self.backward = 0

    def count(self, output: torch.Tensor, n: int) -> torch.Tensor:
        """Count n network evaluations in `output`, and n more when a gradient flows back through it."""
        self.forward += n
        if output.requires_grad:
            def on_backward(grad):
                self.backward += n
            output.register_hook(on_backward)
        return output

    def as_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward}


class Defense(nn.Module):
    """Base class; subclasses set `stochastic`, implement `grid`, `partial` and maybe `finish`.

    Randomness: a stochastic defense numbers the calls of each example, so repeated calls
    (EOT) see fresh draws that a rerun reproduces. The example ids of the rows come from
    `bind(ids)`; unbound, row i is example i.

    What an attacker may see is declared here, not probed: `name` (the records' name; build_defense
    sets the planned one), `stochastic`, `likelihood_maximization()` and `base_classifier()`.
    """

    stochastic = False
    cell_columns = 1  # the width of a row of grid(); checked on every partial without building the grid
    def __init__(self, num_classes: int, in_channels: int, image_size: int | None, seed: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.draws = DrawCounter(seed)
        self.cost = Cost()
        self._bound: torch.Tensor | None = None
        self.name = type(self).__name__

    # --- what an attacker may see ---------------------------------------------------------
    def likelihood_maximization(self) -> nn.Module | None:
        """The purification step whose gradient mode an attack may set (its `gradient`:
        "bpda" or "exact"); None for a defense without one."""
        return None

    def base_classifier(self) -> "Defense | None":
        """The classifier under the defense, as a deterministic defense of its own (what an
        oblivious attack differentiates); None for a defense that has none."""
        return None

    def precision(self, device: torch.device | str) -> str:
        """The precision the defense's networks run in on this kind of device (the records'
        `precision`): "float32" unless a subclass runs them under autocast."""
        return "float32"

    # --- randomness -------------------------------------------------------------------
    def bind(self, example_ids, seed: int | None = None) -> "Defense":
        """Name the example ids of the rows of the next calls (and optionally restart the seed)."""
        self._bound = None if example_ids is None else torch.as_tensor(example_ids, dtype=torch.int64).reshape(-1).cpu()
        if seed is not None:
            self.draws.reset(seed)
        return self

    def next_draw(self, batch: int) -> Draw:
        """The Draw of the next call on `batch` rows (bound ids, or 0..batch-1)."""
        ids = self._bound if self._bound is not None else torch.arange(batch)
        if ids.numel() == 1 and batch != 1:
            ids = ids.expand(batch)  # an attack on one example may send several variants of it
        if ids.numel() != batch:
            raise InputError(f"{type(self).__name__}: bound to {ids.numel()} example ids but got {batch} rows; call bind() with the ids of this batch")
        if not self.stochastic:
            return Draw(self.draws.seed, ids, torch.zeros_like(ids))
        return self.draws.next(ids)

    # --- the grid protocol --------------------------------------------------------------
    # A sharded evaluation: None, or a callable (defense, x, draw) -> the sum of partials over
    # the whole grid, computed elsewhere (runtime/grid.py sets it for the length of a unit).
    reducer = None

    def grid(self) -> torch.Tensor:
        """The cells, int64 (n_cells, cell_columns)."""
        return torch.zeros(1, self.cell_columns, dtype=torch.int64)

    def partial(self, x: torch.Tensor, cells: torch.Tensor, draw: Draw) -> torch.Tensor:
        """The additive contribution of `cells` (rows of grid()) for inputs x (B, C, H, W)."""
        raise NotImplementedError

    def shards(self, parts: int) -> list[torch.Tensor]:
        """The grid cut into at most `parts` contiguous shards of near-equal size, for a gang."""
        cells = self.grid()
        return list(torch.tensor_split(cells, min(parts, cells.shape[0])))

    def purify(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        """The class-independent step in front of the grid (LM for RDC); the identity here."""
        return x

    def grid_partial(self, x_p: torch.Tensor, cells: torch.Tensor, draw: Draw) -> torch.Tensor:
        """`partial` at an input already purified: partial(x) = grid_partial(purify(x))."""
        return self.partial(x_p, cells, draw)

    def grid_partial_vjp(self, x_p: torch.Tensor, cells: torch.Tensor, draw: Draw, grad_total: torch.Tensor) -> torch.Tensor:
        """grad_total^T d grid_partial(x_p, cells) / dx_p, shape of x_p."""
        return _vjp(self.grid_partial, x_p, cells, draw, grad_total)

    def finish(self, x: torch.Tensor, total: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Logits (B, K) from the sum of partials over the whole grid."""
        return total

    def partial_vjp(self, x: torch.Tensor, cells: torch.Tensor, draw: Draw, grad_total: torch.Tensor) -> torch.Tensor:
        """grad_total^T d partial(x, cells) / dx, shape of x."""
        return _vjp(self.partial, x, cells, draw, grad_total)

    def check_cells(self, cells: torch.Tensor) -> None:
        if cells.dim() != 2 or cells.shape[1] != self.cell_columns:
            raise GridError(f"{type(self).__name__}: cells must be int64 (n, {self.cell_columns}), got {tuple(cells.shape)}")

    # --- evaluation ---------------------------------------------------------------------
    def evaluate(self, x: torch.Tensor, draw: Draw, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for x under an explicit draw (no call counting): finish(sum of partials)."""
        if cells is None and self.reducer is not None:
            return self.finish(x, self.reducer(self, x, draw), draw)
        cells = self.grid() if cells is None else cells
        return self.finish(x, self.partial(x, cells, draw), draw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits float32 (B, K) of images x (B, C, H, W) in [0, 1]. Any float dtype is taken:
        float16, bfloat16 and float64 are cast to float32 (differentiably), the precision the
        defense computes in (the engine's autocast is its own, inside); integer images (uint8)
        are refused with InputError, since their scale is not [0, 1]."""
        check_input(x, self.in_channels, self.image_size, type(self).__name__)
        if x.dtype != torch.float32:
            x = x.float()
        if x.shape[0] == 0:
            return x.new_zeros(0, self.num_classes)
        return self.evaluate(x, self.next_draw(x.shape[0]))
