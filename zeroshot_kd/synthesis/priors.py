"""Image priors and augmentations shared by the optimizing methods (DeepInversion's forms)."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["PRIORS", "image_priors", "jitter_flip"]


def _diffs(x: torch.Tensor) -> list[torch.Tensor]:
    """The four neighbour differences DeepInversion uses: horizontal, vertical and both diagonals."""
    return [
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    ]


PRIORS = ("tv_l1", "tv_l2", "l2")


def image_priors(x: torch.Tensor, which: Sequence[str] = PRIORS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """TV-L1, TV-L2 and L2 priors of a batch (those named in ``which``), each as (batch value, per-sample values).

    Batch values follow NVlabs/DeepInversion ``get_image_prior_losses``:

    * ``tv_l2 = sum_k ||d_k||_2`` -- Frobenius norm of each difference map over the whole batch (not squared);
      per sample: ``sum_k ||d_k[i]||_2``. The batch norm is taken as the norm of the per-sample norms (the same
      number), so each map is reduced once.
    * ``tv_l1 = sum_k mean|d_k|``; per sample: ``sum_k mean|d_k[i]|`` (their batch mean is the batch value).
    * ``l2 = mean_i ||x_i||_2``; per sample: ``||x_i||_2``.

    ``vector_norm`` throughout: its gradient is 0, not NaN, where a difference map is all zero.
    """
    x = x.float()
    dims = tuple(range(1, x.dim()))
    out = {}
    diffs = _diffs(x) if {"tv_l1", "tv_l2"} & set(which) else []
    if "tv_l2" in which:
        per = torch.stack([torch.linalg.vector_norm(d, dim=dims) for d in diffs])  # (4, N)
        out["tv_l2"] = (torch.linalg.vector_norm(per, dim=1).sum(), per.detach().sum(0))
    if "tv_l1" in which:
        per = torch.stack([d.abs().mean(dim=dims) for d in diffs])
        out["tv_l1"] = (per.mean(1).sum(), per.detach().sum(0))
    if "l2" in which:
        per = torch.linalg.vector_norm(x, dim=dims)
        out["l2"] = (per.mean(), per.detach())
    return out


def jitter_flip(x: torch.Tensor, jitter: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Roll the batch by one random offset in [-jitter, jitter] per axis and flip it horizontally with p=0.5.

    The random numbers come from ``g`` (a CPU generator seeded per batch), so every device and process draws the
    same augmentation sequence.
    """
    if jitter > 0:
        dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
    if flip and bool(torch.rand((), generator=g) < 0.5):
        x = torch.flip(x, dims=(3,))
    return x
