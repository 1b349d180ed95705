"""A hand-built sweep for the analytics tests: records with known counts, a plan.json, and
adversarial images for two units, written with the real Store to a local folder or S3.

Every example id i has label i % 10; "wrong" sets name the ids an attack broke.

| defense                   | attack      | path          | norm | eps   | passes | adv wrong (of 20)        |
|---------------------------|-------------|---------------|------|-------|--------|--------------------------|
| plain-erm                 | aa-standard | adaptive      | Linf | 4/255 | 1      | 0..3 (0 clean wrong)     |
| plain-erm                 | aa-standard | adaptive      | Linf | 8/255 | 1      | 0..9 (0 clean wrong)     |
| rdc-optimal[timesteps=5]  | aa-rand     | adaptive+bpda | Linf | 8/255 | 3      | 0..7                     |
| rdc-optimal[timesteps=20] | aa-rand     | adaptive+bpda | Linf | 8/255 | 3      | 0..3, 10, 11             |
| mi-pl                     | pgd-eot10   | adaptive      | L2   | 0.5   | 3      | 0..4                     |
"""

from __future__ import annotations

import numpy as np

from pipeline.store import Store, records_to_table
from pipeline.store.adversarial import adversarial_path, write_adversarial

N = 20
RUN_ID = "sweep-0001"
DATA = {"dataset": "digits", "split": "test", "root": None, "limit": N, "ids": None, "shard_size": N}

GROUPS = [
    # defense, attack, path, norm, eps, passes, wrong ids, broken_by per wrong id, defense table, attack kind
    ("plain-erm", "aa-standard", "adaptive", "Linf", 4 / 255, 1, set(range(4)),
     {0: "clean", 1: "apgd-ce", 2: "apgd-ce", 3: "apgd-t"}, {"kind": "plain"}, "autoattack"),
    ("plain-erm", "aa-standard", "adaptive", "Linf", 8 / 255, 1, set(range(10)),
     {0: "clean", 1: "apgd-ce", 2: "apgd-ce", 3: "apgd-ce", 4: "apgd-ce", 5: "apgd-ce", 6: "apgd-ce",
      7: "apgd-t", 8: "apgd-t", 9: "square"}, {"kind": "plain"}, "autoattack"),
    ("rdc-optimal[timesteps=5]", "aa-rand", "adaptive+bpda", "Linf", 8 / 255, 3, set(range(8)),
     {i: "apgd-ce" for i in range(8)}, {"kind": "rdc", "model": "optimal", "timesteps": 5, "lm": {"steps": 2}},
     "autoattack"),
    ("rdc-optimal[timesteps=20]", "aa-rand", "adaptive+bpda", "Linf", 8 / 255, 3, {0, 1, 2, 3, 10, 11},
     {i: "apgd-dlr" for i in (0, 1, 2, 3, 10, 11)},
     {"kind": "rdc", "model": "optimal", "timesteps": 20, "lm": {"steps": 2}}, "autoattack"),
    ("mi-pl", "pgd-eot10", "adaptive", "L2", 0.5, 3, set(range(5)), {i: "pgd" for i in range(5)},
     {"kind": "mi", "mode": "pl"}, "pgd"),
]
IMAGES = {("plain-erm", 8 / 255): 1.0, ("rdc-optimal[timesteps=5]", 8 / 255): 200.0}
"""Units that also store adversarial images, with their forward passes per prediction."""


