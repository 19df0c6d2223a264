"""ONNX export of zkd students as QDQ graphs (and of float teachers as the FP32 baseline).

Every quantized Conv2d/Linear of the student becomes::

    input -> QuantizeLinear(s_a, z_a) [-> Clip(0, 2^a - 1)] -> DequantizeLinear(s_a, z_a) --\\
    codes -> DequantizeLinear(s_w, z_w, axis=0) -------------------------------------------> Conv / Gemm (+ bias)

which computes what the fake-quant layer computes (zeroshot_kd.quant.modules):

* weights: the stored integer codes ``q`` with per-output-channel scales and zero points (``axis=0``), so the
  dequantized weight is ``(q - z) * s``, the student's fake-quantized weight bit for bit. 8-bit weights are
  int8 (symmetric narrow grid ``[-127, 127]``, zero point 0) or uint8 (asymmetric ``[0, 255]`` + zero point).
  Weights of 2..4 bits are stored as ONNX int4 / uint4 (opset 21; ONNX Runtime >= 1.18 runs int4
  DequantizeLinear), which holds their grids exactly; weights of 5..7 bits are int8 / uint8 tensors holding codes
  of the sub-byte grid (ONNX has no 5..7-bit types).
* activations (layer inputs), per tensor: the grid is always unsigned ``[0, 2^a - 1]`` with zero point 0
  (non-negative inputs) or an integer zero point (signed inputs), so QuantizeLinear outputs uint8. At a < 8 bits a
  uint8 ``Clip(0, 2^a - 1)`` between Q and DQ narrows the grid (QuantizeLinear saturates only at 0..255).
  QuantizeLinear computes ``round(x / s)`` where the fake quantizer computes ``round(x * (1 / s))``; the two can
  differ by one code when ``x / s`` lies within an ulp of a rounding boundary (rare, and at most one step).
* biases stay float32. ONNX Runtime runs W8A8 Conv/Gemm groups as integer kernels (QLinearConv, QGemm), for
  which its optimizer (WeightBiasQuantization) stores the bias as int32 at scale ``s_a * s_w`` (a rounding of at
  most ``s_a * s_w / 2``, negligible at 8 bits). It has no integer kernels for layers of fewer bits, yet would
  still round their bias, coarsely at those scales; so a layer with weights or activations below 8 bits (or an
  unquantized input) computes ``Conv(x, w) + b`` with a separate float Add, which ORT leaves exact.
* layers whose input is not quantized (the first layer under the default ``keep_8bit`` convention) get only the
  weight DequantizeLinear; BatchNorm stays folded (or stays a BatchNormalization node if the student kept it);
  residual additions, pooling and logits stay float, as in the student.
* with ``range_inputs`` (what ``zkd export`` does by default), a student whose activations are all 8-bit and
  whose weights are int8 codes (5..8 bits) gets extra, export-only 8-bit QDQ at conv outputs, residual Adds and
  the first layer's input (:mod:`zeroshot_kd.export.integer`), so that ONNX Runtime runs every conv as
  QLinearConv and every residual Add as QLinearAdd instead of leaving them float.

The graph is traced with PyTorch's TorchScript-based exporter (``dynamo=False``: it needs no onnxscript and works
offline); the QDQ nodes come from the ``symbolic`` methods of two autograd functions whose forward is the
fake-quant arithmetic, so tracing and PyTorch evaluation of the export module agree with the student.
The model's input spec and quantization convention are stored in the ONNX ``metadata_props`` (``zkd_*`` keys),
which :func:`zeroshot_kd.export.runtime.load_onnx_model` reads back.
"""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZkdError
from ..quant.modules import QUANT_TYPES, QuantConv2d, quant_layers
from ..spec import InputSpec

__all__ = ["FP32_OPSET", "INT4_OPSET", "QDQ_OPSET", "onnx_bytes", "require_onnx"]

FP32_OPSET = 17
QDQ_OPSET = 17  # int8/uint8 QDQ (per-axis DequantizeLinear needs >= 13)
INT4_OPSET = 21  # int4/uint4 QuantizeLinear/DequantizeLinear
METADATA_FORMAT = "zkd-onnx"


