"""evaluate(defense, attack_config, x, y, example_ids, seed) -> one record per example.

The protocol for stochastic defenses (Carlini et al. 2019; Croce et al. 2022; Lee & Kim 2023):

1. each example is attacked on its own, the attack's draws and the defense's draws seeded by
   (seed, example id), so a record does not depend on batch size, order or worker;
2. the attacker sees the whole defense (adaptive; through LM by BPDA or exactly), its base
   classifier (oblivious), or a surrogate (transfer);
3. the adversarial example is checked against its eps ball and [0, 1] (a violation raises);
4. the defense then scores clean and adversarial inputs in R passes with fresh seeds:
   single-pass, majority-vote and worst-case (all passes) correctness;
5. sanity flags and costs (network passes, seconds) go into the record.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import nn

from pipeline import rng
from pipeline.defenses.base import Defense, check_input, check_labels
from pipeline.defenses.plain import Plain
from pipeline.errors import AttackError, ConfigError
from pipeline.protocol.predict import predict
from pipeline.attacks.autoattack import build_autoattack, eot_iterations, run_autoattack
from pipeline.attacks.pgd import pgd_attack
from pipeline.config.attack import AttackSpec, attack_name as spec_name, parse_attack

TOLERANCE = 1e-6  # slack for float rounding when checking the eps ball and the box


def pass_seed(seed: int, r: int) -> int:
    """The seed of scoring pass r: fresh draws, the same for clean and adversarial inputs."""
    return rng.seed_of(seed, rng.SCORE, r)


def example_seed(seed: int, example_id: int) -> int:
    """The seed of one example's attack (its restarts, its random starts, the defense's draws)."""
    return rng.seed_of(seed, rng.ATTACK, example_id)


def norms(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example Linf, L2 and L1 norms of perturbations (B, C, H, W)."""
    flat = delta.detach().flatten(1).double()
    return {"linf": flat.abs().max(1).values, "l2": flat.norm(dim=1), "l1": flat.abs().sum(1)}


def check_perturbation(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float, ids) -> None:
    """AttackError unless every x_adv lies in [0, 1] and within eps of x in `norm`."""
    if not torch.isfinite(x_adv).all():
        raise AttackError(f"attack returned NaN or infinite values (examples {list(ids)})")
    x_adv = x_adv.detach()
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if lo < -TOLERANCE or hi > 1 + TOLERANCE:
        raise AttackError(f"attack left the [0, 1] box: values in [{lo:.6g}, {hi:.6g}] (examples {list(ids)})")
    size = norms(x_adv - x)[{"Linf": "linf", "L2": "l2", "L1": "l1"}[norm]]
    bad = (size > eps * (1 + 1e-5) + TOLERANCE).nonzero().flatten().tolist()
    if bad:
        raise AttackError(f"attack left the {norm} ball of eps {eps:.6g}: example {ids[bad[0]]} at {float(size[bad[0]]):.6g}")


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


