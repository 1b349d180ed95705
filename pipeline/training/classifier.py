"""Training of the classifiers that MI wraps and that serve as undefended baselines.

Methods:
    erm     empirical risk minimisation, cross-entropy on clean batches.
    mixup   Zhang et al. 2018: x~ = lam x_i + (1 - lam) x_j, y~ = lam y_i + (1 - lam) y_j,
            lam ~ Beta(alpha, alpha), alpha = 1; the training MI-PL/OL assume (Pang et al. 2020).
    iat     interpolated adversarial training (Lamb et al. 2019), as used by the MI paper:
            loss = 0.5 mixup loss on the clean batch + 0.5 mixup loss on its PGD examples.
    pgd_at  Madry et al. 2018: cross-entropy on PGD-k Linf examples with a random start,
            step size 2.5 eps / k.

The PGD here is the small one training needs; evaluation attacks live in pipeline.attacks.
All randomness (init, shuffling, lam, PGD starts, augmentation) comes from one seed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.datasets import dataset_info
from pipeline.data import load_split
from pipeline.errors import ConfigError, InputError
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.registry import build_model
from pipeline.training.progress import progress_bar

METHODS = ("erm", "mixup", "iat", "pgd_at")

# Default recipes, per dataset and method. Digits: eps = 0.1 in [0, 1] pixel units for the
# adversarial methods -- 8/255 is below the quantisation step of digits (1/16), so it would
# not move a pixel by a full grey level; 0.1 is ~1.6 levels, comparable in effect to 8/255 on CIFAR.
_DIGITS_BASE = {"epochs": 30, "batch_size": 64, "lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0, "augment": "none"}
_CIFAR_BASE = {"epochs": 200, "batch_size": 128, "lr": 0.1, "optimizer": "sgd", "weight_decay": 5e-4, "augment": "crop_flip"}
DEFAULT_TRAINING = {
    "digits": {
        "erm": dict(_DIGITS_BASE),
        "mixup": dict(_DIGITS_BASE, epochs=40),
        "iat": dict(_DIGITS_BASE, epochs=40, eps=0.1, pgd_steps=10),
        "pgd_at": dict(_DIGITS_BASE, epochs=40, eps=0.1, pgd_steps=10),
    },
    "cifar10": {m: dict(_CIFAR_BASE, **({"eps": 8 / 255, "pgd_steps": 10} if m in ("iat", "pgd_at") else {})) for m in METHODS},
    "cifar100": {m: dict(_CIFAR_BASE, **({"eps": 8 / 255, "pgd_steps": 10} if m in ("iat", "pgd_at") else {})) for m in METHODS},
}


def default_classifier_config(dataset: str) -> dict:
    """The default architecture of a dataset: SmallCNN for digits, ResNet-18 for CIFAR."""
    if dataset == "digits":
        info = dataset_info(dataset)
        return {"arch": "cnn", "in_channels": info.channels, "num_classes": info.classes, "image_size": info.size, "width": 32}
    if dataset in ("cifar10", "cifar100"):
        info = dataset_info(dataset)
        return {"arch": "resnet18", "num_classes": info.classes, "in_channels": info.channels}
    raise ConfigError(f"no default classifier for dataset {dataset!r}; expected 'digits', 'cifar10' or 'cifar100'")


class PGD:
    """Linf PGD with a uniform random start (Madry et al. 2018, eq. 2), images kept in [0, 1].

    x^{k+1} = Proj_{B_inf(x, eps) cap [0,1]^d} (x^k + step * sign(grad_x CE(f(x^k), y))).
    """

    def __init__(self, eps: float, steps: int, step_size: float | None = None):
        self.eps = eps
        self.steps = steps
        # 2.5 eps / k lets a k-step walk cross the ball and still come back (Madry et al. 2018).
        self.step_size = step_size if step_size is not None else 2.5 * eps / steps

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x (B, C, H, W) in [0, 1], y (B,) -> adversarial x' (B, C, H, W), detached, ||x' - x||_inf <= eps."""
        was_training = model.training
        # Eval mode while attacking: batch-norm statistics are not updated by adversarial batches.
        model.eval()
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * self.eps
        x_adv = (x + delta).clamp(0.0, 1.0)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv + self.step_size * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0.0, 1.0)
        model.train(was_training)
        return x_adv.detach()


def mixup_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """CE of f(lam x + (1-lam) x[perm]) against lam onehot(y) + (1-lam) onehot(y[perm]) (Zhang et al. 2018, eq. 1).

    CE is linear in the target, so the mixed target is the same mix of two hard-label losses.
    """
    logits = model(lam * x + (1.0 - lam) * x[perm])
    return lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y[perm])


