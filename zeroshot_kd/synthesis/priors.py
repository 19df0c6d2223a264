"""Image priors and augmentations shared by the optimizing methods (DeepInversion's forms)."""

from __future__ import annotations

import torch

__all__ = ["image_priors", "jitter_flip"]


def _diffs(x: torch.Tensor) -> list[torch.Tensor]:
    """The four neighbour differences DeepInversion uses: horizontal, vertical and both diagonals."""
    return [
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    ]


def image_priors(x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """TV-L1, TV-L2 and L2 priors of a batch, each as (batch value, per-sample values).

    Batch values follow NVlabs/DeepInversion ``get_image_prior_losses``:

    * ``tv_l2 = sum_k ||d_k||_2`` -- Frobenius norm of each difference map over the whole batch (not squared);
      per sample: ``sum_k ||d_k[i]||_2``.
    * ``tv_l1 = sum_k mean|d_k|``; per sample: ``sum_k mean|d_k[i]|`` (their batch mean is the batch value).
    * ``l2 = mean_i ||x_i||_2``; per sample: ``||x_i||_2``.
    """
    x = x.float()
    n = x.shape[0]
    tv_l2 = x.new_zeros(())
    tv_l1 = x.new_zeros(())
    tv_l2_i = x.new_zeros(n)
    tv_l1_i = x.new_zeros(n)
    for d in _diffs(x):
        sq = d.pow(2).flatten(1).sum(1)
        tv_l2 = tv_l2 + sq.sum().sqrt()
        tv_l2_i = tv_l2_i + sq.detach().sqrt()
        ab = d.abs().flatten(1).mean(1)
        tv_l1 = tv_l1 + ab.mean()
        tv_l1_i = tv_l1_i + ab.detach()
    l2_i = x.flatten(1).norm(dim=1)
    return {"tv_l1": (tv_l1, tv_l1_i), "tv_l2": (tv_l2, tv_l2_i), "l2": (l2_i.mean(), l2_i.detach())}


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
