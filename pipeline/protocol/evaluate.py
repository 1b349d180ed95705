"""evaluate(defense, attack, x, y, example_ids, seed) -> one record per example.

The protocol for stochastic defenses (Carlini et al. 2019; Croce et al. 2022; Lee & Kim 2023):

1. a unit's examples are attacked together (or one at a time, `batched = false`), the attack's
   and the defense's draws seeded by (seed, the unit's example ids), so a record depends on
   the job and its unit, never on the worker, the order or a resume;
2. the attacker sees the whole defense (adaptive; through LM by BPDA or exactly), its base
   classifier (oblivious), or a surrogate (transfer);
3. every decision of the attack (is an example still correct, did a stage break it, which
   point to keep) is taken over S fresh passes of the model it attacks, never one
   (pipeline.attacks.selection); with `converge` the attack reruns with doubled budgets;
4. the adversarial example is checked against its eps ball and [0, 1] (a violation raises);
5. the defense then scores clean and adversarial inputs in R passes with fresh seeds:
   single-pass, majority-vote and worst-case (all passes) correctness;
6. sanity flags (pipeline.protocol.checks) and costs (network passes, seconds) go into the record.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from pipeline import rng
from pipeline.attacks.autoattack import build_autoattack, eot_iterations, run_autoattack
from pipeline.attacks.pgd import pgd_attack
from pipeline.attacks.selection import Selection, model_score
from pipeline.config.attack import AttackSpec, attack_name as spec_name, crafting, parse_attack
from pipeline.defenses.base import Defense, check_input, check_labels
from pipeline.defenses.plain import Plain
from pipeline.errors import ConfigError
from pipeline.protocol.checks import (TOLERANCE, check_perturbation, gradient_flags, norms, record_flags,
                                      sweep_flags)
from pipeline.protocol.predict import predict

__all__ = ["evaluate", "check_perturbation", "sweep_flags", "norms", "TOLERANCE", "pass_seed", "unit_seed"]

_SELECT = 0x5E1EC7  # the tag of the selection passes' seeds, apart from the scoring passes'


def pass_seed(seed: int, r: int) -> int:
    """The seed of scoring pass r: fresh draws, the same for clean and adversarial inputs."""
    return rng.seed_of(seed, rng.SCORE, r)


def example_seed(seed: int, example_id: int) -> int:
    """The seed of one example's attack in per-example mode."""
    return rng.seed_of(seed, rng.ATTACK, example_id)


def unit_seed(seed: int, example_ids) -> int:
    """The seed of a batched attack on the examples `example_ids` (in their order)."""
    h = rng.seed_of(seed, rng.ATTACK, len(example_ids))
    for i in example_ids:
        h = rng.seed_of(h, int(i))
    return h


class _Counted(nn.Module):
    """The model an attack sees: counts its calls (queries) and the gradients taken through it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.queries = 0
        self.gradients = 0

    def forward(self, x):
        out = self.model(x)
        self.queries += x.shape[0]
        if out.requires_grad:
            def count(grad):
                self.gradients += x.shape[0]
            out.register_hook(count)
        return out


@contextlib.contextmanager
def lm_gradient(defense: nn.Module, mode: str | None):
    """Temporarily set how gradients cross the defense's likelihood maximization."""
    lm = getattr(defense, "lm", None)
    if mode is None or lm is None:
        yield
        return
    before = lm.gradient
    lm.gradient = mode
    try:
        yield
    finally:
        lm.gradient = before


def _scores(defense: Defense, x: torch.Tensor, ids: torch.Tensor, seed: int, passes: int, batch_size: int):
    """Logits (R, B, K) of R scoring passes, batched (the draws do not depend on batching)."""
    return torch.stack([predict(defense, x, ids, seed=pass_seed(seed, r), batch_size=batch_size) for r in range(passes)])


def _pass_columns(prefix: str, logits: torch.Tensor, label: int) -> dict:
    """The columns of R scoring passes (R, K) of one input: first pass, majority vote, worst case."""
    preds = logits.argmax(-1)
    vote = int(torch.bincount(preds, minlength=logits.shape[-1]).argmax())  # ties: the smallest label
    correct = preds == label
    return {
        f"{prefix}_pred": int(preds[0]),
        f"{prefix}_correct": bool(correct[0]),
        f"{prefix}_vote_pred": vote,
        f"{prefix}_vote_correct": vote == label,
        f"{prefix}_worst_correct": bool(correct.all()),
        f"{prefix}_pass_accuracy": float(correct.double().mean()),
    }


