"""Deliberately shifted real data (negative, rotated, flipped images) for similarity and calibration studies."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import ZkdError
from ..spec import InputSpec

__all__ = ["TRANSFORMS", "TransformedDataset", "make_similarity_dataset", "parse_transforms"]


def _invert(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    return spec.normalize(1 - spec.denormalize(x.unsqueeze(0)))[0]


TRANSFORMS: dict[str, Callable[[torch.Tensor, InputSpec], torch.Tensor]] = {
    "invert": _invert,  # negative image: pixel p -> 1 - p
    "rot90": lambda x, spec: torch.rot90(x, 1, (-2, -1)),
    "rot180": lambda x, spec: torch.rot90(x, 2, (-2, -1)),
    "rot270": lambda x, spec: torch.rot90(x, 3, (-2, -1)),
    "hflip": lambda x, spec: x.flip(-1),
    "vflip": lambda x, spec: x.flip(-2),
}


def parse_transforms(text: str) -> list[str]:
    """``"rot90,invert"`` -> ``["rot90", "invert"]`` (applied left to right); unknown names raise ZkdError."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ZkdError(f"empty transform {text!r}; use one or more of {', '.join(TRANSFORMS)} separated by commas")
    for t in names:
        if t not in TRANSFORMS:
            raise ZkdError(f"unknown transform {t!r}; use one or more of {', '.join(TRANSFORMS)} separated by commas")
    return names


class TransformedDataset(Dataset):
    """A dataset with pixel-space shifts applied to each image (to build deliberately shifted real data).

    Args:
        base: yields ``(normalized image, label)``.
        transforms: names from :data:`TRANSFORMS`, applied left to right.
        spec: the input spec the images are normalized for (``invert`` works on [0, 1] pixels).
    """

    def __init__(self, base: Dataset, transforms: Sequence[str], spec: InputSpec) -> None:
        self.base, self.transforms, self.spec = base, list(transforms), spec
        for t in self.transforms:
            if t not in TRANSFORMS:
                raise ZkdError(f"unknown transform {t!r}; use one of {', '.join(TRANSFORMS)}")

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[i]
        for t in self.transforms:
            x = TRANSFORMS[t](x, self.spec)
        return x, y


def make_similarity_dataset(source: str, spec: InputSpec, num_images: int | None = None,
                            transforms: Sequence[str] = (), seed: int = 0, verify: bool = True) -> Dataset:
    """:func:`zeroshot_kd.data.make_dataset` plus optional pixel-space shifts (see :data:`TRANSFORMS`)."""
    from ..data import make_dataset

    ds = make_dataset(source, spec, num_images=num_images, seed=seed, verify=verify)
    if not transforms:
        return ds
    shifted = TransformedDataset(ds, transforms, spec)
    shifted.zkd_subset = getattr(ds, "zkd_subset", None)  # type: ignore[attr-defined]
    return shifted