def _augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """'crop_flip': random 4-pixel-padded crop and horizontal flip (the CIFAR standard); 'none'."""
    if kind == "none":
        return x
    if kind != "crop_flip":
        raise ConfigError(f"unknown augment {kind!r}; expected 'none' or 'crop_flip'")
    B, C, H, W = x.shape
    padded = F.pad(x, (4, 4, 4, 4))  # zero padding, as torchvision RandomCrop(32, padding=4)
    dy = torch.randint(0, 9, (B,), generator=generator, device=x.device)
    dx = torch.randint(0, 9, (B,), generator=generator, device=x.device)
    # Crop = gather the rows dy..dy+H-1, then the columns dx..dx+W-1, of each padded image.
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None].expand(B, C, H, W + 8)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :].expand(B, C, H, W)
    out = padded.gather(2, rows).gather(3, cols)
    flip = torch.rand(B, generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on x (N, C, H, W) in [0, 1] with labels y (N,), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i:i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


def train_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    config: dict,
    *,
    method: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    eps: float | None = None,
    pgd_steps: int = 10,
    mixup_alpha: float = 1.0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    augment: str = "none",
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict]:
    """Train a classifier built from `config` on x float32 (N, C, H, W) in [0, 1], y int64 (N,).

    method: one of METHODS; eps (Linf, [0, 1] pixel units) is required for "iat" and "pgd_at".
    optimizer: "adam" (constant lr) or "sgd" (momentum 0.9, Nesterov, cosine-annealed lr).
    Each epoch visits a fresh permutation of the data; the last partial batch is dropped when
    it is smaller than 2 (mixup needs a partner). Returns (model in eval mode on CPU, stats)
    with stats {"seconds", "loss" (mean of the last epoch), "epochs", "method"}.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown training method {method!r}; expected one of {METHODS}")
    if method in ("iat", "pgd_at") and (eps is None or eps <= 0):
        raise ConfigError(f"method {method!r} needs eps > 0 (Linf budget in [0, 1] pixel units), got {eps}")
    if x.dim() != 4 or y.shape != (x.shape[0],):
        raise InputError(f"expected x (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if epochs < 1 or batch_size < 2:
        raise ConfigError(f"epochs must be >= 1 and batch_size >= 2, got {epochs} and {batch_size}")

    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    # Beta draws have no torch.Generator API; a numpy Generator on the same seed keeps them reproducible.
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config).to(device)
    x = x.to(device, torch.float32)
    y = y.to(device, torch.long)
    N = x.shape[0]
    steps_per_epoch = max(1, N // batch_size) if N % batch_size < 2 else N // batch_size + 1
    total_steps = epochs * steps_per_epoch

    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = None
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    else:
        raise ConfigError(f"unknown optimizer {optimizer!r}; expected 'adam' or 'sgd'")
    pgd = PGD(eps, pgd_steps) if method in ("iat", "pgd_at") else None

    bar, task = progress_bar(progress, f"train {config.get('arch')} ({method})", total_steps)
    start = time.perf_counter()
    epoch_loss = float("nan")
    model.train()
    with bar:
        for epoch in range(epochs):
            order = torch.randperm(N, generator=gen, device=device)
            total, count = 0.0, 0
            for i in range(0, N, batch_size):
                idx = order[i:i + batch_size]
                if idx.numel() < 2:
                    continue
                xb, yb = _augment(x[idx], augment, gen), y[idx]
                loss = _batch_loss(model, xb, yb, method, pgd, mixup_alpha, rng, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                total += float(loss.detach()) * idx.numel()
                count += idx.numel()
                bar.advance(task)
            epoch_loss = total / max(1, count)
            if not math.isfinite(epoch_loss):
                raise FloatingPointError(f"training loss became {epoch_loss} in epoch {epoch}; lower lr ({lr})")
            bar.update(task, info=f"epoch {epoch + 1}/{epochs} loss {epoch_loss:.4f}")
    seconds = time.perf_counter() - start
    model = model.to("cpu").eval()
    return model, {"seconds": seconds, "loss": epoch_loss, "epochs": epochs, "method": method}


def _batch_loss(model, x, y, method, pgd, alpha, rng, gen) -> torch.Tensor:
    if method == "erm":
        return F.cross_entropy(model(x), y)
    if method == "pgd_at":
        return F.cross_entropy(model(pgd(model, x, y, gen)), y)
    # mixup and iat: one lam and one partner permutation per batch (Zhang et al. 2018).
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
    if method == "mixup":
        return mixup_loss(model, x, y, lam, perm)
    # iat: adversarial examples of the unmixed batch, then mixed among themselves (Lamb et al. 2019, alg. 1).
    x_adv = pgd(model, x, y, gen)
    return 0.5 * mixup_loss(model, x, y, lam, perm) + 0.5 * mixup_loss(model, x_adv, y, lam, perm)


def train_default_classifier(
    dataset: str, method: str, out_dir: str | Path, progress: bool = True, seed: int = 0
) -> tuple[nn.Module, dict]:
    """Train the default classifier of `dataset` with `method` and its default recipe; save a checkpoint.

    Returns (model, meta); meta: dataset, method, seconds, test_accuracy, recipe, seed.
    """
    if dataset not in DEFAULT_TRAINING:
        raise ConfigError(f"no default classifier training recipe for dataset {dataset!r}; expected one of {sorted(DEFAULT_TRAINING)}")
    if method not in METHODS:
        raise ConfigError(f"unknown training method {method!r}; expected one of {METHODS}")
    recipe = DEFAULT_TRAINING[dataset][method]
    config = default_classifier_config(dataset)
    x, y = load_split(dataset, "train")
    device = "cuda" if dataset != "digits" and torch.cuda.is_available() else "cpu"
    model, stats = train_classifier(x, y, config, method=method, seed=seed, progress=progress, device=device, **recipe)
    x_test, y_test = load_split(dataset, "test")
    acc = evaluate_accuracy(model, x_test, y_test)
    meta = {"dataset": dataset, "method": method, "seconds": stats["seconds"], "test_accuracy": acc,
            "loss": stats["loss"], "recipe": recipe, "seed": seed, "kind": "classifier"}
    save_checkpoint(out_dir, model, config, meta)
    return model, meta


__all__ = ["train_classifier", "train_default_classifier", "evaluate_accuracy", "default_classifier_config",
           "mixup_loss", "PGD", "METHODS", "DEFAULT_TRAINING"]