def _attacked_model(defense: Defense, spec, surrogate: nn.Module | None) -> tuple[nn.Module, str]:
    """The module the attacker differentiates, and the path name for the record."""
    if spec.kind == "transfer":
        return surrogate, "transfer:" + getattr(surrogate, "name", type(surrogate).__name__)
    if spec.path == "oblivious":
        base = getattr(defense, "classifier", None)
        if base is None:
            raise ConfigError(f"attack.path: 'oblivious' attacks a defense's base classifier; {type(defense).__name__} has none")
        return Plain(base, defense.num_classes, defense.in_channels, defense.image_size), "oblivious"
    path = "adaptive"
    lm = getattr(defense, "lm", None)
    if lm is not None:
        path += "+" + (spec.lm_gradient or lm.gradient)
    return defense, path


def _selection(counted: _Counted, attacked: nn.Module, x, y, ids, group_seed: int, passes: int,
               batch_size: int) -> Selection:
    """A Selection judging by `passes` fresh passes of the attacked model (one if deterministic)."""
    if not getattr(attacked, "stochastic", False):
        return Selection(x, y, model_score(counted, 1))
    base = rng.seed_of(group_seed, _SELECT)

    def score(xs: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
        counted.queries += passes * xs.shape[0]
        rows_ids = ids[rows.cpu()]
        return torch.stack([predict(attacked, xs, rows_ids, seed=rng.seed_of(base, k, s), batch_size=batch_size)
                            for s in range(passes)]).to(xs.device)
    return Selection(x, y, score)


def _scaled(inner, factor: int, stochastic: bool):
    """The attack spec with iterations (and EOT, for a stochastic model) multiplied by factor."""
    if factor == 1:
        return inner
    if inner.kind == "pgd":
        return inner.model_copy(update={"steps": inner.steps * factor, "eot": inner.eot * (factor if stochastic else 1)})
    eot = inner.eot_iter or (20 if inner.version == "rand" else 1)
    return inner.model_copy(update={"n_iter": (inner.n_iter or 100) * factor,
                                    "eot_iter": eot * factor if stochastic else inner.eot_iter})


def _budget(inner, stochastic: bool) -> tuple[int, int]:
    """(iterations, EOT) of an attack spec."""
    if inner.kind == "pgd":
        return inner.steps, inner.eot
    if inner.kind == "autoattack":
        return inner.n_iter or 100, inner.eot_iter or (20 if inner.version == "rand" else 1)
    return 0, 0


def _run(inner, counted, select: Selection, stochastic: bool, K: int, seed: int, device, scored_stochastic: bool) -> list[str]:
    """One run of the attack on the group; returns flags of the whole group."""
    found = []
    if inner.kind == "autoattack":
        aa = build_autoattack(counted, inner, K, seed, device)
        # A stochastic defense scored after an oblivious or transfer attack needs APGD's best-loss
        # points too: a point that does not fool the surrogate may still fool the defense.
        run_autoattack(aa, select, stochastic=stochastic or scored_stochastic)
        if stochastic and eot_iterations(aa) == 1:
            found.append("stochastic_without_eot")
    elif inner.kind == "pgd":
        pgd_attack(counted, select.x, select.y, eps=inner.eps, norm=inner.norm, steps=inner.steps,
                   step_size=inner.step_size, eot=inner.eot, restarts=inner.restarts, loss=inner.loss,
                   random_start=inner.random_start, seed=seed, select=select)
        if stochastic and inner.eot == 1:
            found.append("stochastic_without_eot")
    return found


def _attack_group(defense, attacked, counted, spec, inner, x, y, ids, group_seed, passes, batch_size):
    """Attack the rows x (b, ...) together; returns (x_adv, per-row info dicts)."""
    for module in {defense, attacked}:
        if isinstance(module, Defense):
            module.bind(None, seed=group_seed)
            module.cost.reset()
    counted.queries = counted.gradients = 0
    start = time.perf_counter()
    stochastic = bool(getattr(attacked, "stochastic", False))
    S = spec.selection_passes or (passes if stochastic else 1)
    flags = gradient_flags(counted, x, y)
    group_flags: list[str] = []
    iterations, eot = _budget(inner, stochastic)
    broken: list[str | None] = [None] * x.shape[0]
    attacked_rows = [False] * x.shape[0]
    x_adv = x.clone()
    if inner.kind != "none":
        select = _selection(counted, attacked, x, y, ids, group_seed, S, batch_size)
        factor, before = 1, None
        while True:
            run = _scaled(inner, factor, stochastic)
            group_flags += _run(run, counted, select, stochastic, defense.num_classes,
                                group_seed if factor == 1 else rng.seed_of(group_seed, factor), x.device,
                                bool(defense.stochastic))
            iterations, eot = _budget(run, stochastic)
            robust = int((select.acc >= 0.5).sum())
            if not spec.converge or (before is not None and abs(robust - before) < 1):
                break
            if factor >= 2 ** spec.converge_cap:
                group_flags.append("budget_not_converged")
                break
            factor, before = factor * 2, robust
        x_adv, broken = select.best, select.broken_by()
        attacked_rows = [inner.eps > 0 and float(a) > 0 for a in select.start_acc]
    seconds = (time.perf_counter() - start) / x.shape[0]
    cost = {"forward": 0, "backward": 0}
    for module in {defense, attacked}:
        if isinstance(module, Defense):
            cost["forward"] += module.cost.forward
            cost["backward"] += module.cost.backward
    b = x.shape[0]
    infos = []
    for i in range(b):
        f = flags[i] + group_flags
        if broken[i] == "square" and inner.kind == "autoattack" and _whitebox_ran(inner):
            f.append("square_beat_whitebox")
        infos.append({"flags": f, "broken_by": broken[i], "attack_success": None if inner.kind == "none" else broken[i] is not None,
                      "seconds": seconds, "queries": counted.queries / b, "gradients": counted.gradients / b,
                      "forward_passes": cost["forward"] / b, "backward_passes": cost["backward"] / b,
                      "iterations": iterations, "eot": eot, "stochastic": stochastic, "attacked": attacked_rows[i]})
    return x_adv, infos


def _whitebox_ran(inner) -> bool:
    if inner.version == "custom":
        return any(s != "square" for s in inner.attacks)
    return True


def evaluate(defense: Defense, attack: AttackSpec | dict, x: torch.Tensor, y: torch.Tensor, example_ids, seed: int, *,
             attack_name: str | None = None, surrogate: nn.Module | None = None, batch_size: int = 64, progress=None,
             extras: dict | None = None) -> list[dict]:
    """Attack and score `defense` on x (B, C, H, W) in [0, 1] with labels y (B,); one dict per example.

    attack: a parsed attack spec (pipeline.config.attack; a table is parsed first). example_ids:
    (B,) ints, the ids that seed each example's draws. The records name the defense `defense.name`
    and the attack `attack_name` (default: the spec's), the names the job planned. surrogate: the
    crafting model of a transfer attack, built by the caller on x's device (runtime/worker.py).
    progress: optional callable(n_done). extras: optional dict, filled with "x_adv" (B, C, H, W), the adversarial inputs as scored,
    "forward_per_prediction", the network evaluations of one scoring pass on one input,
    "attack_seconds", the wall-clock seconds of the attack (scoring excluded) and
    "attack_evaluations", the attack's network evaluations of all rows ({"forward", "backward"}).
    """
    spec = parse_attack(attack) if isinstance(attack, dict) else attack
    if spec.kind == "transfer" and surrogate is None:
        raise ConfigError("a transfer attack needs its surrogate: pass surrogate=, a defense built from the spec's "
                          "`surrogate` table (pipeline.config.defense.surrogate_spec)")
    name = attack_name or spec_name(spec)
    inner = crafting(spec)
    ids = torch.as_tensor(example_ids, dtype=torch.int64).reshape(-1)
    if ids.numel() != x.shape[0] or y.shape != (x.shape[0],):
        raise ConfigError(f"evaluate: x has {x.shape[0]} rows, y {tuple(y.shape)}, example_ids {ids.numel()}")
    check_input(x, defense.in_channels, defense.image_size, "evaluate")
    check_labels(y, x.shape[0], defense.num_classes, "evaluate")
    x = x.float()  # any float dtype is scored as float32, like Defense.forward does
    passes = spec.passes if defense.stochastic else 1
    attacked, path = _attacked_model(defense, spec, surrogate)
    counted = _Counted(attacked)
    eps = inner.eps if inner.kind != "none" else 0.0
    x_adv = x.clone()
    per_example: list[dict] = [{}] * x.shape[0]
    groups = [list(range(x.shape[0]))] if spec.batched else [[i] for i in range(x.shape[0])]
    done = 0
    attack_start = time.perf_counter()
    for rows in groups:
        if not rows:
            continue
        gids = ids[rows]
        group_seed = unit_seed(seed, gids.tolist()) if spec.batched else example_seed(seed, int(gids[0]))
        with lm_gradient(defense, spec.lm_gradient):
            adv, infos = _attack_group(defense, attacked, counted, spec, inner, x[rows], y[rows], gids, group_seed,
                                       passes, batch_size)
        check_perturbation(adv, x[rows], inner.norm, eps, gids.tolist())
        x_adv[rows] = adv.detach().to(x.dtype)
        for i, info in zip(rows, infos):
            per_example[i] = info
        done += len(rows)
        if progress is not None:
            progress(done)
    defense.bind(None)
    attack_seconds = time.perf_counter() - attack_start
    # Scoring: R passes with fresh seeds, clean and adversarial, batched.
    start = time.perf_counter()
    defense.cost.reset()
    clean = _scores(defense, x, ids, seed, passes, batch_size)
    adv = _scores(defense, x_adv, ids, seed, passes, batch_size)
    share = (time.perf_counter() - start) / max(x.shape[0], 1)
    score_cost = defense.cost.forward / max(x.shape[0], 1)
    if extras is not None:
        extras["x_adv"] = x_adv.detach()
        extras["forward_per_prediction"] = score_cost / (2 * passes)  # R clean + R adversarial passes
        extras["attack_seconds"] = attack_seconds
        extras["attack_evaluations"] = {k: round(sum(info[f"{k}_passes"] for info in per_example))
                                        for k in ("forward", "backward")}
    sizes = norms(x_adv - x)
    records = []
    for i in range(x.shape[0]):
        rec = _record(defense, name, spec, inner, path, seed, passes, int(ids[i]), int(y[i]), clean[:, i], adv[:, i],
                      {k: float(v[i]) for k, v in sizes.items()}, per_example[i], share, score_cost, str(x.device))
        rec["flags"] = sorted(set(rec["flags"]) | set(record_flags(rec, stochastic=bool(defense.stochastic),
                                                                   attacked=per_example[i]["attacked"])))
        records.append(rec)
    return records


def _record(defense, attack, spec, inner, path, seed, passes, ex_id, label, clean, adv, sizes, info, share, score_cost, device):
    return {
        "example_id": ex_id,
        "label": label,
        "defense": getattr(defense, "name", type(defense).__name__),
        "attack": attack,
        "path": path,
        "norm": inner.norm,
        "eps": float(inner.eps) if spec.kind != "none" else 0.0,
        "seed": int(seed),
        "passes": int(passes),
        **_pass_columns("clean", clean, label),
        **_pass_columns("adv", adv, label),
        "clean_logits": [float(v) for v in clean[0]],
        "adv_logits": [float(v) for v in adv[0]],
        "linf": sizes["linf"],
        "l2": sizes["l2"],
        "l1": sizes["l1"],
        "broken_by": info["broken_by"],
        "attack_success": info["attack_success"],
        "queries": round(info["queries"]),
        "gradients": round(info["gradients"]),
        "forward_passes": round(info["forward_passes"] + score_cost),
        "backward_passes": round(info["backward_passes"]),
        "iterations": int(info["iterations"]),
        "eot": int(info["eot"]),
        "seconds": float(info["seconds"] + share),
        "device": device,
        "flags": sorted(set(info["flags"])),
    }


