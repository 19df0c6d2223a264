"""Batch augmentations for distillation on a few images (the training loop's ``shift``, ``flip`` and ``mixup``).

**Shift and flip** (:func:`shift_flip_batch`): each image is translated by up to ``shift`` pixels in each
direction (edges replicated) and, with ``flip``, mirrored left-right with probability 1/2. The teacher answers on
the moved image, so the KD target stays right even where a move is not label-preserving (a mirrored digit): the
student learns the teacher's function on more inputs, not a label. Off by default everywhere. Measured (README,
``zkd distill`` section): a student trained from scratch (cifar-resnet:8x8, 2048 real Fashion-MNIST images) gains
0.7-1.0 points at 60 epochs (seeds 0 / 1) and loses 2-4 at 15 (it has not fitted the plain images yet); in
``zkd calibrate``'s fine-tuning on synthetic images the change is within the seed spread, and on real images it
costs (MobileNetV2 W4A4 90.55 -> 90.24; :mod:`zeroshot_kd.quant.finetuning`).

**Mixup** (:func:`mixup_batch`):
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

from typing import Sequence

import torch

__all__ = ["mixup_batch", "shift_flip_batch"]


def shift_flip_batch(x: torch.Tensor, generator: torch.Generator, shift: int = 0, flip: bool = False,
                     global_size: int | None = None, positions: Sequence[int] | None = None) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels and, with ``flip``, mirror it with probability 1/2.

    Args:
        x: ``(B, C, H, W)`` images.
        generator: CPU generator; ``N`` flip draws (when ``flip``), then ``N`` row and ``N`` column offsets in
            ``[0, 2 shift]`` (when ``shift``), ``N = global_size or B``, so CPU and CUDA see the same moves.
        shift: largest translation in pixels along each axis (0: none); the uncovered border repeats the edge.
        flip: mirror left-right with probability 1/2.
        global_size, positions: ``x`` holds the images at ``positions`` of a batch of ``global_size`` (a rank's
            slice under torchrun): the draws are made for the whole batch and each image gets its position's, so
            the slices together are moved exactly as the 1-process batch.

    Returns:
        The moved images: ``out[b, :, i, j] = x_f[b, :, clamp(i + dy_b - shift), clamp(j + dx_b - shift)]`` where
        ``x_f`` is ``x`` with the drawn images mirrored.
    """
    b, _, h, w = x.shape
    n = b if global_size is None else global_size
    take = torch.arange(b) if positions is None else torch.as_tensor(list(positions), dtype=torch.long)
    if flip:
        mirrored = (torch.rand(n, generator=generator)[take] < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(mirrored, x.flip(-1), x)
    if shift:
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)[take].to(x.device)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)[take].to(x.device)
        # one gather through clamped row/column indices: the replicate-padded crop without padding
        rows = (torch.arange(h, device=x.device) + dy[:, None] - shift).clamp(0, h - 1)  # (B, H)
        cols = (torch.arange(w, device=x.device) + dx[:, None] - shift).clamp(0, w - 1)  # (B, W)
        x = x.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, w))
        x = x.gather(3, cols[:, None, None, :].expand(-1, x.shape[1], h, -1))
    return x


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
