"""evaluate(defense, attack, batch, seed) -> an Evaluation: one Record per example.

The protocol for stochastic defenses (Carlini et al. 2019; Croce et al. 2022; Lee & Kim 2023):

1. a unit's examples are attacked together (or one at a time, `batched = false`), the attack's
   and the defense's draws seeded by (seed, the unit's example ids), so a record depends on
   the job and its unit, never on the worker, the order or a resume;
2. the attacker sees what its threat model allows (`attacked_model`): the whole defense
   (adaptive; through LM by BPDA or exactly), its base classifier (oblivious), or a surrogate (transfer);
3. every decision of the attack (is an example still correct, did a stage break it, which
   point to keep) is taken over S fresh passes of the model it attacks, never one
   (pipeline.attacks.selection); with `converge` the attack reruns as `attack.scaled(2**k)`;
4. the adversarial example is checked against its eps ball and [0, 1] (a violation raises);
5. the defense then scores clean and adversarial inputs in R passes with fresh seeds:
   single-pass, majority-vote and worst-case (all passes) correctness;
6. sanity flags (pipeline.protocol.checks) and costs (network passes, seconds) go into the record.
"""

from __future__ import annotations

import time

import torch

from pipeline.attacks.base import Attack
from pipeline.defenses.base import Defense, check_input, check_labels
from pipeline.errors import ConfigError
from pipeline.protocol.attacking import Row, attack_group, attacked_model, lm_gradient
from pipeline.protocol.checks import check_perturbation, norms, record_flags
from pipeline.protocol.predict import predict
from pipeline.protocol.result import Batch, Evaluation, Record, Spent
from pipeline.protocol.seeds import example_seed, pass_seed, unit_seed

__all__ = ["evaluate", "pass_seed", "unit_seed", "example_seed"]

def evaluate(defense: Defense, attack: Attack, batch: Batch, seed: int, *, batch_size: int = 64,
             progress=None) -> Evaluation:
    """Attack and score `defense` on `batch` (pipeline.protocol.result.Batch); one Record per example.

    attack: built by pipeline.protocol.build_attack from a parsed spec, against this defense's
    classes (a transfer attack with its surrogate on the batch's device). The records name the
    defense `defense.name` and the attack `attack.name`. progress: optional callable(n_done).
    """
    x, y, ids = batch.x, batch.y, batch.ids
    if ids.numel() != x.shape[0] or y.shape != (x.shape[0],):
        raise ConfigError(f"evaluate: x has {x.shape[0]} rows, y {tuple(y.shape)}, example_ids {ids.numel()}")
    check_input(x, defense.in_channels, defense.image_size, "evaluate")
    check_labels(y, x.shape[0], defense.num_classes, "evaluate")
    x = x.float()  # any float dtype is scored as float32, like Defense.forward does
    spec = attack.spec
    passes = spec.passes if defense.stochastic else 1
    attacked, path = attacked_model(defense, attack)
    x_adv, rows = x.clone(), [None] * x.shape[0]
    groups = [list(range(x.shape[0]))] if spec.batched else [[i] for i in range(x.shape[0])]
    done, attack_start = 0, time.perf_counter()
    for group in (g for g in groups if g):
        gids = ids[group]
        group_seed = unit_seed(seed, gids.tolist()) if spec.batched else example_seed(seed, int(gids[0]))
        with lm_gradient(defense, spec.lm_gradient):
            adv, infos = attack_group(defense, attack, attacked, x[group], y[group], gids, group_seed, passes, batch_size)
        check_perturbation(adv, x[group], attack.norm, attack.eps, gids.tolist())
        x_adv[group] = adv.detach().to(x.dtype)
        for i, info in zip(group, infos):
            rows[i] = info
        done += len(group)
        if progress is not None:
            progress(done)
    defense.bind(None)
    attack_seconds = time.perf_counter() - attack_start
    start = time.perf_counter()  # scoring: R passes with fresh seeds, clean and adversarial, batched
    defense.cost.reset()
    clean, adv = ([predict(defense, v, ids, seed=pass_seed(seed, r), batch_size=batch_size) for r in range(passes)]
                  for v in (x, x_adv))
    clean, adv = torch.stack(clean), torch.stack(adv)
    share = (time.perf_counter() - start) / max(x.shape[0], 1)
    score_cost = defense.cost.forward / max(x.shape[0], 1)
    sizes = norms(x_adv - x)
    records = tuple(_record(defense, attack, path, seed, passes, int(ids[i]), int(y[i]), clean[:, i], adv[:, i],
                            {k: float(v[i]) for k, v in sizes.items()}, rows[i], share, score_cost, str(x.device))
                    for i in range(x.shape[0]))
    spent = Spent(*(round(sum(getattr(r, k) for r in rows)) for k in ("forward", "backward")))
    return Evaluation(records, x_adv.detach(), spent, score_cost / (2 * passes), attack_seconds)


def _pass_columns(prefix: str, logits: torch.Tensor, label: int) -> dict:
    """The columns of R scoring passes (R, K) of one input: first pass, majority vote, worst case."""
    preds = logits.argmax(-1)
    vote = int(torch.bincount(preds, minlength=logits.shape[-1]).argmax())  # ties: the smallest label
    correct = preds == label
    return {f"{prefix}_pred": int(preds[0]), f"{prefix}_correct": bool(correct[0]), f"{prefix}_vote_pred": vote,
            f"{prefix}_vote_correct": vote == label, f"{prefix}_worst_correct": bool(correct.all()),
            f"{prefix}_pass_accuracy": float(correct.double().mean())}


def _record(defense, attack, path, seed, passes, ex_id, label, clean, adv, sizes, row: Row, share, score_cost, device):
    fields = {
        "example_id": ex_id, "label": label, "defense": defense.name, "attack": attack.name, "path": path,
        "norm": attack.norm, "eps": float(attack.eps), "seed": int(seed), "passes": int(passes),
        **_pass_columns("clean", clean, label), **_pass_columns("adv", adv, label),
        "clean_logits": [float(v) for v in clean[0]], "adv_logits": [float(v) for v in adv[0]],
        "linf": sizes["linf"], "l2": sizes["l2"], "l1": sizes["l1"],
        "broken_by": row.broken_by, "attack_success": row.attack_success, "queries": round(row.queries),
        "gradients": round(row.gradients), "forward_passes": round(row.forward + score_cost),
        "backward_passes": round(row.backward), "iterations": int(row.iterations), "eot": int(row.eot),
        "seconds": float(row.seconds + share), "device": device,
    }
    flags = set(row.flags) | set(record_flags(fields, stochastic=bool(defense.stochastic), attacked=row.attacked))
    return Record(**fields, flags=sorted(flags))
