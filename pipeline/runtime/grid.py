"""Grid sharding: one batch of examples, its cells split over a gang of actors.

A defense's output is finish(sum over cells of partial) (docs/ARCHITECTURE.md, "The grid").
A gang of G members holds the same defense; the grid is cut into G fixed shards, one per member:

    forward:   total = sum_s grid_partial(x_p, cells_s, draw)            (summed in shard order)
    backward:  dL/dx_p = sum_s grad_total^T d grid_partial(x_p, cells_s, draw) / dx_p

where x_p = purify(x) (LM for RDC). LM's N steps are sequential, but each step's gradient is a
mean over its m samples, so a gang splits every step's samples the same way. When an attack
asks for the exact derivative through LM, LM runs whole on the leader and only the ELBO is
sharded.

Members keep no state between calls: each call carries the input, its cells and the draw, and
backward recomputes its forward. A call whose member is lost goes to another member (or the
leader), and since the shards do not move and are summed in the same order, the answer has
the same bits.
"""

from __future__ import annotations

import torch
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, NodeDiedError, RayActorError, WorkerCrashedError

from pipeline.defenses.base import Defense
from pipeline.config.defense import DefenseSpec
from pipeline.errors import GridError
from pipeline.rng import Draw

LOST = (RayActorError, ActorDiedError, ActorUnavailableError, NodeDiedError, WorkerCrashedError, GetTimeoutError)


def member_call(defense: Defense, kind: str, x: torch.Tensor, cells: torch.Tensor, draw: Draw,
                extra: torch.Tensor | int | None) -> tuple[torch.Tensor, dict]:
    """What a gang member computes: (result, network evaluations spent). No state is kept.

    kind "partial": grid_partial(x, cells, draw); "vjp": extra^T d grid_partial / dx;
    "lm": the gradient of LM step `extra` over the samples `cells` (1-D indices).
    """
    defense.cost.reset()
    if kind == "partial":
        # Detached: the leader's x requires a gradient, and an engine that sees one takes input
        # gradients in forward, which the gang's backward (a VJP per member) would never use.
        with torch.no_grad():
            out = defense.grid_partial(x.detach(), cells, draw)
    elif kind == "vjp":
        out = defense.grid_partial_vjp(x, cells, draw, extra)
    elif kind == "lm":
        out = defense.lm.step_gradient(x, draw, int(extra), cells)
        n = x.shape[0] * cells.numel()
        defense.cost.forward += n
        defense.cost.backward += n
    else:
        raise GridError(f"unknown gang call {kind!r}")
    return out.detach().cpu(), defense.cost.as_dict()


