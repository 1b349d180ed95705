"""Training of the class-conditional epsilon model with the DDPM loss (Ho et al. 2020, eq. 14).

Label dropout (Ho & Salimans 2022) trains the NULL class as the unconditional model that the
likelihood-maximization step of RDC needs. All randomness (batches, timesteps, noise, label
dropout, dropout layers) comes from one seed, so a run is reproducible on one machine.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import load_split
from pipeline.diffusion.schedule import VPSchedule
from pipeline.errors import ConfigError, InputError
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.registry import build_model
from pipeline.models.unet import unet_config
from pipeline.training.progress import progress_bar

# Default training recipe per dataset: what `train_default_diffusion` runs. Digits: 1000 steps
# of 128 (89 epochs of the 1442 training images), past the point where the loss plateaus and
# more steps stopped buying test accuracy (BENCHMARKS.md, "Default models").
DEFAULT_TRAINING = {
    "digits": {"steps": 1000, "batch_size": 128, "lr": 2e-3, "ema_decay": 0.999, "label_dropout": 0.1, "warmup": 100},
}


class EMA:
    """Exponential moving average of a model's weights: theta_ema <- d theta_ema + (1 - d) theta.

    The average is what gets evaluated and saved; it smooths the SGD noise that a small model
    trained with a large learning rate keeps until the end.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Decay min(d, (1+n)/(10+n)) (as tf.train.ExponentialMovingAverage with num_updates):
        # early averages are not dominated by the random init; in short runs the effective
        # decay stays below d (0.991 at step 1000).
        d = min(self.decay, (1 + step) / (10 + step))
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


class DDPMLoss:
    """L_simple = E_{x0, y, t, eps} || eps - eps_theta(sqrt(a_t) x0 + sigma_t eps, t, y) ||^2 (DDPM eq. 14).

    t is uniform over [0, T); the class is replaced by the NULL class with probability
    `label_dropout`. The mean is over pixels as well as the batch, so the value is per pixel.
    """

    def __init__(self, schedule: VPSchedule, num_classes: int, label_dropout: float = 0.1):
        self.schedule = schedule
        self.num_classes = num_classes
        self.label_dropout = label_dropout

    def __call__(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x0 (B, C, H, W) in model space [-1, 1], y (B,) int64 -> scalar loss."""
        B = x0.shape[0]
        t = torch.randint(0, self.schedule.T, (B,), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        drop = torch.rand(B, generator=generator, device=x0.device) < self.label_dropout
        y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        x_t = self.schedule.add_noise(x0, t, eps)
        return F.mse_loss(model(x_t, t, y), eps)


def _check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise InputError(f"expected x (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise InputError(f"expected images in [0, 1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]")


def train_diffusion(
    x: torch.Tensor,
    y: torch.Tensor,
    config: dict,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    ema_decay: float,
    label_dropout: float = 0.1,
    warmup: int = 100,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict]:
    """Train a class-conditional epsilon model on (x, y) with the DDPM loss; return (EMA model, stats).

    x float32 (N, C, H, W) in [0, 1] (mapped to 2x - 1 here), y int64 (N,) in [0, num_classes).
    config: a model config for `pipeline.models.registry.build_model` (e.g. `unet_config("digits")`).
    Adam with a linear warmup over `warmup` steps, then constant lr (DDPM). Batches are drawn
    with replacement. stats: {"seconds", "loss" (mean of the last 100 steps), "steps", "losses"
    (per-step float list)}. The EMA model is returned in eval mode on CPU.
    """
    _check_data(x, y)
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    # The model init uses the global RNG; fork it so the caller's RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(config).to(device)
    num_classes = model.config["num_classes"]
    loss_fn = DDPMLoss(VPSchedule(), num_classes, label_dropout)
    x0 = (x.to(device, torch.float32) * 2.0 - 1.0).contiguous()
    y = y.to(device, torch.long)

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    ema = EMA(model, ema_decay)
    losses: list[float] = []
    bar, task = progress_bar(progress, "train diffusion", steps)
    start = time.perf_counter()
    model.train()
    with bar, torch.random.fork_rng(devices=[]):
        # Dropout layers draw from the global RNG; seeding it inside fork_rng keeps runs reproducible.
        torch.manual_seed(seed + 1)
        for step in range(steps):
            idx = torch.randint(0, x0.shape[0], (batch_size,), generator=gen, device=device)
            loss = loss_fn(model, x0[idx], y[idx], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema.update(model, step)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"diffusion loss became {losses[-1]} at step {step}; lower lr ({lr})")
            if step % 25 == 0 or step == steps - 1:
                bar.update(task, completed=step + 1, info=f"loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
    seconds = time.perf_counter() - start
    tail = losses[-100:]
    stats = {"seconds": seconds, "loss": sum(tail) / len(tail), "steps": steps, "losses": losses}
    return ema.model.to("cpu").eval(), stats


def train_default_diffusion(dataset: str, out_dir: str | Path, progress: bool = True, seed: int = 0) -> tuple[nn.Module, dict]:
    """Train the default UNet of `dataset` with its default recipe and save a checkpoint in out_dir.

    Only "digits" has a CPU-sized default recipe; CIFAR models are trained elsewhere (DDPM's
    800k steps) and loaded as checkpoints. meta: dataset, seconds, steps, loss, recipe, seed.
    """
    if dataset not in DEFAULT_TRAINING:
        raise ConfigError(f"no default diffusion training recipe for dataset {dataset!r}; expected one of {sorted(DEFAULT_TRAINING)}")
    recipe = DEFAULT_TRAINING[dataset]
    x, y = load_split(dataset, "train")
    config = unet_config(dataset)
    model, stats = train_diffusion(x, y, config, seed=seed, progress=progress, **recipe)
    meta = {"dataset": dataset, "seconds": stats["seconds"], "steps": stats["steps"], "loss": stats["loss"],
            "recipe": recipe, "seed": seed, "kind": "diffusion"}
    save_checkpoint(out_dir, model, config, meta)
    return model, meta


__all__ = ["train_diffusion", "train_default_diffusion", "DDPMLoss", "EMA", "DEFAULT_TRAINING"]
