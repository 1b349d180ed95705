"""RobustBench's model zoo by name: which network each CIFAR entry is, and how its file loads.

The table holds, for every entry of RobustBench's CIFAR-10 (Linf, L2) and CIFAR-100 (Linf)
zoo, the architecture and input transform its model class builds, written as our registry's
configs (pipeline.models.registry), or the reason we cannot build it. A name we cannot build is
refused by name (`ZooError`): it is never loaded as something else.

`load_zoo_model` reads the file where RobustBench's own `load_model` keeps it and handles it
as that loader does:

1. the file is read with torch.load(weights_only=True) (RobustBench unpickles it; nothing in
   the file is run here);
2. for Andriushchenko2020Understanding and the Kireev2021Effectiveness entries, the checkpoint's
   `last` entry is taken (their files hold {'last', 'best'});
3. the state dict is the checkpoint's `state_dict` entry where it has one, else the checkpoint;
4. "module." and then "model." are cut from the front of every key that contains them anywhere
   (RobustBench cuts len(substring) characters from any key holding it, not only a prefix);
5. the state is loaded strictly, except for the entries RobustBench lists as known to fail
   strict loading, and only for its listed failures (missing exactly "mu", "sigma"; missing
   exactly "mean", "std"; missing "normalize.mean", "normalize.std" first; an unexpected
   "model_preact_hl1.1.weight" or "conv1.scores" first): those load non-strictly, keeping the
   class's constants for what is missing and ignoring what is unexpected. Shapes must match in
   either case. A BatchNorm's missing `num_batches_tracked` is accepted everywhere, as torch
   accepts it for a state dict that has passed through RobustBench's key rewriting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.registry import build_model

THREATS = ("Linf", "L2")
DATASETS = ("cifar10", "cifar100")
ENV = "ROBUSTBENCH_MODELS"

# Normalisation constants of RobustBench's model classes, per class, as they are written there.
C10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
C100_DM = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
ENGSTROM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
AUGUSTIN = ((0.4913997551666284, 0.48215855929893703, 0.4465309133731618),
            (0.24703225141799082, 0.24348516474564, 0.26158783926049628))
RONY = ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))
C100_CHEN = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
C100_WU = ((0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
           (0.2673342858792401, 0.2564384629170883, 0.27615047132568404))

# RobustBench's `_safe_load_state_dict`: the entries allowed to load non-strictly after one of
# the listed failures (the list is by name, whatever the dataset or threat model).
LENIENT = frozenset({
    "Andriushchenko2020Understanding", "Augustin2020Adversarial", "Engstrom2019Robustness", "Pang2020Boosting",
    "Rice2020Overfitting", "Rony2019Decoupling", "Wong2020Fast", "Hendrycks2020AugMix_WRN",
    "Hendrycks2020AugMix_ResNeXt", "Kireev2021Effectiveness_Gauss50percent", "Kireev2021Effectiveness_AugMixNoJSD",
    "Kireev2021Effectiveness_RLAT", "Kireev2021Effectiveness_RLATAugMixNoJSD", "Kireev2021Effectiveness_RLATAugMix",
    "Chen2020Efficient", "Wu2020Adversarial", "Augustin2020Adversarial_34_10", "Augustin2020Adversarial_34_10_extra",
    "Diffenderfer2021Winning_LRR", "Diffenderfer2021Winning_LRR_CARD_Deck", "Diffenderfer2021Winning_Binary",
    "Diffenderfer2021Winning_Binary_CARD_Deck", "Huang2022Revisiting_WRN-A4", "Bai2024MixedNUTS",
})
# (missing keys, exactly) and (missing keys, as a prefix) and (first unexpected key) that allow it.
LENIENT_MISSING_EXACT = (("mu", "sigma"), ("mean", "std"))
LENIENT_MISSING_FIRST = (("normalize.mean", "normalize.std"),)
LENIENT_UNEXPECTED_FIRST = ("model_preact_hl1.1.weight", "conv1.scores")


class ZooError(ConfigError):
    """A zoo name that is not in the table, or that we cannot build."""


@dataclass(frozen=True)
class ZooEntry:
    """One zoo entry. config: our registry config (None where we cannot build it); arch: its
    architecture in words; reason: why it is refused, where it is; take: the checkpoint entry
    RobustBench takes first ("last"), if any."""

    dataset: str
    threat: str
    name: str
    arch: str
    config: dict | None
    reason: str | None = None
    take: str | None = None

    @property
    def supported(self) -> bool:
        return self.config is not None

    @property
    def lenient(self) -> bool:
        return self.name in LENIENT


# Builders: each returns (architecture in words, config or None, reason).
def _wrn(depth, k, sub_block1=False, ms=None, norm=None, head="linear", activation="relu"):
    cfg = {"arch": "wrn", "depth": depth, "widen_factor": k, "sub_block1": sub_block1,
           "normalization": norm or ("mu_sigma" if ms else "none")}
    if ms:
        cfg.update(mean=list(ms[0]), std=list(ms[1]))
    if head != "linear":
        cfg["head"] = head
    if activation != "relu":
        cfg["activation"] = activation
    words = (f"WideResNet-{depth}-{k}" + (" (cosine head)" if head != "linear" else "")
             + (" (PSSiLU)" if activation == "pssilu" else ""))
    return words, cfg, None


def _dm(depth, width, act, ms=C10, meansparse=False):
    cfg = {"arch": "dm-wrn", "depth": depth, "width": width, "activation": act, "normalization": "mean_std",
           "mean": list(ms[0]), "std": list(ms[1])}
    if meansparse:
        cfg["meansparse"] = True
    return (f"{'MeanSparse ' if meansparse else ''}DMWideResNet-{depth}-{width} ({'Swish' if act == 'swish' else 'SiLU'})",
            cfg, None)


def _dm_preact(ms=C10):
    return ("DMPreActResNet-18 (Swish)", {"arch": "dm-preact-resnet", "depth": 18, "activation": "swish",
                                          "normalization": "mean_std", "mean": list(ms[0]), "std": list(ms[1])}, None)


def _preact(ms=None, shortcut="input", bn_before_fc=False, words="PreActResNet-18"):
    cfg = {"arch": "preact-resnet18", "normalization": "mu_sigma" if ms else "none"}
    if ms:
        cfg.update(mean=list(ms[0]), std=list(ms[1]))
    if shortcut != "input":
        cfg["shortcut"] = shortcut
    if bn_before_fc:
        cfg["bn_before_fc"] = True
    return words, cfg, None


def _r18():
    return "ResNet-18", {"arch": "resnet18", "normalization": "none"}, None


def _r50(ms):
    return "ResNet-50", {"arch": "resnet50", "normalization": "mu_sigma", "mean": list(ms[0]), "std": list(ms[1])}, None


def _grouped(widths, depths):
    return (f"WideResNet, widths {widths}, depths {depths}",
            {"arch": "wrn-grouped", "widths": list(widths), "depths": list(depths), "normalization": "none"}, None)


def _no(words, reason):
    return words, None, reason


ENSEMBLE = "an ensemble of several files (RobustBench loads NAME.pt_m0.pt, _m1, ...)"
TIMM = "a timm XCiT model that RobustBench downloads through timm, not a file of the zoo layout"


def _entries() -> list[tuple[str, str, str, tuple]]:
    L, T = "Linf", "L2"
    c10_linf = [
        ("Andriushchenko2020Understanding", _preact()),
        ("Carmon2019Unlabeled", _wrn(28, 10, True)),
        ("Sehwag2020Hydra", _wrn(28, 10, True)),
        ("Wang2020Improving", _wrn(28, 10, True)),
        ("Hendrycks2019Using", _wrn(28, 10, norm="2x-1")),
        ("Rice2020Overfitting", _wrn(34, 20, ms=C10)),
        ("Zhang2019Theoretically", _wrn(34, 10, True)),
        ("Engstrom2019Robustness", _r50(ENGSTROM)),
        ("Chen2020Adversarial", _no("3 x ResNet-50 (pre-activated bottlenecks), softmax average", ENSEMBLE)),
        ("Huang2020Self", _wrn(34, 10, True)),
        ("Pang2020Boosting", _wrn(34, 20, True, ms=C10, head="cosine")),
        ("Wong2020Fast", _preact(ms=C10)),
        ("Ding2020MMA", _wrn(28, 4, norm="per_image")),
        ("Zhang2019You", _wrn(34, 10, True)),
        ("Zhang2020Attacks", _wrn(34, 10, True)),
        ("Wu2020Adversarial_extra", _wrn(28, 10, True)),
        ("Wu2020Adversarial", _wrn(34, 10)),
        ("Gowal2020Uncovering_70_16", _dm(70, 16, "swish")),
        ("Gowal2020Uncovering_70_16_extra", _dm(70, 16, "swish")),
        ("Gowal2020Uncovering_34_20", _dm(34, 20, "swish")),
        ("Gowal2020Uncovering_28_10_extra", _dm(28, 10, "swish")),
        ("Sehwag2021Proxy", _wrn(34, 10)),
        ("Sehwag2021Proxy_R18", _r18()),
        ("Sehwag2021Proxy_ResNest152", _no("ResNeSt-152", "split-attention ResNeSt blocks are not implemented here")),
        ("Sitawarin2020Improving", _wrn(34, 10, True)),
        ("Chen2020Efficient", _wrn(34, 10, True, ms=C10)),
        ("Cui2020Learnable_34_20", _wrn(34, 20, True)),
        ("Cui2020Learnable_34_10", _wrn(34, 10, True)),
        ("Zhang2020Geometry", _wrn(28, 10, True)),
        ("Rebuffi2021Fixing_28_10_cutmix_ddpm", _dm(28, 10, "swish")),
        ("Rebuffi2021Fixing_106_16_cutmix_ddpm", _dm(106, 16, "swish")),
        ("Rebuffi2021Fixing_70_16_cutmix_ddpm", _dm(70, 16, "swish")),
        ("Rebuffi2021Fixing_70_16_cutmix_extra", _dm(70, 16, "swish")),
        ("Sridhar2021Robust", _wrn(28, 10, True)),
        ("Sridhar2021Robust_34_15", _wrn(34, 15, True)),
        ("Rebuffi2021Fixing_R18_ddpm", _dm_preact()),
        ("Rade2021Helper_R18_extra", _dm_preact()),
        ("Rade2021Helper_R18_ddpm", _dm_preact()),
        ("Rade2021Helper_extra", _dm(34, 10, "swish")),
        ("Rade2021Helper_ddpm", _dm(28, 10, "swish")),
        ("Huang2021Exploring", _grouped((16, 320, 640, 512), (5, 5, 5))),
        ("Huang2021Exploring_ema", _grouped((16, 320, 640, 512), (5, 5, 5))),
        ("Addepalli2021Towards_RN18", _r18()),
        ("Addepalli2021Towards_WRN34", _wrn(34, 10, True)),
        ("Gowal2021Improving_70_16_ddpm_100m", _dm(70, 16, "swish")),
        ("Dai2021Parameterizing", _wrn(28, 10, activation="pssilu")),
        ("Gowal2021Improving_28_10_ddpm_100m", _dm(28, 10, "swish")),
        ("Gowal2021Improving_R18_ddpm_100m", _dm_preact()),
        ("Chen2021LTD_WRN34_10", _wrn(34, 10)),
        ("Chen2021LTD_WRN34_20", _wrn(34, 20)),
        ("Standard", _wrn(28, 10)),
        ("Kang2021Stable", _no("WRN-70-16 + neural ODE block (SODEF)", "its ODE block is not implemented here")),
        ("Jia2022LAS-AT_34_10", _wrn(34, 10)),
        ("Jia2022LAS-AT_70_16", _wrn(70, 16)),
        ("Pang2022Robustness_WRN28_10", _dm(28, 10, "swish")),
        ("Pang2022Robustness_WRN70_16", _dm(70, 16, "swish")),
        ("Addepalli2022Efficient_RN18", _r18()),
        ("Addepalli2022Efficient_WRN_34_10", _wrn(34, 10)),
        ("Debenedetti2022Light_XCiT-S12", _no("XCiT-S12", TIMM)),
        ("Debenedetti2022Light_XCiT-M12", _no("XCiT-M12", TIMM)),
        ("Debenedetti2022Light_XCiT-L12", _no("XCiT-L12", TIMM)),
        ("Huang2022Revisiting_WRN-A4", ("RobustResNet WRN-A4 (SiLU)", {
            "arch": "robust-resnet", "widths": [16, 160, 448, 384], "depths": [27, 28, 13], "activation": "silu",
            "normalization": "mu_sigma", "mean": list(C10[0]), "std": list(C10[1])}, None)),
        ("Wang2023Better_WRN-28-10", _dm(28, 10, "silu")),
        ("Wang2023Better_WRN-70-16", _dm(70, 16, "silu")),
        ("Xu2023Exploring_WRN-28-10", _dm(28, 10, "silu")),
        ("Cui2023Decoupled_WRN-28-10", _dm(28, 10, "silu")),
        ("Cui2023Decoupled_WRN-34-10", _wrn(34, 10)),
        ("Bai2023Improving_edm", _no("composite of two classifiers and a mixing network", ENSEMBLE)),
        ("Peng2023Robust", _no("RaWideResNet-70-16", "its robust-architecture (RaWideResNet) blocks are not "
                               "implemented here")),
        ("Bai2024MixedNUTS", _no("mixture of a standard and a robust classifier", ENSEMBLE)),
        ("Chen2024Data_WRN_34_10", _wrn(34, 10)),
        ("Chen2024Data_WRN_34_20", _wrn(34, 20)),
        ("Amini2024MeanSparse_Ra_WRN_70_16", _no("MeanSparse RaWideResNet-70-16", "its robust-architecture "
                                                "(RaWideResNet) blocks are not implemented here")),
        ("Amini2024MeanSparse_S-WRN-94-16", _dm(94, 16, "silu", meansparse=True)),
        ("Bartoldson2024Adversarial_WRN-94-16", _dm(94, 16, "silu")),
        ("Bartoldson2024Adversarial_WRN-82-8", _dm(82, 8, "silu")),
    ]
    c10_l2 = [
        ("Augustin2020Adversarial", _r50(AUGUSTIN)),
        ("Engstrom2019Robustness", _r50(ENGSTROM)),
        ("Rice2020Overfitting", _preact(ms=C10, shortcut="activation", bn_before_fc=True,
                                        words="PreActResNet-18 (PreActBlockV2, BN before fc)")),
        ("Rony2019Decoupling", _wrn(28, 10, ms=RONY)),
        ("Standard", _wrn(28, 10)),
        ("Ding2020MMA", _wrn(28, 4, norm="per_image")),
        ("Wu2020Adversarial", _wrn(34, 10)),
        ("Gowal2020Uncovering", _dm(70, 16, "swish")),
        ("Gowal2020Uncovering_extra", _dm(70, 16, "swish")),
        ("Sehwag2021Proxy", _wrn(34, 10)),
        ("Sehwag2021Proxy_R18", _r18()),
        ("Rebuffi2021Fixing_70_16_cutmix_ddpm", _dm(70, 16, "swish")),
        ("Rebuffi2021Fixing_28_10_cutmix_ddpm", _dm(28, 10, "swish")),
        ("Rebuffi2021Fixing_70_16_cutmix_extra", _dm(70, 16, "swish")),
        ("Augustin2020Adversarial_34_10", _wrn(34, 10, ms=AUGUSTIN)),
        ("Augustin2020Adversarial_34_10_extra", _wrn(34, 10, ms=AUGUSTIN)),
        ("Rebuffi2021Fixing_R18_cutmix_ddpm", _dm_preact()),
        ("Rade2021Helper_R18_ddpm", _dm_preact()),
        ("Wang2023Better_WRN-28-10", _dm(28, 10, "silu")),
        ("Wang2023Better_WRN-70-16", _dm(70, 16, "silu")),
        ("Amini2024MeanSparse_S-WRN-70-16", _dm(70, 16, "silu", meansparse=True)),
    ]
    c100 = C100_DM
    c100_linf = [
        ("Gowal2020Uncovering", _dm(70, 16, "swish", c100)),
        ("Gowal2020Uncovering_extra", _dm(70, 16, "swish", c100)),
        ("Cui2020Learnable_34_20_LBGAT6", _wrn(34, 20, True)),
        ("Cui2020Learnable_34_10_LBGAT0", _wrn(34, 10, True)),
        ("Cui2020Learnable_34_10_LBGAT6", _wrn(34, 10, True)),
        ("Chen2020Efficient", _wrn(34, 10, True, ms=C100_CHEN)),
        ("Wu2020Adversarial", _wrn(34, 10, ms=C100_WU)),
        ("Sehwag2021Proxy", _wrn(34, 10)),
        ("Sitawarin2020Improving", _wrn(34, 10, True)),
        ("Hendrycks2019Using", _wrn(28, 10, norm="2x-1")),
        ("Rice2020Overfitting", _preact(ms=C100_WU, shortcut="activation", bn_before_fc=True,
                                        words="PreActResNet-18 (shortcut from the activation, BN before fc)")),
        ("Rebuffi2021Fixing_70_16_cutmix_ddpm", _dm(70, 16, "swish", c100)),
        ("Rebuffi2021Fixing_28_10_cutmix_ddpm", _dm(28, 10, "swish", c100)),
        ("Rebuffi2021Fixing_R18_ddpm", _dm_preact(c100)),
        ("Rade2021Helper_R18_ddpm", _dm_preact(c100)),
        ("Addepalli2021Towards_PARN18", _preact(shortcut="activation", bn_before_fc=True,
                                                words="PreActResNet-18 (PreActBlockV2, BN before fc)")),
        ("Addepalli2021Towards_WRN34", _wrn(34, 10, True)),
        ("Chen2021LTD_WRN34_10", _wrn(34, 10, True)),
        ("Pang2022Robustness_WRN28_10", _dm(28, 10, "swish", c100)),
        ("Pang2022Robustness_WRN70_16", _dm(70, 16, "swish", c100)),
        ("Jia2022LAS-AT_34_10", _wrn(34, 10, True)),
        ("Jia2022LAS-AT_34_20", _wrn(34, 20)),
        ("Addepalli2022Efficient_RN18", _r18()),
        ("Addepalli2022Efficient_WRN_34_10", _wrn(34, 10)),
        ("Debenedetti2022Light_XCiT-S12", _no("XCiT-S12", TIMM)),
        ("Debenedetti2022Light_XCiT-M12", _no("XCiT-M12", TIMM)),
        ("Debenedetti2022Light_XCiT-L12", _no("XCiT-L12", TIMM)),
        ("Cui2020Learnable_34_10_LBGAT9_eps_8_255", _wrn(34, 10)),
        ("Wang2023Better_WRN-28-10", _dm(28, 10, "silu", c100)),
        ("Wang2023Better_WRN-70-16", _dm(70, 16, "silu", c100)),
        ("Bai2023Improving_edm", _no("composite of two classifiers and a mixing network", ENSEMBLE)),
        ("Bai2023Improving_trades", _no("composite of two classifiers and a mixing network", ENSEMBLE)),
        ("Cui2023Decoupled_WRN-28-10", _dm(28, 10, "silu", c100)),
        ("Cui2023Decoupled_WRN-34-10", _wrn(34, 10)),
        ("Cui2023Decoupled_WRN-34-10_autoaug", _wrn(34, 10)),
        ("Bai2024MixedNUTS", _no("mixture of a standard and a robust classifier", ENSEMBLE)),
        ("Chen2024Data_WRN_34_10", _wrn(34, 10)),
        ("Amini2024MeanSparse_S-WRN-70-16", _dm(70, 16, "silu", c100, meansparse=True)),
    ]
    return ([("cifar10", L, n, e) for n, e in c10_linf] + [("cifar10", T, n, e) for n, e in c10_l2]
            + [("cifar100", L, n, e) for n, e in c100_linf])


def _table() -> dict[tuple[str, str, str], ZooEntry]:
    table = {}
    classes = {"cifar10": 10, "cifar100": 100}
    for dataset, threat, name, (words, cfg, reason) in _entries():
        if cfg is not None:
            cfg = {**cfg, "num_classes": classes[dataset], "in_channels": 3}
        take = "last" if name == "Andriushchenko2020Understanding" or name.startswith("Kireev2021Effectiveness") else None
        table[(dataset, threat, name)] = ZooEntry(dataset, threat, name, words, cfg, reason, take)
    return table


ZOO: dict[tuple[str, str, str], ZooEntry] = _table()


def zoo_entries(dataset: str | None = None, threat: str | None = None) -> list[ZooEntry]:
    """The table's entries, in RobustBench's order, optionally of one dataset and threat model."""
    return [e for e in ZOO.values() if (dataset is None or e.dataset == dataset) and (threat is None or e.threat == threat)]


def zoo_entry(dataset: str, threat: str, name: str) -> ZooEntry:
    """The entry of a name; ZooError if RobustBench's zoo has no such name for this dataset and threat."""
    if dataset not in DATASETS:
        raise ZooError(f"RobustBench's zoo has CIFAR-10 and CIFAR-100 models here ({DATASETS}); the defense's "
                       f"dataset is {dataset!r}")
    if threat not in THREATS:
        raise ZooError(f"threat model {threat!r} is not one of RobustBench's {THREATS}")
    entry = ZOO.get((dataset, threat, name))
    if entry is None:
        close = sorted(n for (d, t, n) in ZOO if d == dataset and t == threat and n.lower()[:6] == name.lower()[:6])
        others = [t for t in THREATS if (dataset, t, name) in ZOO]
        raise ZooError(f"RobustBench has no {dataset} {threat} model named {name!r}"
                       + (f" (it has one under {others[0]})" if others else "")
                       + (f"; did you mean one of {close}?" if close else "; `robustsweep models` lists them"))
    return entry