def record(i: int, defense: str, attack: str, path: str, norm: str, eps: float, passes: int, wrong: set,
           broken: dict) -> dict:
    """Example i of a group: label i % 10; clean wrong only where broken_by says "clean"; vote
    wrong on the first half of the wrong ids, worst case wrong on them plus ids 18 and 19 for
    stochastic defenses; flags: zero_gradient on ids 0, 1 of mi-pl, square_beat_whitebox where
    square broke it; cost: forward 10 + i, backward 4, seconds 0.25 (MI: 0.5)."""
    label = i % 10
    clean = broken.get(i) != "clean"
    adv = i not in wrong
    half = sorted(wrong)[: len(wrong) // 2]
    vote = i not in half
    worst = adv and not (passes > 1 and i >= 18)
    flags = (["zero_gradient"] if defense == "mi-pl" and i < 2 else []) + \
            (["square_beat_whitebox"] if broken.get(i) == "square" else [])
    size = eps * (0.5 if adv else 1.0)
    return {
        "example_id": i, "label": label, "defense": defense, "attack": attack, "path": path, "norm": norm, "eps": eps,
        "seed": 0, "passes": passes, "clean_pred": label if clean else (label + 1) % 10, "clean_correct": clean,
        "clean_vote_pred": label if clean else (label + 1) % 10, "clean_vote_correct": clean,
        "clean_worst_correct": clean, "clean_pass_accuracy": float(clean),
        "adv_pred": label if adv else (label + 3) % 10, "adv_correct": adv,
        "adv_vote_pred": label if vote else (label + 3) % 10, "adv_vote_correct": vote,
        "adv_worst_correct": worst, "adv_pass_accuracy": 1.0 if adv else 0.0,
        "clean_logits": [float(k == label) for k in range(10)], "adv_logits": [0.0] * 10,
        "linf": size if norm == "Linf" else size / 4, "l2": size if norm == "L2" else size * 4, "l1": size * 16,
        "broken_by": broken.get(i), "attack_success": not adv, "queries": 100, "gradients": 50,
        "forward_passes": 10 + i, "backward_passes": 4, "seconds": 0.5 if defense == "mi-pl" else 0.25,
        "device": "cpu", "flags": flags,
    }


def unit_id(g: int) -> str:
    return f"{g:016x}"


def write_sweep(uri: str, storage_options: dict | None = None, images: bool = True, plan: bool = True) -> str:
    """Write the sweep as the run folder `uri`; returns it. images: also the adversarial side
    files of the units in IMAGES (digits test images moved by +-eps, clipped to [0, 1])."""
    store = Store(uri, storage_options=storage_options)
    units = []
    x = None
    for g, (defense, attack, path, norm, eps, passes, wrong, broken, dtable, kind) in enumerate(GROUPS):
        uid = unit_id(g)
        safe = defense.replace("[", "_").replace("]", "_").replace("=", "_")
        rel = f"records/defense={safe}/attack={attack}/unit-{uid}.parquet"
        recs = [record(i, defense, attack, path, norm, eps, passes, wrong, broken) for i in range(N)]
        table = records_to_table(recs, run_id=RUN_ID, job_hash="j", unit_id=uid, worker="w0", config_hash="h")
        store.write_table(rel, table, {"unit_id": uid, "run_id": RUN_ID, "job_hash": "j"})
        units.append({"unit_id": uid, "defense": defense, "attack": attack, "eps": eps,
                      "defense_table": {**dtable, "dataset": "digits", "seed": 0},
                      "attack_table": {"kind": kind, "norm": norm, "eps": eps}, "example_ids": list(range(N)),
                      "path": rel})
        if images and (defense, eps) in IMAGES:
            if x is None:
                from pipeline.data import load_split

                x = load_split("digits", "test")[0][:N].numpy()
            signs = np.where(np.arange(x[0].size).reshape(x.shape[1:]) % 2 == 0, 1.0, -1.0)
            adv = np.clip(x + eps * signs, 0.0, 1.0).astype(np.float32)
            write_adversarial(store, adversarial_path(rel), range(N), adv, IMAGES[(defense, eps)])
    if plan:
        store.write_json("plan.json", {"run_id": RUN_ID, "job_hash": "j", "source": "hand-built",
                                       "job": {"name": "sweep", "seed": 0, "data": DATA}, "format": 1,
                                       "units": units})
    return store.uri
