"""Running exported graphs in ONNX Runtime: sessions, an nn.Module wrapper for the evaluator, and the checks.

:class:`OrtModel` makes an ONNX Runtime session look like a classifier module (``model(x) -> logits``), so
``zkd evaluate --model model.onnx`` reuses :func:`zeroshot_kd.evaluate.evaluate_model` unchanged. Sessions use
ONNX Runtime's CPU provider with its full graph optimization (``ORT_ENABLE_ALL``): that is where QDQ groups are
fused into integer kernels (QLinearConv, QGemm, ...), so the checks and the evaluation run the deployed graph.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ZkdError
from ..spec import InputSpec
from .onnx import METADATA_FORMAT, require_onnx

__all__ = ["INTEGER_OPS", "OrtModel", "compare_outputs", "is_onnx_file", "load_onnx_model", "optimized_op_counts",
           "ort_session"]

INTEGER_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QLinearAdd", "QLinearGlobalAveragePool")


def is_onnx_file(path: str | os.PathLike) -> bool:
    """True for a path ending in ``.onnx`` (how ``zkd evaluate --model`` tells ONNX files apart)."""
    return str(path).lower().endswith(".onnx")


def ort_session(model: bytes | str | os.PathLike, threads: int | None = None,
                optimized_path: str | None = None) -> Any:
    """An ONNX Runtime CPU session with full graph optimization.

    Args:
        model: serialized model bytes or a file path.
        threads: intra-op threads [default: ONNX Runtime's choice].
        optimized_path: also write the optimized graph there (to see which kernels ORT chose).
    """
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


class OrtModel(nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` call interface: float32 inputs in, logits out.

    Inputs are moved to the CPU for ORT; the logits come back on the input's device.
    """

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run([self.output_name], {self.input_name: arr})[0]
        return torch.from_numpy(out).to(x.device)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def load_onnx_model(path: str | os.PathLike, threads: int | None = None) -> tuple[OrtModel, InputSpec, dict]:
    """Open a file written by ``zkd export`` as an evaluable model.

    Returns:
        (OrtModel, its InputSpec from the file's metadata, a description dict with ``kind`` "onnx").

    Raises:
        ZkdError: missing file or packages, not an ONNX file (corrupted), an ONNX file not written by
            ``zkd export`` (no input spec), or a graph ONNX Runtime cannot run.
    """
    onnx, _ = require_onnx()
    if not Path(path).is_file():
        raise ZkdError(f"ONNX file {path} does not exist; write one with 'zkd export'")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ZkdError(f"cannot read {path} as ONNX ({type(e).__name__}: {_one_line(e)}); the file is corrupted "
                       "or not an ONNX model -- re-run 'zkd export'") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("zkd_format") != METADATA_FORMAT or "zkd_input_spec" not in meta:
        raise ZkdError(f"{path} is an ONNX model not written by 'zkd export' (no zkd input spec in its metadata); "
                       "export the model with 'zkd export' to evaluate it")
    try:
        spec = InputSpec.from_dict(json.loads(meta["zkd_input_spec"]))
    except Exception as e:
        raise ZkdError(f"{path}: damaged zkd_input_spec metadata ({_one_line(e)}); re-run 'zkd export'") from None
    try:
        session = ort_session(proto.SerializeToString(), threads)
    except Exception as e:
        raise ZkdError(f"ONNX Runtime cannot run {path} ({type(e).__name__}: {_one_line(e)}); the file is "
                       "damaged or needs a newer onnxruntime -- pip install -U zeroshot_kd[export]") from None
    info = {"kind": "onnx", "spec": str(path), "graph": meta.get("zkd_kind"),
            "convention": meta.get("zkd_convention")}
    return OrtModel(session), spec, info


def optimized_op_counts(model: bytes, threads: int | None = 1) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime actually runs (after its optimizations)."""
    onnx, _ = require_onnx()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "optimized.onnx")
        ort_session(model, threads, optimized_path=out)
        proto = onnx.load(out)
    return dict(Counter(n.op_type for n in proto.graph.node))


@torch.no_grad()
def compare_outputs(reference: nn.Module, session: Any, inputs: torch.Tensor,
                    batch_size: int = 64) -> dict[str, Any]:
    """Top-1 agreement (percent) and the largest absolute logit difference, ONNX Runtime vs PyTorch."""
    ort_model = OrtModel(session)
    reference = reference.eval()
    agree, max_diff, n = 0, 0.0, 0
    for i in range(0, inputs.shape[0], batch_size):
        x = inputs[i:i + batch_size].float()
        ref = reference(x).float()
        got = ort_model(x).float()
        if got.shape != ref.shape:
            raise ZkdError(f"the ONNX graph gives outputs {tuple(got.shape)}, PyTorch {tuple(ref.shape)}; "
                           "please report this")
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
        max_diff = max(max_diff, float((ref - got).abs().max()))
        n += x.shape[0]
    return {"images": n, "agreement": 100.0 * agree / n if n else None, "max_logit_diff": max_diff}
