"""``export_onnx``: serialize, check in ONNX Runtime against PyTorch, and only then write the file.

The check runs the exported graph in ONNX Runtime (full optimization, CPU) on a batch of images, compares its
arg-max with the PyTorch model's and records the largest logit difference; below ``min_agreement`` the export
fails and nothing is written (the file is written atomically after the check passes).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ZkdError
from ..io import atomic_write_bytes
from ..spec import InputSpec
from .onnx import onnx_bytes
from .runtime import INTEGER_OPS, compare_outputs, optimized_op_counts, ort_session

__all__ = ["DEFAULT_MIN_AGREEMENT", "ExportResult", "check_images", "export_onnx"]

DEFAULT_MIN_AGREEMENT = 99.5


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and measured.

    Attributes:
        path: the ONNX file (None when only checked).
        bytes: its size.
        summary: opset, quantized layers, weight storage types (see :func:`zeroshot_kd.export.onnx.onnx_bytes`).
        check: ``{"images", "agreement", "max_logit_diff"}`` of ONNX Runtime vs PyTorch, or None if unchecked.
        optimized_ops: operator counts of ONNX Runtime's optimized graph.
    """

    path: str | None
    bytes: int
    summary: dict[str, Any]
    check: dict[str, Any] | None
    optimized_ops: dict[str, int] = field(default_factory=dict)

    @property
    def integer_kernels(self) -> dict[str, int]:
        """The integer kernels (QLinearConv, ConvInteger, QGemm, ...) in ONNX Runtime's optimized graph."""
        return {k: v for k, v in self.optimized_ops.items() if k in INTEGER_OPS}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "integer_kernels": self.integer_kernels}


def check_images(source: str, spec: InputSpec, num_images: int) -> torch.Tensor:
    """The first ``num_images`` images of a data source, normalized for ``spec``, as one batch tensor."""
    from ..data import make_dataset

    ds = make_dataset(source, spec, num_images=num_images)
    n = min(num_images, len(ds))
    if n == 0:
        raise ZkdError(f"check data {source} has no images; pass another --check-data")
    return torch.stack([ds[i][0] for i in range(n)])


def export_onnx(model: nn.Module, out: str | os.PathLike | None, spec: InputSpec | None = None,
                check_inputs: torch.Tensor | None = None, min_agreement: float = DEFAULT_MIN_AGREEMENT,
                info: dict[str, Any] | None = None, opset: int | None = None,
                threads: int | None = None, integer_qdq: bool = True,
                range_inputs: torch.Tensor | None = None) -> ExportResult:
    """Export a zkd student as a QDQ ONNX graph (or a float model as a plain one), checked in ONNX Runtime.

    Args:
        model: a student from :func:`zeroshot_kd.load_student` (QDQ graph), or a float classifier (FP32 graph).
        out: where to write the ``.onnx`` file; None to export and check only.
        spec: input spec [default: ``model.zkd_spec``].
        check_inputs: normalized images (N, C, H, W) to compare ONNX Runtime with PyTorch on; None skips the
            check (not recommended).
        min_agreement: least top-1 agreement (percent) for the file to be written.
        info: extra metadata stored as ``zkd_<key>`` in the file.
        opset: ONNX opset (see :func:`zeroshot_kd.export.onnx.onnx_bytes`).
        threads: ONNX Runtime intra-op threads for the check.
        integer_qdq: add the export-only 8-bit QDQ (conv outputs, residual Adds, first-layer input; see
            :mod:`zeroshot_kd.export.integer`) that lets ONNX Runtime run W8A8 convs and Adds as integer kernels;
            needs ``range_inputs`` or ``check_inputs``. False: exactly the student's quantizers.
        range_inputs: images whose ranges set the extra quantizers [default: ``check_inputs``].

    Returns:
        An :class:`ExportResult`.

    Raises:
        ZkdError: missing onnx/onnxruntime, a module the export cannot represent, ORT rejecting the graph, or an
            agreement below ``min_agreement`` (then ``out`` is not written).
    """
    ranges = None
    if integer_qdq:
        ranges = range_inputs if range_inputs is not None else check_inputs
    data, summary = onnx_bytes(model, spec, info, opset, range_inputs=ranges)
    try:
        session = ort_session(data, threads)
    except Exception as e:
        raise ZkdError(f"ONNX Runtime rejects the exported graph ({type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); try another --opset "
                       "or upgrade onnxruntime") from None
    check = None
    if check_inputs is not None:
        check = compare_outputs(model, session, check_inputs.cpu())
        if check["agreement"] < min_agreement:
            raise ZkdError(f"ONNX Runtime agrees with PyTorch on {check['agreement']:.2f}% of {check['images']} "
                           f"images (max logit difference {check['max_logit_diff']:.3g}), below --min-agreement "
                           f"{min_agreement:g}%; nothing written"
                       + ("; try --student-qdq (no extra 8-bit QDQ)" if summary.get("extra_qdq") else ""))
    ops = optimized_op_counts(data, threads or 1)
    if out is not None:
        atomic_write_bytes(out, data)
    return ExportResult(None if out is None else str(out), len(data), summary, check, ops)
