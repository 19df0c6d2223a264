"""The input specification of a classifier: what tensors it expects and what the valid pixel range is."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["InputSpec"]


@dataclass(frozen=True)
class InputSpec:
    """Channels, square resolution and per-channel normalization of a classifier's input.

    Images live in [0, 1] pixel space; the network sees ``(x - mean) / std``. Synthesis works in that
    normalized space, so the valid range of channel ``c`` is ``[-mean_c / std_c, (1 - mean_c) / std_c]``.

    ``resize_size`` is the shorter side real images are resized to before the centre ``image_size`` crop (what
    torchvision weights' transforms do: resize 256 or 232, crop 224); None means ``image_size`` (no margin).
    """

    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    resize_size: int | None = None

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean/std need one value per channel ({self.channels}), got {len(self.mean)}/{len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        if self.resize_size is not None and (isinstance(self.resize_size, bool) or int(self.resize_size) < 1
                                             or int(self.resize_size) != self.resize_size):
            raise ValueError(f"resize_size must be a positive integer or None, got {self.resize_size!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def resize(self) -> int:
        """The shorter side real images are resized to before the centre crop (``resize_size`` or ``image_size``)."""
        return self.image_size if self.resize_size is None else int(self.resize_size)

    def _view(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] pixels (N, C, H, W) to the network's input space."""
        return (pixels - self._view(self.mean, pixels)) / self._view(self.std, pixels)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map network inputs back to pixel space (not clamped)."""
        return x * self._view(self.std, x) + self._view(self.mean, x)

    def bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper valid values per channel in normalized space, shaped (1, C, 1, 1)."""
        mean, std = self._view(self.mean, like), self._view(self.std, like)
        return -mean / std, (1 - mean) / std

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        """Clip normalized inputs to the valid pixel range (DeepInversion's ``clip``)."""
        lo, hi = self.bounds(x)
        return torch.maximum(torch.minimum(x, hi), lo)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.resize_size is None:  # files without a resize size stay as they were
            del d["resize_size"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        return cls(int(d["channels"]), int(d["image_size"]), tuple(map(float, d["mean"])),
                   tuple(map(float, d["std"])), int(d["num_classes"]),
                   None if d.get("resize_size") is None else int(d["resize_size"]))