def buildable(dataset: str, threat: str, name: str) -> ZooEntry:
    """The entry, if we can build it; ZooError naming the entry and the reason otherwise."""
    entry = zoo_entry(dataset, threat, name)
    if not entry.supported:
        raise ZooError(f"RobustBench's {dataset} {threat} model {name} ({entry.arch}) is not supported: {entry.reason}")
    return entry


def default_file(dataset: str, threat: str, name: str) -> Path:
    """Where RobustBench's loader keeps a zoo file: {$ROBUSTBENCH_MODELS or ./models}/{dataset}/{threat}/{name}.pt."""
    return Path(os.environ.get(ENV) or "models") / dataset / threat / f"{name}.pt"


def refuse_zoo_file(ref, dataset: str, keys=None) -> None:
    """ZooError if an ARCH:PATH reference names a file of RobustBench's zoo layout ({NAME}.pt)
    whose entry applies an input transform that the preset, reading the file's keys (`keys`: its
    state dict's names; None: read them), would not: the transform lives in RobustBench's model
    class, not in the file (Wong2020Fast without mu/sigma, Hendrycks2019Using's 2x - 1, ...)."""
    path = Path(ref.path)
    threats = [t for (d, t, n) in ZOO if d == dataset and n == path.stem]
    if not threats:
        return
    threat = path.parent.name if path.parent.name in threats else threats[0]
    entry = zoo_entry(dataset, threat, path.stem)
    if not entry.supported:
        return
    if keys is None:
        if not path.is_file():
            return
        from pipeline.models.importer import read_weights_only

        obj = read_weights_only(path)
        take = "last" if isinstance(obj, dict) and isinstance(obj.get("last"), dict) and "best" in obj else None
        keys = set(robustbench_state(obj, path, take))
    preset = "mu_sigma" if {"mu", "sigma"} <= set(keys) else "none"
    if entry.config.get("normalization") != preset:
        raise ZooError(f"model robustbench:{ref.preset}:{ref.path}: the file is RobustBench's {dataset} {threat} entry "
                       f"{entry.name} ({entry.arch}), whose input transform ({entry.config['normalization']}) lives in "
                       f"RobustBench's model class, not in the file; name it instead: "
                       f"robustbench:{threat}/{entry.name}:{ref.path}")


