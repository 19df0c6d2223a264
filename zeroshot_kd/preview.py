"""Preview grids of synthetic images: one row per class, true colours (no per-image rescaling)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from .io import atomic_path
from .shards import ShardDataset, to_uint8
from .spec import InputSpec

__all__ = ["image_grid", "write_preview"]


def image_grid(rows: list[tuple[str, torch.Tensor]], spec: InputSpec, cell: int | None = None,
               pad: int = 2) -> Image.Image:
    """Draw labelled rows of normalized images (each row: (label, tensor (k, C, H, W))) as one RGB image.

    Small images are enlarged with nearest-neighbour resampling to at least ``cell`` pixels so a 28 px image stays
    legible; the label column uses Pillow's built-in font (no system fonts needed).
    """
    cell = cell or max(spec.image_size, 56)
    cols = max((len(t) for _, t in rows), default=1)
    font = ImageFont.load_default()
    label_w = 8 + max((int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(lbl, font=font)) for lbl, _ in rows),
                      default=0)
    grid = Image.new("RGB", (label_w + cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), label, fill="black", font=font)
        px = to_uint8(images, spec).cpu() if len(images) else images
        for c in range(len(images)):
            arr = px[c]
            im = Image.fromarray(arr[0].numpy()) if arr.shape[0] == 1 else Image.fromarray(arr.permute(1, 2, 0).numpy())
            im = im.convert("RGB").resize((cell, cell), Image.NEAREST)
            grid.paste(im, (label_w + pad + c * (cell + pad), y))
    return grid


def write_preview(out: str | Path, spec: InputSpec, manifest: dict[str, Any], per_class: int = 8,
                  class_names: list[str] | None = None) -> Path:
    """Write ``preview.png`` in a shard folder: up to ``per_class`` images for each class present, one row each."""
    ds = ShardDataset(out)
    picked: dict[int, list[torch.Tensor]] = {}
    for i in range(len(ds)):
        label = ds.items[i][3]
        if len(picked.setdefault(label, [])) < per_class:
            picked[label].append(ds[i][0])
        if len(picked) == spec.num_classes and all(len(v) >= per_class for v in picked.values()):
            break
    rows = []
    for label in sorted(picked):
        name = class_names[label] if class_names and label < len(class_names) else f"class {label}"
        rows.append((name, torch.stack(picked[label])))
    path = Path(out) / "preview.png"
    with atomic_path(path) as tmp:
        image_grid(rows, spec).save(tmp, format="PNG")
    return path