class Gang:
    """G members evaluating one defense's grid: an optional local leader and remote actors.

    local: the leader's own defense, which computes shard 0 in this process (None: all
    shards remote). actors: Ray actor handles with a `grid_call(spec, kind, x, cells, draw,
    extra)` method (runtime/worker.py). table: the defense spec the actors build from.
    """

    def __init__(self, actors: list, table: DefenseSpec, local: Defense | None = None, timeout: float = 600.0):
        if not actors and local is None:
            raise GridError("a gang needs at least one member")
        self.table = table
        self.local = local
        self.actors = list(actors)
        self.alive = [True] * len(self.actors)
        self.timeout = timeout
        self.size = len(self.actors) + (local is not None)
        self.calls = 0  # gang calls made (tests watch this to kill a member mid-attack)
        self.retried = 0

    def _owner(self, shard: int):
        """The member that computes a shard: the leader (None) or an actor index.

        Shard s belongs to member s; a lost member's shards go to the next live actor, and
        to the leader when no actor is left.
        """
        if self.local is not None:
            if shard == 0:
                return None
            shard -= 1
        return self._live_actor(shard)

    def _live_actor(self, start: int) -> int | None:
        n = len(self.actors)
        for k in range(n):
            i = (start + k) % n
            if self.alive[i]:
                return i
        return None

    def map(self, kind: str, x: torch.Tensor, shards: list[torch.Tensor], draw: Draw, extra=None,
            cost=None) -> list[torch.Tensor]:
        """One call per shard (len(shards) <= size); results in shard order, lost calls redone."""
        if len(shards) > self.size:
            raise GridError(f"{len(shards)} shards for a gang of {self.size}")
        self.calls += 1
        x_cpu, extra_cpu = x.detach().cpu(), extra.detach().cpu() if isinstance(extra, torch.Tensor) else extra
        owners = [self._owner(s) for s in range(len(shards))]
        if self.local is None and any(o is None for o in owners):
            raise GridError(f"every member of the gang of {self.size} is lost")
        refs = {s: (o, self._submit(o, kind, x_cpu, shards[s], draw, extra_cpu))
                for s, o in enumerate(owners) if o is not None}
        results: dict[int, torch.Tensor] = {}
        for s, o in enumerate(owners):
            if o is None:
                results[s] = self._here(kind, x, shards[s], draw, extra, cost)
        for s, (owner, ref) in refs.items():
            results[s] = self._collect(s, owner, ref, kind, x, x_cpu, shards[s], draw, extra, extra_cpu, cost)
        return [results[s].to(x.device) for s in range(len(shards))]

    def _submit(self, owner: int, kind, x_cpu, cells, draw, extra_cpu):
        return self.actors[owner].grid_call.remote(self.table, kind, x_cpu, cells, draw, extra_cpu)

    def _here(self, kind, x, cells, draw, extra, cost):
        saved = self.local.cost.as_dict()
        out, spent = member_call(self.local, kind, x, cells, draw, extra)
        self.local.cost.forward, self.local.cost.backward = saved["forward"], saved["backward"]
        _add(cost, spent)
        return out

    def _collect(self, s, owner, ref, kind, x, x_cpu, cells, draw, extra, extra_cpu, cost):
        while True:
            try:
                out, spent = ray.get(ref, timeout=self.timeout)
                _add(cost, spent)
                return out
            except LOST:
                self.alive[owner] = False
                self.retried += 1
                nxt = self._live_actor(owner)
                if nxt is None:
                    if self.local is None:
                        raise GridError(f"every member of the gang is lost (shard {s} of {self.size})") from None
                    return self._here(kind, x, cells, draw, extra, cost)
                owner, ref = nxt, self._submit(nxt, kind, x_cpu, cells, draw, extra_cpu)

    def lost(self) -> list[int]:
        """Indices of the actors found lost during this gang's calls."""
        return [i for i, ok in enumerate(self.alive) if not ok]


def _add(cost, spent: dict) -> None:
    if cost is not None:
        cost.forward += spent["forward"]
        cost.backward += spent["backward"]


def split(cells: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """The grid cut into `parts` contiguous shards of near-equal size (fixed for the whole unit)."""
    return list(torch.tensor_split(cells, parts))


def _sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """The members' results added in shard order, so a redone call leaves the same bits."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


class _GangSum(torch.autograd.Function):
    """total = sum over shards of grid_partial(x_p, shard); backward sums the members' VJPs."""

    @staticmethod
    def forward(ctx, x_p, gang, shards, draw, cost):
        ctx.gang, ctx.shards, ctx.draw, ctx.cost = gang, shards, draw, cost
        ctx.save_for_backward(x_p)
        return _sum(gang.map("partial", x_p, shards, draw, cost=cost))

    @staticmethod
    def backward(ctx, grad_total):
        (x_p,) = ctx.saved_tensors
        grads = ctx.gang.map("vjp", x_p, ctx.shards, ctx.draw, extra=grad_total.detach(), cost=ctx.cost)
        return _sum(grads), None, None, None, None


class GridReducer:
    """The `reducer` a defense calls while sharded: purify (LM split by samples), then the gang sum."""

    def __init__(self, gang: Gang):
        self.gang = gang

    def __call__(self, defense: Defense, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        gang = self.gang
        lm = getattr(defense, "lm", None)
        if lm is not None and lm.samples >= 2 and gang.size >= 2 and not lm.needs_graph(x):
            samples = split(torch.arange(lm.samples), min(gang.size, lm.samples))

            def step_gradient(x_prime: torch.Tensor, step: int) -> torch.Tensor:
                return _sum(gang.map("lm", x_prime, samples, draw, extra=step, cost=defense.cost))

            x_p = defense.purify(x, draw, gradient=step_gradient)
        else:
            x_p = defense.purify(x, draw)
        shards = defense.shards(gang.size)
        return _GangSum.apply(x_p, gang, shards, draw, defense.cost)


def shard(defense: Defense, gang: Gang | None) -> Defense:
    """Evaluate `defense` through `gang` from now on (None: locally again). Returns the defense."""
    defense.reducer = None if gang is None else GridReducer(gang)
    return defense