def _strip(state: dict, substr: str) -> dict:
    return {(k[len(substr):] if substr in k else k): v for k, v in state.items()}


def zoo_state(path: Path, entry: ZooEntry) -> dict[str, torch.Tensor]:
    """The state dict RobustBench's loader makes of a zoo file (steps 1-4 of the module docstring)."""
    from pipeline.models.importer import read_weights_only

    return robustbench_state(read_weights_only(path), path, entry.take, entry.name)


def robustbench_state(ckpt, path: Path, take: str | None = None, name: str = "this") -> dict[str, torch.Tensor]:
    """Steps 2-4 on a checkpoint read from `path`: the `take` entry, the `state_dict` entry, the key rewriting."""
    if take is not None:
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get(take), dict):
            raise CheckpointError(f"{path}: RobustBench's {name} file holds {{'last', 'best'}} checkpoints; "
                                  f"this one has no {take!r} entry")
        ckpt = ckpt[take]
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    inner = ckpt.get("state_dict")
    state = inner if isinstance(inner, dict) else ckpt
    state = _strip(_strip(state, "module."), "model.")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} holds no state dict: its entry {bad[0]!r} is not a tensor")
    return state


def fit_zoo_state(model: nn.Module, state: dict[str, torch.Tensor], entry: ZooEntry, where: str,
                  assign: bool = False) -> None:
    """Load `state` into `model` as RobustBench's `_safe_load_state_dict` would (step 5). assign: take
    the file's tensors as the parameters (a model built on the meta device, checked without a copy)."""
    own = model.state_dict()
    what = f"RobustBench's {entry.name} ({entry.arch})"
    for name, tensor in own.items():
        if name in state and tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where} does not fit {what}: tensor {name!r} has shape {tuple(state[name].shape)} "
                                  f"in the file, the model expects {tuple(tensor.shape)}")
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        allowed = entry.lenient and (tuple(missing) in LENIENT_MISSING_EXACT
                                     or any(tuple(missing[:len(p)]) == p for p in LENIENT_MISSING_FIRST)
                                     or (unexpected[:1] and unexpected[0] in LENIENT_UNEXPECTED_FIRST))
        if not allowed:
            first = (f"tensor {missing[0]!r} is missing from the file" if missing
                     else f"the file's tensor {unexpected[0]!r} has no place in the model")
            raise CheckpointError(f"{where} does not fit {what}, which RobustBench loads strictly: {first} "
                                  f"({len(missing)} missing, {len(unexpected)} unexpected)")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False, assign=assign)
    updating = [k for k, v in model.state_dict().items() if k.endswith("flag_update_statistics") and v.item() != 0]
    if updating:
        raise CheckpointError(f"{where}: {updating[0]} is set: {what} would update its MeanSparse statistics on "
                              f"every inference, a model that changes as it is attacked; refused")


