"""Extra 8-bit QDQ so ONNX Runtime runs every W8A8 convolution and residual addition on integer kernels.

A zkd student quantizes layer *inputs* only. ONNX Runtime fuses ``DQ -> Conv [-> Relu] -> Q`` into QLinearConv
and ``DQ, DQ -> Add [-> Relu] -> Q`` into QLinearAdd, and for both it needs the output to go into exactly one
QuantizeLinear. In a residual network the output of the last conv of a block goes into a float Add, the Add's
output goes to the next block's quantizer *and* to its float residual Add, and the first conv reads the float
image: those convs stay float (on ResNet-14, 9 of 15).

:func:`add_integer_qdq` rewrites the exported graph so that every such tensor (a *point*) has one canonical
8-bit QuantizeLinear and every other reader takes its DequantizeLinear:

* points: the output of each W8A8 conv (after its Relu/Clip, when that is its only reader), the inputs and the
  output (after its Relu) of each Add of two computed tensors, and, through the export module, the image input of
  a layer with no input quantizer (the first layer; see :func:`input_grid`);
* grid of a point: the student's own 8-bit input quantizer of a layer reading that tensor, when there is one
  (the largest scale if several), so that layer's input is unchanged; else, for a tensor read only by MaxPool,
  the grid of the pooled tensor (max commutes with the quantizer, so ORT runs MaxPool on uint8); else an
  asymmetric uint8 grid over the min/max observed on ``inputs`` (zero point 0 for non-negative tensors);
* these quantizers exist only in the ONNX graph, not in the student: they round residual-branch tensors, conv
  outputs and the image to 8 bits (at most half a step each), which the export check measures against the
  PyTorch student. A point whose reader already is a sub-8-bit (Clip) quantizer gets the 8-bit code first.

Graph outputs are never quantized, so the last Linear (logits) stays a float Gemm on dequantized inputs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

__all__ = ["add_integer_qdq", "input_grid", "uint8_grid"]

_PASS_THROUGH = ("Relu", "Clip")


def uint8_grid(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of the uint8 grid ``[0, 255]`` covering ``[min(lo, 0), max(hi, 0)]``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(np.clip(np.round(-lo / scale), 0, 255))
    return float(np.float32(scale)), zp


def input_grid(inputs: torch.Tensor) -> tuple[float, int]:
    """The uint8 grid over the range of the images (for the first layer's export-only input quantizer)."""
    return uint8_grid(float(inputs.min()), float(inputs.max()))


class _Graph:
    """Producer/consumer maps of an ONNX graph with Identity-aliased initializers resolved."""

    def __init__(self, proto: Any) -> None:
        from onnx import numpy_helper

        g = proto.graph
        self.g = g
        self.inits = {t.name: t for t in g.initializer}
        self.alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}
        consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[tuple[Any, int]]] = defaultdict(list)
        for n in g.node:
            for i, name in enumerate(n.input):
                self.consumers[name].append((n, i))
        self.outputs = {o.name for o in g.output}
        self._np = numpy_helper
        self._consts = consts

    def init(self, name: str) -> Any:
        seen = 0
        while name not in self.inits and name in self.alias and seen < 100:
            name, seen = self.alias[name], seen + 1
        return self.inits.get(name)

    def is_constant(self, name: str) -> bool:
        return self.init(name) is not None or name in self._consts

    def value(self, name: str) -> np.ndarray:
        return self._np.to_array(self.init(name))

    def act_q8(self, q: Any) -> bool:
        """A QuantizeLinear to uint8 read only by DequantizeLinear (an 8-bit activation quantizer, no Clip)."""
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or self.init(q.input[2]) is None:
            return False
        from onnx import TensorProto

        readers = self.consumers[q.output[0]]
        return (self.init(q.input[2]).data_type == TensorProto.UINT8 and bool(readers)
                and all(n.op_type == "DequantizeLinear" for n, _ in readers))

    def integer_conv(self, n: Any) -> bool:
        """A Conv reading an 8-bit activation DQ and int8/uint8 weight codes, its bias inside (not split)."""
        from onnx import TensorProto

        if n.op_type != "Conv" or len(n.input) < 2:
            return False
        dq_x, dq_w = self.producer.get(n.input[0]), self.producer.get(n.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            return False
        q = self.producer.get(dq_x.input[0])
        w = self.init(dq_w.input[0])
        if q is None or not self.act_q8(q) or w is None or w.data_type not in (TensorProto.INT8, TensorProto.UINT8):
            return False
        # a split float bias (layers below 8 bits) keeps the conv float: ORT would round it to int32
        return not any(c.op_type == "Add" and any(self.is_constant(i) for i in c.input)
                       for c, _ in self.consumers[n.output[0]])

    def through(self, name: str) -> str:
        """``name``, or the output of its only reader when that is a Relu/Clip (ORT folds those into the Q)."""
        readers = self.consumers[name]
        if len(readers) == 1 and readers[0][0].op_type in _PASS_THROUGH and name not in self.outputs:
            return readers[0][0].output[0]
        return name


def _points(gr: _Graph) -> list[str]:
    points: list[str] = []

    def add(name: str) -> bool:
        if name in points or name in gr.outputs or gr.is_constant(name):
            return False
        points.append(name)
        return True

    for n in gr.g.node:
        if gr.integer_conv(n):
            add(gr.through(n.output[0]))
    changed = True
    while changed:
        changed = False
        for n in gr.g.node:
            if n.op_type != "Add" or len(n.input) != 2 or any(gr.is_constant(i) for i in n.input):
                continue
            if not any(i in points or gr.through(i) in points for i in n.input) and not any(
                    any(gr.act_q8(c) for c, _ in gr.consumers[i]) for i in n.input):
                continue
            for i in n.input:
                changed |= add(i)
            changed |= add(gr.through(n.output[0]))
    return points


def _observe(proto: Any, names: list[str], inputs: torch.Tensor, batch_size: int = 64) -> dict[str, tuple]:
    """Min and max of graph tensors over ``inputs`` (the graph as written, no ORT optimization)."""
    import onnx
    import onnxruntime as ort

    if not names:
        return {}
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for name in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for i in range(0, inputs.shape[0], batch_size):
        outs = sess.run(names, {in_name: inputs[i:i + batch_size].float().contiguous().numpy()})
        for n, v in zip(names, outs):
            lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
    return {n: (lo[n], hi[n]) for n in names}


def _topological(nodes: list) -> list:
    """``nodes`` in an order where every node follows the producers of its inputs, otherwise as given.

    (A rewired reader, e.g. a second input quantizer of the same tensor, may come before the canonical Q.)
    """
    import heapq

    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in n.input if x in producer and producer[x] != i}
        waiting[i] = len(deps)
        for d in deps:
            readers[d].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        i = heapq.heappop(ready)
        out.append(nodes[i])
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(out) != len(nodes):
        raise ValueError("cycle in the rewritten ONNX graph")
    return out


