"""Batch mixup for distillation on a few images (the training loop's ``mixup`` option).

Each image of a batch is mixed with a partner from the same batch, ``x' = lam x + (1 - lam) x[perm]`` with a
random permutation ``perm`` and ``lam ~ U(0, 1)`` drawn per image; the teacher and the student then see ``x'``, so
the KD target is the teacher's answer on the mixed image itself (no label interpolation). A mixed image's label
becomes unknown (-1): objectives that need labels use the teacher's top-1 there.

Why: KD fine-tuning of a quantized student on about a thousand images repeats them a hundred times or more, and
on synthetic images the student learns their artifacts. Mixed images are new inputs at every step and lie between
the teacher's modes, where its soft answers carry the most information. Measured (``bench/results/targets.md``),
fmnist_mobilenetv2, 1024 DeepInversion images, 4000 steps at lr 3e-4 after the default reconstruction, top-1 on
10000 real test images: W3A3 85.94 before fine-tuning, 84.18 after it without mixup, 86.86 / 87.77 / 87.52 with
it (seeds 0 / 1 / 2); W4A4 88.77 (fine-tuning rejected by the check) -> 90.22. With real images mixup adds too
(W3A3 88.20 -> 89.03, W4A4 90.19 -> 90.55).

The random draws come from a CPU generator seeded by the caller (per step), then move to the device, so CPU and
CUDA see the same mixing.
"""

from __future__ import annotations

import torch

__all__ = ["mixup_batch"]


def mixup_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix ``x`` with a permutation of itself (module docstring).

    Args:
        x: ``(B, ...)`` images.
        y: ``(B,)`` labels (-1 where unknown).
        generator: CPU generator; one permutation and then ``B`` mixing weights are drawn from it.

    Returns:
        The mixed images and the labels, -1 wherever an image got a partner other than itself.
    """
    n = x.shape[0]
    perm = torch.randperm(n, generator=generator)
    lam = torch.rand(n, generator=generator)
    mixed = perm != torch.arange(n)
    lam = torch.where(mixed, lam, torch.ones_like(lam)).to(x.device, x.dtype).view(-1, *[1] * (x.dim() - 1))
    out = lam * x + (1 - lam) * x[perm.to(x.device)]
    return out, torch.where(mixed.to(y.device), torch.full_like(y, -1), y)