def load_zoo_model(dataset: str, threat: str, name: str, path: str | os.PathLike | None = None
                   ) -> tuple[nn.Module, dict, dict]:
    """(model in eval mode, config, provenance) of a zoo entry, from `path` or where RobustBench keeps it."""
    from pipeline.models.importer import sha256_file

    entry = buildable(dataset, threat, name)
    path = Path(path) if path is not None else default_file(dataset, threat, name)
    if not path.is_file():
        raise CheckpointError(f"RobustBench model file {path} not found; download {name} with RobustBench "
                              f"(load_model(model_name={name!r}, dataset={dataset!r}, threat_model={threat!r}) keeps "
                              f"it there), set ${ENV} to the folder that holds {dataset}/, or give the path: "
                              f"robustbench:{threat}/{name}:PATH")
    state = zoo_state(path, entry)
    model = build_model(entry.config)
    fit_zoo_state(model, state, entry, str(path))
    meta = {"source": {"file": path.name, "sha256": sha256_file(path), "format": "robustbench",
                       "zoo": f"{dataset}/{threat}/{name}"}}
    return model.eval(), dict(entry.config), meta


def model_listing(dataset: str | None = None, threat: str | None = None) -> list[dict]:
    """One row per architecture preset (edm:PRESET:PATH, robustbench:ARCH:PATH) and per zoo entry
    (robustbench:THREAT/NAME): {"model", "dataset", "arch", "supported", "reason"}; presets
    have no dataset and are listed unless a threat model is asked for."""
    from pipeline.models.importer import CLASSIFIER_PRESETS, EDM_PRESETS

    rows = []
    if threat is None:
        for name in EDM_PRESETS:
            rows.append({"model": f"edm:{name}:PATH", "dataset": None, "arch": "EDM network", "supported": True,
                         "reason": None})
        for name, cfg in CLASSIFIER_PRESETS.items():
            rows.append({"model": f"robustbench:{name}:PATH", "dataset": None, "arch": cfg["arch"], "supported": True,
                         "reason": None})
    for e in zoo_entries(dataset, threat):
        rows.append({"model": f"robustbench:{e.threat}/{e.name}", "dataset": e.dataset, "arch": e.arch,
                     "supported": e.supported, "reason": e.reason})
    return rows


__all__ = ["model_listing", "ZOO", "ZooEntry", "ZooError", "THREATS", "DATASETS", "ENV", "zoo_entries", "zoo_entry", "buildable",
           "default_file", "refuse_zoo_file", "zoo_state", "robustbench_state", "fit_zoo_state", "load_zoo_model"]
