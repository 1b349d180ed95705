"""Clean predictions of a defense over a split, batched, with explicit example ids."""

from __future__ import annotations

import torch

from pipeline.rng import Draw


def predict(defense, x: torch.Tensor, example_ids: torch.Tensor | None = None, *, seed: int = 0,
            batch_size: int = 64, progress=None) -> torch.Tensor:
    """Logits (N, K) of `defense` on x (N, C, H, W) in [0, 1], without gradients.

    Each example's randomness is the first call of (seed, example id), so the logits do not
    depend on batch_size. progress: an optional callable(n_done) for long runs.
    """
    ids = torch.arange(x.shape[0]) if example_ids is None else torch.as_tensor(example_ids)
    device = next((b.device for b in defense.buffers()), None) or next((p.device for p in defense.parameters()), torch.device("cpu"))
    outs = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            rows = ids[start:start + batch_size]
            draw = Draw(seed, rows, torch.zeros_like(rows))
            xb = x[start:start + batch_size].to(device)
            outs.append(defense.evaluate(xb, draw).cpu())
            if progress is not None:
                progress(start + len(rows))
    return torch.cat(outs) if outs else torch.zeros(0, defense.num_classes)