def require_onnx() -> tuple[Any, Any]:
    """Import onnx and onnxruntime, or fail with one line saying what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ZkdError(f"ONNX export needs the onnx and onnxruntime packages ({e.name} is missing); "
                       "pip install zeroshot_kd[export]") from None
    return onnx, onnxruntime


class _QDQAct(torch.autograd.Function):
    """Per-tensor activation fake quantization; exports as QuantizeLinear [-> Clip] -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,  # type: ignore[override]
                qmax: int) -> torch.Tensor:
        xf, z = x.float(), zero_point.float()
        q = torch.clamp(torch.round(xf * (1.0 / scale)) + z, 0, qmax)
        return ((q - z) * scale).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmax: int):  # noqa: ANN001, ANN205
        q = g.op("QuantizeLinear", x, scale, zero_point)
        if qmax < 255:
            lo = g.op("Constant", value_t=torch.tensor(0, dtype=torch.uint8))
            hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=torch.uint8))
            q = g.op("Clip", q, lo, hi)
        return g.op("DequantizeLinear", q, scale, zero_point)


class _DQWeight(torch.autograd.Function):
    """``(q - z) * s`` per output channel; exports as DequantizeLinear(codes, s, z, axis=0)."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor,  # type: ignore[override]
                zero_point: torch.Tensor) -> torch.Tensor:
        shape = [-1] + [1] * (codes.dim() - 1)
        return (codes.float() - zero_point.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point):  # noqa: ANN001, ANN205
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)


class _ExportLayer(nn.Module):
    """A quantized Conv2d/Linear with its weight as integer codes, computing as the fake-quant layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        wq, aq = layer.wq, layer.aq
        self.is_conv = isinstance(layer, QuantConv2d)
        if self.is_conv:
            self.stride, self.padding, self.dilation, self.groups = (layer.stride, layer.padding, layer.dilation,
                                                                     layer.groups)
            self.padding_mode = layer.padding_mode
            self.pad = layer._reversed_padding_repeated_twice
        signed = wq.qmin < 0
        dtype = torch.int8 if signed else torch.uint8
        self.w_bits = wq.bits
        self.w_signed = signed
        self.w_quantized = bool(wq.enabled)
        with torch.no_grad():
            if self.w_quantized:
                self.register_buffer("codes", wq.quantize(layer.weight).to(torch.int16).to(dtype))
                self.register_buffer("w_scale", wq.scale.detach().float().clone())
                self.register_buffer("w_zero_point", wq.zero_point.detach().to(torch.int16).to(dtype))
            else:
                self.register_buffer("weight", layer.weight.detach().float().clone())
            self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(),
                                                                     requires_grad=False)
            self.a_quantized = aq is not None and bool(aq.enabled)
            if self.a_quantized:
                if aq.qmin != 0 or aq.qmax > 255:
                    raise ZkdError(f"activation grid [{aq.qmin}, {aq.qmax}] has no uint8 QDQ form; zkd students "
                                   "use [0, 2^b-1]")
                self.a_qmax = int(aq.qmax)
                self.register_buffer("a_scale", aq.scale.detach().float().reshape(()).clone())
                self.register_buffer("a_zero_point", aq.zero_point.detach().reshape(()).to(torch.uint8))
            self.input_qdq_extra = False
            self._set_split_bias()

    def _set_split_bias(self) -> None:
        # integer kernels only for W8A8 layers; elsewhere the bias is a separate float Add (module docstring)
        self.split_bias = self.bias is not None and not (
            self.w_quantized and self.w_bits == 8 and self.a_quantized and self.a_qmax == 255)

    def set_input_grid(self, scale: float, zero_point: int) -> None:
        """Give a layer without an input quantizer an export-only uint8 one (see ``zeroshot_kd.export.integer``)."""
        self.a_quantized, self.a_qmax, self.input_qdq_extra = True, 255, True
        self.register_buffer("a_scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("a_zero_point", torch.tensor(zero_point, dtype=torch.uint8))
        self._set_split_bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_quantized:
            x = _QDQAct.apply(x, self.a_scale, self.a_zero_point, self.a_qmax)
        w = _DQWeight.apply(self.codes, self.w_scale, self.w_zero_point) if self.w_quantized else self.weight
        bias = None if self.split_bias else self.bias
        if not self.is_conv:
            y = F.linear(x, w, bias)
        elif self.padding_mode != "zeros":
            y = F.conv2d(F.pad(x, self.pad, mode=self.padding_mode), w, bias, self.stride, 0, self.dilation,
                         self.groups)
        else:
            y = F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.split_bias:
            y = y + (self.bias.view(1, -1, 1, 1) if self.is_conv else self.bias)
        return y


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def check_exportable(model: nn.Module, quantized: bool) -> None:
    """Raise ZkdError naming the first module the QDQ export cannot represent.

    A student may hold quantized Conv2d/Linear layers, BatchNorm (kept unfolded, eval mode) and parameter-free
    modules (activations, pooling, dropout, containers). A float Conv2d/Linear left in a student, or any other
    module with parameters, has no QDQ form; neither has a layer still in reconstruction (AdaRound, QDrop).
    """
    if not quantized:
        return
    for name, m in model.named_modules():
        where = f"module {name or '<root>'!r} ({type(m).__name__})"
        if isinstance(m, QUANT_TYPES):
            for q in (m.wq, m.aq):
                if q is not None and (q.adaround is not None or q.drop_prob > 0):
                    raise ZkdError(f"{where} is still in reconstruction (AdaRound/QDrop); finish it before export")
            continue
        if any(isinstance(p, QUANT_TYPES) for p in _parents(model, name)):
            continue  # the layer's own quantizers
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            raise ZkdError(f"{where} is not quantized; a zkd student quantizes every Conv2d/Linear -- export the "
                           "output of 'zkd calibrate', or the float model with --format onnx-fp32")
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            raise ZkdError(f"{where} is not supported by the QDQ export; zkd exports quantized Conv2d/Linear, "
                           "BatchNorm and parameter-free modules -- replace or remove that module")


def _parents(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".") if name else []
    return [model.get_submodule(".".join(parts[:i])) if i else model for i in range(len(parts))]


def export_module(student: nn.Module) -> tuple[nn.Module, dict[str, _ExportLayer]]:
    """A copy of ``student`` whose quantized layers are :class:`_ExportLayer` (codes + QDQ functions)."""
    model = copy.deepcopy(student).cpu().eval()
    layers = {}
    for name, layer in quant_layers(model):
        new = _ExportLayer(layer)
        _set_module(model, name, new)
        layers[name] = new
    return model.requires_grad_(False), layers


def _to_int4(onnx: Any, model: Any, layers: dict[str, _ExportLayer]) -> list[str]:
    """Retype the codes and zero points of 2..4-bit weights to INT4/UINT4 (new initializers, opset 21)."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    # the exporter shares equal-valued initializers through Identity nodes: follow them to the initializer
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}

    def source(name: str) -> str:
        seen = 0
        while name in alias and name not in inits and seen < 100:
            name, seen = alias[name], seen + 1
        return name

    targets = {f"{name}.codes": layer for name, layer in layers.items() if layer.w_quantized and layer.w_bits <= 4}
    done = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or source(node.input[0]) not in targets:
            continue
        codes_name = source(node.input[0])
        layer = targets[codes_name]
        ttype = TensorProto.INT4 if layer.w_signed else TensorProto.UINT4
        new_inputs = []
        for i in (0, 2):
            src = inits.get(source(node.input[i]))
            if src is None:
                break
            arr = numpy_helper.to_array(src)
            t = onnx.helper.make_tensor(f"{codes_name}.int4.{i}", ttype, list(arr.shape),
                                        arr.astype("int64").reshape(-1).tolist())
            new_inputs.append((i, t))
        if len(new_inputs) != 2:
            continue
        for i, t in new_inputs:
            model.graph.initializer.append(t)
            node.input[i] = t.name
        done.append(codes_name)
    used = {i for n in model.graph.node for i in n.input}
    dead = [n for n in model.graph.node if n.op_type == "Identity" and n.output[0] not in used]
    for n in dead:
        model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return done


def _op_counts(proto: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in proto.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


@torch.no_grad()
def _quantize_model_inputs(net: nn.Module, layers: dict[str, _ExportLayer], inputs: torch.Tensor) -> None:
    """Export-only 8-bit input quantizers for 8-bit-weight layers that read the (float) model input."""
    from .integer import input_grid

    x = inputs[:1].detach().cpu().float()
    readers: list[_ExportLayer] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        if args and args[0] is x:
            readers.append(mod)  # type: ignore[arg-type]

    handles = [lay.register_forward_pre_hook(hook) for lay in layers.values()
               if not lay.a_quantized and lay.w_quantized and lay.w_bits == 8]
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    scale, zp = input_grid(inputs)
    for lay in readers:
        lay.set_input_grid(scale, zp)


def onnx_bytes(model: nn.Module, spec: InputSpec | None = None, info: dict[str, Any] | None = None,
               opset: int | None = None, range_inputs: torch.Tensor | None = None) -> tuple[bytes, dict[str, Any]]:
    """Serialize ``model`` (a zkd student, or any float classifier) as an ONNX graph.

    Args:
        model: a student (``zeroshot_kd.load_student``) -> QDQ graph; a model without quantized layers -> the
            plain float graph.
        spec: its input spec [default: ``model.zkd_spec``]; required for float models without one.
        info: extra ``zkd_*`` metadata (e.g. the teacher's provenance).
        opset: ONNX opset [default: 17, or 21 when 2..4-bit weights are stored as int4].
        range_inputs: normalized images; when given (and the model is a student), the graph gets the extra 8-bit
            QDQ of :mod:`zeroshot_kd.export.integer` (ranges observed on these images) so ONNX Runtime runs W8A8
            convs and residual Adds as integer kernels; None exports exactly the student's quantizers. Ignored
            (no extra QDQ) for students with activations below 8 bits or int4 weights, which ORT runs in float.

    Returns:
        (the model bytes, a summary: opset, quantized layer count, weight storage types per bit width).

    Raises:
        ZkdError: missing packages, a module the export cannot represent (named), or an exporter failure.
    """
    onnx, _ = require_onnx()
    spec = spec or getattr(model, "zkd_spec", None)
    if spec is None:
        raise ZkdError("the model has no input spec; pass spec=InputSpec(...) (zkd students and teachers carry one)")
    quantized = bool(quant_layers(model))
    check_exportable(model, quantized)
    layers: dict[str, _ExportLayer] = {}
    if quantized:
        net, layers = export_module(model)
        # ORT has integer kernels only for 8-bit activations and int8 weight codes: elsewhere the extra QDQ
        # would cost accuracy for no speed
        if range_inputs is not None and not all((not lay.a_quantized or lay.a_qmax == 255)
                                                and (not lay.w_quantized or lay.w_bits >= 5)
                                                for lay in layers.values()):
            range_inputs = None
        if range_inputs is not None:
            _quantize_model_inputs(net, layers, range_inputs)
    else:
        net = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    int4 = any(lay.w_quantized and lay.w_bits <= 4 for lay in layers.values())
    opset = opset or (INT4_OPSET if int4 else (QDQ_OPSET if quantized else FP32_OPSET))
    if int4 and opset < INT4_OPSET:
        int4 = False
    x = torch.zeros(1, spec.channels, spec.image_size, spec.image_size)
    buf = io.BytesIO()
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), buf, opset_version=opset, dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=True)
    except Exception as e:  # the exporter's errors name the unsupported operator
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZkdError(f"torch.onnx.export failed ({type(e).__name__}: {first[:300]}); the model uses an "
                       "operator ONNX export does not support -- replace that module") from None
    proto = onnx.load_from_string(buf.getvalue())
    extra = None
    if quantized and range_inputs is not None:
        from .integer import add_integer_qdq

        before = _op_counts(proto)
        extra = add_integer_qdq(proto, range_inputs.detach().cpu())
        extra["first_layer_inputs"] = sum(lay.input_qdq_extra for lay in layers.values())
        extra["ops_before"], extra["ops_after"] = before, _op_counts(proto)
    converted = _to_int4(onnx, proto, layers) if int4 else []
    types: dict[str, str] = {}
    for name, lay in layers.items():
        if not lay.w_quantized:
            t = "float32"
        elif f"{name}.codes" in converted:
            t = "int4" if lay.w_signed else "uint4"
        else:
            t = "int8" if lay.w_signed else "uint8"
        types.setdefault(f"W{lay.w_bits}", t)
    summary = {"opset": opset, "quantized_layers": len(layers), "weight_types": types,
               "act_quantized_layers": sum(lay.a_quantized and not lay.input_qdq_extra for lay in layers.values())}
    if extra is not None:
        summary["extra_qdq"] = {k: v for k, v in extra.items() if not k.startswith("ops_")}
    meta = {"zkd_format": METADATA_FORMAT, "zkd_input_spec": json.dumps(spec.to_dict()),
            "zkd_kind": "student-qdq" if quantized else "fp32", "zkd_summary": json.dumps(summary)}
    zinfo = getattr(model, "zkd_info", None) or {}
    if zinfo.get("config"):
        meta["zkd_convention"] = str(zinfo["config"].get("convention", ""))
    for k, v in (info or {}).items():
        meta[f"zkd_{k}"] = v if isinstance(v, str) else json.dumps(v, default=str)
    onnx.helper.set_model_props(proto, meta)
    proto.producer_name = "zkd"
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ZkdError(f"the exported graph fails the ONNX checker ({str(e).splitlines()[0][:200]}); "
                       "please report this") from None
    return proto.SerializeToString(), summary