def evaluate(defense: Defense, attack: AttackSpec | dict, x: torch.Tensor, y: torch.Tensor, example_ids, seed: int, *,
             attack_name: str | None = None, surrogate: nn.Module | None = None, batch_size: int = 64, progress=None,
             extras: dict | None = None) -> list[dict]:
    """Attack and score `defense` on x (B, C, H, W) in [0, 1] with labels y (B,); one dict per example.

    attack: a parsed attack spec (pipeline.config.attack; a table is parsed first). example_ids:
    (B,) ints, the ids that seed each example's draws. The records name the defense `defense.name`
    and the attack `attack_name` (default: the spec's), the names the job planned. surrogate: the
    crafting model of a transfer attack, built by the caller on x's device (runtime/worker.py).
    progress: optional callable(n_done). extras: optional dict, filled with "x_adv" (B, C, H, W),
    the adversarial inputs as scored, and "forward_per_prediction", the network evaluations of
    one scoring pass on one input.
    """
    spec = parse_attack(attack) if isinstance(attack, dict) else attack
    if spec.kind == "transfer" and surrogate is None:
        raise ConfigError("a transfer attack needs its surrogate: pass surrogate=, a defense built from the spec's "
                          "`surrogate` table (pipeline.config.defense.surrogate_spec)")
    name = attack_name or spec_name(spec)
    inner = parse_attack(spec.attack) if spec.kind == "transfer" else spec
    ids = torch.as_tensor(example_ids, dtype=torch.int64).reshape(-1)
    if ids.numel() != x.shape[0] or y.shape != (x.shape[0],):
        raise ConfigError(f"evaluate: x has {x.shape[0]} rows, y {tuple(y.shape)}, example_ids {ids.numel()}")
    check_input(x, defense.in_channels, defense.image_size, "evaluate")
    check_labels(y, x.shape[0], defense.num_classes, "evaluate")
    x = x.float()  # any float dtype is scored as float32, like Defense.forward does
    device = x.device
    K = defense.num_classes
    passes = spec.passes if defense.stochastic else 1
    attacked, path = _attacked_model(defense, spec, surrogate)
    counted = _Counted(attacked)
    eps = inner.eps
    x_adv = x.clone()
    per_example: list[dict] = []
    for i in range(x.shape[0]):
        start = time.perf_counter()
        ex_id, ex_seed = int(ids[i]), example_seed(seed, int(ids[i]))
        for module in {defense, attacked}:
            if isinstance(module, Defense):
                module.bind([ex_id], seed=ex_seed)
                module.cost.reset()
        counted.queries = counted.gradients = 0
        xi, yi = x[i:i + 1], y[i:i + 1]
        info = {"flags": [], "broken_by": None, "attack_success": None}
        with lm_gradient(defense, spec.lm_gradient):
            info["flags"] += _gradient_flags(counted, xi, yi)
            if inner.kind == "autoattack":
                aa = build_autoattack(counted, inner, K, ex_seed, device)
                adv, broken = run_autoattack(aa, counted, xi, yi)
                info["broken_by"], info["attack_success"] = broken[0], broken[0] is not None
                if getattr(attacked, "stochastic", False) and eot_iterations(aa) == 1:
                    info["flags"].append("stochastic_without_eot")
                if broken[0] == "square" and any(s != "square" for s in aa.attacks_to_run):
                    info["flags"].append("square_beat_whitebox")
            elif inner.kind == "pgd":
                adv, fooled = pgd_attack(counted, xi, yi, eps=eps, norm=inner.norm, steps=inner.steps,
                                         step_size=inner.step_size, eot=inner.eot, restarts=inner.restarts,
                                         loss=inner.loss, random_start=inner.random_start, seed=ex_seed)
                info["attack_success"] = bool(fooled[0])
                info["broken_by"] = "pgd" if bool(fooled[0]) else None
                if getattr(attacked, "stochastic", False) and inner.eot == 1:
                    info["flags"].append("stochastic_without_eot")
            else:
                adv = xi.clone()
        check_perturbation(adv, xi, inner.norm, eps if inner.kind != "none" else 0.0, [ex_id])
        x_adv[i] = adv[0].detach()
        cost = {"forward": 0, "backward": 0}
        for module in {defense, attacked}:
            if isinstance(module, Defense):
                cost["forward"] += module.cost.forward
                cost["backward"] += module.cost.backward
        info.update(seconds=time.perf_counter() - start, queries=counted.queries, gradients=counted.gradients,
                    forward_passes=cost["forward"], backward_passes=cost["backward"])
        per_example.append(info)
        if progress is not None:
            progress(i + 1)
    defense.bind(None)
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
    sizes = norms(x_adv - x)
    return [_record(defense, name, spec, inner, path, seed, passes, int(ids[i]), int(y[i]), clean[:, i], adv[:, i],
                    {k: float(v[i]) for k, v in sizes.items()}, per_example[i], share, score_cost, str(device))
            for i in range(x.shape[0])]


def _gradient_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Zero or NaN input gradients of the CE loss at the clean input (gradient masking)."""
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(model(xg), y)
        (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
    if g is None or not bool(torch.isfinite(g).all()):
        return ["nan_gradient"] if g is not None else ["zero_gradient"]
    return ["zero_gradient"] if float(g.abs().max()) == 0.0 else []


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
        "queries": int(info["queries"]),
        "gradients": int(info["gradients"]),
        "forward_passes": int(info["forward_passes"] + score_cost),
        "backward_passes": int(info["backward_passes"]),
        "seconds": float(info["seconds"] + share),
        "device": device,
        "flags": sorted(set(info["flags"])),
    }


def sweep_flags(records: list[dict], *, unbounded: dict | None = None, slack: float = 0.02) -> dict[tuple, list[str]]:
    """Flags of a sweep, per (defense, attack, norm): robust accuracy that rises with eps, or
    stays well above zero under an unbounded attack (eps at least `unbounded[norm]`)."""
    limits = {"Linf": 0.5, "L2": 8.0, "L1": 64.0, **(unbounded or {})}
    groups: dict[tuple, dict[float, list[bool]]] = {}
    for r in records:
        groups.setdefault((r["defense"], r["attack"], r["norm"]), {}).setdefault(r["eps"], []).append(r["adv_correct"])
    flags: dict[tuple, list[str]] = {}
    for key, by_eps in groups.items():
        accs = [(e, sum(v) / len(v), len(v)) for e, v in sorted(by_eps.items())]
        found = []
        for (e0, a0, n0), (e1, a1, n1) in zip(accs, accs[1:]):
            se = math.sqrt(max(a0 * (1 - a0), 1e-12) / n0 + max(a1 * (1 - a1), 1e-12) / n1)
            if a1 > a0 + max(slack, 2 * se):
                found.append("accuracy_rises_with_eps")
                break
        if any(e >= limits[key[2]] and a > 0.1 for e, a, _ in accs):
            found.append("unbounded_attack_leaves_accuracy")
        flags[key] = found
    return flags
