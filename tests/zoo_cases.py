"""Cases of tests/test_zoo.py: random weights made the same way on both sides of a comparison.

The fixtures (tests/fixtures/robustbench_zoo.*) hold RobustBench's logits for these weights,
computed by running its own model classes and `load_model` on them; the weights themselves are
not stored: `random_state` makes them again from the state dict's names and shapes and a seed.
"""

from __future__ import annotations

import hashlib

import torch

INPUT_SEED = 0
C10 = ([0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616])
C100 = ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762])

# Our configs at small widths where RobustBench's classes allow, full size where they do not.
ARCH_CASES = {
    "dm-wrn-10-1-swish": {"seed": 1, "config": {"arch": "dm-wrn", "depth": 10, "width": 1, "activation": "swish",
                                                "normalization": "mean_std", "mean": C10[0], "std": C10[1]}},
    "dm-wrn-16-2-silu-c100": {"seed": 2, "config": {"arch": "dm-wrn", "depth": 16, "width": 2, "activation": "silu",
                                                    "num_classes": 100, "normalization": "mean_std", "mean": C100[0],
                                                    "std": C100[1]}},
    "dm-wrn-10-2-meansparse": {"seed": 16, "config": {"arch": "dm-wrn", "depth": 10, "width": 2, "activation": "silu",
                                                      "meansparse": True, "normalization": "mean_std",
                                                      "mean": C10[0], "std": C10[1]}},
    "dm-preact-18-swish": {"seed": 3, "config": {"arch": "dm-preact-resnet", "depth": 18, "activation": "swish",
                                                 "normalization": "mean_std", "mean": C10[0], "std": C10[1]}},
    "wrn-10-1-2x-1": {"seed": 4, "config": {"arch": "wrn", "depth": 10, "widen_factor": 1, "normalization": "2x-1"}},
    "wrn-10-2-per-image": {"seed": 5, "config": {"arch": "wrn", "depth": 10, "widen_factor": 2,
                                                 "normalization": "per_image"}},
    "wrn-10-1-cosine": {"seed": 6, "config": {"arch": "wrn", "depth": 10, "widen_factor": 1, "sub_block1": True,
                                              "head": "cosine", "normalization": "mu_sigma", "mean": C10[0],
                                              "std": C10[1]}},
    # A file without mu/sigma: the class's constants stay.
    "wrn-10-1-mu-sigma-absent": {"seed": 7, "drop": ("mu", "sigma"),
                                 "config": {"arch": "wrn", "depth": 10, "widen_factor": 1, "sub_block1": True,
                                            "normalization": "mu_sigma", "mean": C10[0], "std": C10[1]}},
    # One PSSiLU shared by every block: the file names it once per place, with different values here.
    "wrn-16-1-pssilu": {"seed": 10, "config": {"arch": "wrn", "depth": 16, "widen_factor": 1, "activation": "pssilu"}},
    # Its file lacks mu/sigma (RobustBench tolerates it): the class's constants stay.
    "robust-resnet-small": {"seed": 15, "drop": ("mu", "sigma"),
                            "config": {"arch": "robust-resnet", "widths": [16, 32, 48, 24], "depths": [2, 1, 2],
                                       "activation": "silu", "normalization": "mu_sigma", "mean": C10[0],
                                       "std": C10[1]}},
    "wrn-grouped": {"seed": 8, "config": {"arch": "wrn-grouped", "widths": [16, 32, 64, 48], "depths": [1, 2, 1]}},
    "preact-v2-bn": {"seed": 9, "config": {"arch": "preact-resnet18", "shortcut": "activation", "bn_before_fc": True,
                                           "normalization": "mu_sigma", "mean": C10[0], "std": C10[1]}},
}

# Zoo entries loaded by name from a file in RobustBench's layout, each wrapped as published files are.
NAME_CASES = {
    "cifar10/Linf/Wong2020Fast": {"seed": 11, "variant": "state_dict+module.", "drop": ("mu", "sigma", "*num_batches_tracked")},
    "cifar10/Linf/Rebuffi2021Fixing_R18_ddpm": {"seed": 12, "variant": "state_dict+module.model."},
    "cifar10/Linf/Andriushchenko2020Understanding": {"seed": 13, "variant": "last+best"},
    "cifar10/L2/Engstrom2019Robustness": {"seed": 14, "variant": "model."},
}


def random_state(shapes: dict, seed: int, drop=()) -> dict[str, torch.Tensor]:
    """Random weights for a state dict of these names and shapes, in sorted-name order: BatchNorm
    statistics positive and near their usual values, weights scaled by 1/sqrt(fan-in) so that
    deep networks keep finite, distinct logits. drop: names left out ("*suffix" drops every name
    ending so)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        if name in drop or any(d.startswith("*") and name.endswith(d[1:]) for d in drop):
            continue
        shape = tuple(shapes[name])
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(7)
        elif name.endswith("flag_update_statistics"):
            out[name] = torch.tensor(0)
        elif len(shape) == 0:  # MeanSparse's threshold and batch count
            out[name] = torch.rand((), generator=g) * 0.5 + 0.2
        elif name.endswith("running_var"):
            out[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith("running_mean"):
            out[name] = torch.randn(shape, generator=g) * 0.1
        elif name == "mu":
            out[name] = torch.rand(shape, generator=g) * 0.3 + 0.3
        elif name == "sigma":
            out[name] = torch.rand(shape, generator=g) * 0.1 + 0.2
        elif len(shape) == 1:
            out[name] = torch.randn(shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            out[name] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return out


def wrap(state: dict, variant: str):
    """A state dict saved the way some published file saves it."""
    if variant == "plain":
        return state
    if variant == "model.":
        return {"model." + k: v for k, v in state.items()}
    if variant == "state_dict+module.":
        return {"state_dict": {"module." + k: v for k, v in state.items()}}
    if variant == "state_dict+module.model.":
        return {"state_dict": {"module.model." + k: v for k, v in state.items()}}
    if variant == "last+best":
        return {"last": state, "best": {k: v * 2 if v.is_floating_point() else v for k, v in state.items()}}
    raise ValueError(variant)


def signature(shapes: dict) -> str:
    """A digest of a state dict's names and shapes, in sorted-name order."""
    text = ";".join(f"{k}:{tuple(shapes[k])}" for k in sorted(shapes))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
