"""Model size of a student file against its float teacher: bytes, compression ratio, bits per weight.

* ``fp32_bytes``: the float teacher's state_dict with every floating tensor at 4 bytes (BatchNorm unfolded), as
  recorded in the student file when it was written; for files without the record (format version 1) it is
  estimated from the student: every stored tensor at 4 bytes plus 4 vectors per folded BatchNorm.
* ``student_bytes``: the student file's size on disk (what is shipped; includes metadata and the archive).
* ``bits_per_weight``: ``8 * (weight-code bytes + weight scale bytes + weight zero-point bytes) / weights``
  over the quantized layers' weights, i.e. the real storage cost of a quantized weight, scales included.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ZkdError
from .student import read_student_file

__all__ = ["ModelSize", "format_model_size", "model_size"]


@dataclass
class ModelSize:
    """Sizes of one student (see the module docstring)."""

    fp32_bytes: int
    fp32_estimated: bool
    student_bytes: int
    weights: int
    weight_bytes: int

    @property
    def ratio(self) -> float:
        """How many times smaller the student file is than the FP32 model."""
        return self.fp32_bytes / self.student_bytes if self.student_bytes else float("inf")

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_bytes / self.weights if self.weights else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "bits_per_weight": self.bits_per_weight}


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def model_size(path: str | os.PathLike, fp32_bytes: int | None = None) -> ModelSize:
    """Sizes of the student file at ``path``.

    Args:
        path: a file written by ``zkd calibrate --out`` (any format version).
        fp32_bytes: the float model's size, overriding the file's record / the estimate.

    Raises:
        ZkdError: ``path`` is not a student file.
    """
    obj = read_student_file(path, decode=False)
    if obj is None:
        raise ZkdError(f"{path} is not a zkd student file; pass the --out of 'zkd calibrate'")
    weights = code_bytes = 0
    for name, entry in obj["codes"].items():
        if isinstance(entry, torch.Tensor):
            weights += entry.numel()
            code_bytes += _nbytes(entry)
        else:
            n = 1
            for d in entry["shape"]:
                n *= int(d)
            weights += n
            code_bytes += _nbytes(entry["packed"])
    qparam_bytes = sum(_nbytes(v) for k, v in obj["state"].items() if ".wq." in k)
    recorded = (obj.get("size") or {}).get("fp32_bytes")
    estimated = False
    if fp32_bytes is None:
        fp32_bytes = recorded
    if fp32_bytes is None:
        estimated = True
        floats = weights + sum(v.numel() for k, v in obj["state"].items()
                               if ".wq." not in k and ".aq." not in k and isinstance(v, torch.Tensor))
        bn = 0
        for conv_name, _ in obj["folded"]:
            bias = obj["state"].get(f"{conv_name}.bias")
            bn += 4 * (bias.numel() if isinstance(bias, torch.Tensor) else 0)
        fp32_bytes = 4 * (floats + bn)
    return ModelSize(int(fp32_bytes), estimated, Path(path).stat().st_size, int(weights),
                     int(code_bytes + qparam_bytes))


def format_model_size(size: ModelSize) -> str:
    """One line: ``FP32 44.7 MB -> student 4.6 MB (9.7x smaller), 3.06 bits/weight incl. scales``."""
    est = " (estimated)" if size.fp32_estimated else ""
    return (f"FP32 {size.fp32_bytes / 1e6:.2f} MB{est} -> student {size.student_bytes / 1e6:.2f} MB "
            f"({size.ratio:.1f}x smaller), {size.bits_per_weight:.2f} bits/weight incl. scales")