def _drop_float_casts(proto: Any) -> int:
    """Remove float32 -> float32 Casts (the tracer leaves some on residual branches; they hide the Add's input)."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    outputs = {o.name for o in proto.graph.output}
    drop = [n for n in proto.graph.node if n.op_type == "Cast" and n.output[0] not in outputs
            and types.get(n.input[0]) == TensorProto.FLOAT
            and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)]
    for n in drop:
        for m in proto.graph.node:
            for i, name in enumerate(m.input):
                if name == n.output[0]:
                    m.input[i] = n.input[0]
        proto.graph.node.remove(n)
    return len(drop)


def add_integer_qdq(proto: Any, inputs: torch.Tensor) -> dict[str, Any]:
    """Insert the extra 8-bit QDQ described in the module docstring into ``proto`` (in place).

    Args:
        proto: an ONNX ModelProto of a zkd QDQ export.
        inputs: normalized images (N, C, H, W) on which the ranges of new points are observed.

    Returns:
        ``{"points", "reused", "observed", "pooled"}``: quantized tensors added, how many reuse a student
        quantizer's grid, how many got an observed grid, how many share a MaxPool output's grid.
    """
    import onnx
    from onnx import TensorProto

    _drop_float_casts(proto)
    gr = _Graph(proto)
    points = _points(gr)
    grid: dict[str, tuple] = {}  # point -> ("q", existing Q node) | ("grid", scale, zp)
    kinds = {"reused": 0, "observed": 0, "pooled": 0}

    def existing_q(name: str) -> Any:
        qs = [c for c, _ in gr.consumers[name] if gr.act_q8(c)]
        return max(qs, key=lambda q: float(gr.value(q.input[1]))) if qs else None

    todo = []
    for p in points:
        q = existing_q(p)
        if q is not None:
            grid[p] = ("q", q)
            kinds["reused"] += 1
        else:
            todo.append(p)
    # a tensor read only by MaxPool takes the grid of the pooled tensor (ORT then pools uint8 codes)
    pooled = {}
    for p in todo:
        readers = gr.consumers[p]
        outs = {c.output[0] for c, _ in readers if c.op_type == "MaxPool"}
        if readers and len(outs) == len(readers) == 1:
            src = existing_q(next(iter(outs)))
            if src is not None:
                pooled[p] = src
    observed = _observe(proto, [p for p in todo if p not in pooled], inputs)
    for p in todo:
        if p in pooled:
            q = pooled[p]
            grid[p] = ("names", q.input[1], q.input[2])
            kinds["pooled"] += 1
        else:
            s, z = uint8_grid(*observed[p])
            grid[p] = ("grid", s, z)
            kinds["observed"] += 1

    after: dict[str, list] = defaultdict(list)  # node output name (or "" = graph start) -> nodes to insert
    new_inits = []
    for k, p in enumerate(points):
        g = grid[p]
        if g[0] == "q":
            q = g[1]
            qout, s_name, z_name, anchor = q.output[0], q.input[1], q.input[2], q.output[0]
            skip = {id(q)}
        else:
            if g[0] == "names":
                s_name, z_name = g[1], g[2]
            else:
                s_name, z_name = f"zkd_qdq.{k}.scale", f"zkd_qdq.{k}.zero_point"
                new_inits += [onnx.helper.make_tensor(s_name, TensorProto.FLOAT, [], [g[1]]),
                              onnx.helper.make_tensor(z_name, TensorProto.UINT8, [], [g[2]])]
            qout = f"zkd_qdq.{k}.q"
            qnode = onnx.helper.make_node("QuantizeLinear", [p, s_name, z_name], [qout], name=f"zkd_qdq.{k}.Q")
            anchor = p if p in gr.producer else ""
            after[anchor].append(qnode)
            anchor = qout
            skip = set()
        for j, (reader, idx) in enumerate(list(gr.consumers[p])):
            if id(reader) in skip:
                continue
            dq_out = f"zkd_qdq.{k}.dq{j}"
            after[anchor].append(onnx.helper.make_node("DequantizeLinear", [qout, s_name, z_name], [dq_out],
                                                       name=f"zkd_qdq.{k}.DQ{j}"))
            reader.input[idx] = dq_out
    order: list = []
    pending = dict(after)

    def emit(node: Any) -> None:
        order.append(node)
        for o in node.output:
            for extra in pending.pop(o, []):
                emit(extra)

    for n in pending.pop("", []) + list(gr.g.node):  # a graph-input point's Q first
        emit(n)
    del gr.g.node[:]
    gr.g.node.extend(_topological(order))
    gr.g.initializer.extend(new_inits)
    return {"points": len(points), **kinds}
