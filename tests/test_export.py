"""ONNX export: the QDQ graph holds the student's exact weight codes and scales and computes its outputs in ONNX
Runtime; unsupported modules, corrupted/foreign .onnx files and failed checks get one-line errors and no file."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from cli.main import cli  # noqa: E402
from zeroshot_kd.data import FASHION_MNIST_SPEC  # noqa: E402
from zeroshot_kd.errors import ZkdError  # noqa: E402
from zeroshot_kd.export import export_onnx, load_onnx_model  # noqa: E402
from zeroshot_kd.export.onnx import onnx_bytes, require_onnx  # noqa: E402
from zeroshot_kd.export.runtime import ort_session  # noqa: E402
from zeroshot_kd.quant.modules import QuantConfig, QuantLinear, quant_layers  # noqa: E402
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student  # noqa: E402
from zeroshot_kd.quant.student import save_student  # noqa: E402

ARCH = {"builder": "zeroshot_kd.models:cifar_resnet", "kwargs": {"depth": 8, "width": 4}}


def student_of(teacher, config):
    opts = CalibrationOptions(data="gaussian:48", num_images=32, holdout=16, batch_size=16, candidates=20,
                              progress=False)
    res = calibrate_student(teacher, config, opts, torch.device("cpu"))
    res.student.zkd_spec = FASHION_MNIST_SPEC
    return res


def images(n=32, seed=7):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def run_ort(data: bytes, x: torch.Tensor, optimize: bool = True) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def dequantized_weights(proto) -> list[tuple[np.ndarray, int]]:
    """Every weight DequantizeLinear (axis 0, initializer input), computed by hand: (q - z) * s."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity"}

    def value(name):
        while name not in inits and name in alias:
            name = alias[name]
        return inits.get(name)

    out = []
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and value(n.input[0]) is not None and value(n.input[0]).dims:
            q, s, z = (value(i) for i in n.input)
            qa = numpy_helper.to_array(q).astype(np.float32)
            shape = [-1] + [1] * (qa.ndim - 1)
            w = (qa - numpy_helper.to_array(z).astype(np.float32).reshape(shape)) * \
                numpy_helper.to_array(s).reshape(shape)
            out.append((w, q.data_type))
    return out


@pytest.mark.parametrize("w_bits,a_bits,w_asym,keep", [(8, 8, False, ("first", "last")), (4, 4, False, ()),
                                                        (3, 3, True, ("first", "last")), (6, 5, False, ())])
def test_qdq_graph_computes_the_fake_quant_student(small_teacher, one_thread, w_bits, a_bits, w_asym, keep):
    res = student_of(small_teacher, QuantConfig(w_bits, a_bits, w_asym, keep))
    student = res.student
    data, summary = onnx_bytes(student)
    proto = onnx.load_from_string(data)
    layers = quant_layers(student)
    # one weight DQ per quantized layer, holding exactly the student's fake-quantized weight
    dq = dequantized_weights(proto)
    assert len(dq) == len(layers)
    by_shape = {}
    for w, dtype in dq:
        by_shape.setdefault(w.shape, []).append((w, dtype))
    for name, layer in layers:
        want = layer.quantized_weight().detach().numpy()
        cands = by_shape[want.shape]
        assert any(np.array_equal(w, want) for w, _ in cands), name
    sub4 = onnx.TensorProto.INT4 if not w_asym else onnx.TensorProto.UINT4
    low = [t for w, t in dq if t == sub4]
    assert len(low) == (sum(lay.wq.bits <= 4 for _, lay in layers))
    n_act = sum(lay.aq is not None for _, lay in layers)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == n_act == summary["act_quantized_layers"]
    assert ops.count("Clip") == sum(lay.aq is not None and lay.aq.bits < 8 for _, lay in layers)
    # outputs: the plain QDQ graph and ORT's optimized (integer-kernel) graph, within one output step
    x = images()
    with torch.no_grad():
        ref = student(x).numpy()
    # one quantization step at the output: every input code of the last layer moved by one step,
    # s_a * sum_j |W_ij| per logit i
    _, last = layers[-1]
    step = float(last.aq.scale) * np.abs(last.quantized_weight().detach().numpy()).sum(1) + 1e-5
    # ORT_DISABLE_ALL runs the graph as written (QuantizeLinear rounds x / s, the student x * (1 / s)); the
    # optimized graph fuses W8A8 QDQ groups into integer kernels with an int32 bias
    for optimize in (False, True):
        got = run_ort(data, x, optimize)
        diff = np.abs(got - ref)
        assert (diff <= step).all(), (optimize, (diff / step).max())
        top2 = np.sort(ref, 1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * step.max()  # a random net has near-ties; those may flip
        assert (got.argmax(1) == ref.argmax(1))[clear].all()
        if not optimize:
            assert np.median(diff) <= 1e-5
    if w_bits == a_bits == 8:  # ORT fuses the W8A8 groups into integer convolutions
        from zeroshot_kd.export import optimized_op_counts

        assert optimized_op_counts(data).get("QLinearConv", 0) >= 1


def grid_images(n=32, seed=3, scale=0.02, zero_point=100):
    """Images exactly on a uint8 grid holding codes 0 and 255, so the export-only input quantizer is exact."""
    q = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed)).float()
    q.view(-1)[0], q.view(-1)[1] = 0, 255
    return (q - zero_point) * scale


def test_integer_qdq_puts_every_conv_and_residual_add_on_integer_kernels(small_teacher, one_thread):
    """The extra 8-bit QDQ: ORT runs each conv as QLinearConv and each residual Add as QLinearAdd."""
    from zeroshot_kd.export import optimized_op_counts
    from zeroshot_kd.quant.modules import QuantConv2d

    student = student_of(small_teacher, QuantConfig(8, 8)).student
    x = grid_images()
    plain, _ = onnx_bytes(student)
    data, summary = onnx_bytes(student, range_inputs=x)
    convs = sum(isinstance(m, QuantConv2d) for m in student.modules())
    proto = onnx.load_from_string(plain)
    consts = {t.name for t in proto.graph.initializer} | {n.output[0] for n in proto.graph.node
                                                         if n.op_type in ("Constant", "Identity")}
    residual_adds = sum(n.op_type == "Add" and not set(n.input) & consts for n in proto.graph.node)
    assert convs == 9 and residual_adds == 3  # ResNet-8: stem + 3 blocks x 2 + 2 downsample; one Add per block
    before, after = optimized_op_counts(plain), optimized_op_counts(data)
    assert before.get("QLinearConv", 0) < convs and before.get("QLinearAdd", 0) == 0
    assert after.get("QLinearConv") == convs and after.get("QLinearAdd") == residual_adds
    assert after.get("Conv", 0) + after.get("FusedConv", 0) == 0 and after.get("Add", 0) == 0
    assert summary["extra_qdq"]["first_layer_inputs"] == 1


def test_integer_qdq_output_quantizer_is_fake_quant_of_the_conv_output(small_teacher, one_thread):
    """An observed conv-output point: grid from the min/max of the student's conv output, DQ(Q(y)) = fake-quant."""
    from onnx import numpy_helper

    from zeroshot_kd.quant.modules import QuantConv2d

    student = student_of(small_teacher, QuantConfig(8, 8)).student
    x = grid_images()
    data, _ = onnx_bytes(student, range_inputs=x)
    proto = onnx.load_from_string(data)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    # the first observed (new-grid) point in graph order that is a conv output
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.name.startswith("zkd_qdq.")
             and n.input[1] in inits and producer.get(n.input[0]) is not None
             and producer[n.input[0]].op_type == "Conv")
    s, z = float(inits[q.input[1]]), int(inits[q.input[2]])
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    proto.graph.output.append(onnx.helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess_out = ort.InferenceSession(proto.SerializeToString(), sess_options=opts,
                                    providers=["CPUExecutionProvider"]).run([dq.output[0]], {"input": x.numpy()})[0]
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o.detach().numpy()))
             for m in student.modules() if isinstance(m, QuantConv2d)]
    with torch.no_grad():
        student(x)
    for h in hooks:
        h.remove()
    best = None
    for y in outs:
        if y.shape != sess_out.shape:
            continue
        lo, hi = min(y.min(), 0.0), max(y.max(), 0.0)
        if not np.isclose(s, (hi - lo) / 255, rtol=1e-4):
            continue
        fq = (np.clip(np.round(y / s) + z, 0, 255) - z) * s
        err = np.abs(sess_out - fq).max()
        best = err if best is None else min(best, err)
    assert best is not None, "no student conv output has the point's observed range"
    assert best <= s * (1 + 1e-3)


def test_integer_qdq_skipped_below_8_bit_activations(small_teacher, one_thread):
    """ORT has no integer kernels for A4: the export with ranges is byte-identical to the student-only one."""
    student = student_of(small_teacher, QuantConfig(4, 4)).student
    plain, _ = onnx_bytes(student)
    data, summary = onnx_bytes(student, range_inputs=grid_images())
    assert data == plain and "extra_qdq" not in summary


def test_fp32_export_matches_the_float_model(small_teacher, one_thread, tmp_path):
    model = small_teacher.model
    out = tmp_path / "fp32.onnx"
    res = export_onnx(model, out, FASHION_MNIST_SPEC, check_inputs=images(16), threads=1)
    assert res.check["agreement"] == 100.0 and res.check["max_logit_diff"] < 1e-4
    assert not res.integer_kernels
    with torch.no_grad():
        ref = model(images(8, 9)).numpy()
    np.testing.assert_allclose(run_ort(out.read_bytes(), images(8, 9)), ref, atol=1e-4, rtol=1e-4)
    ort_model, spec, info = load_onnx_model(out)
    assert spec == FASHION_MNIST_SPEC and info["kind"] == "onnx"


def test_unsupported_modules_named(small_teacher, one_thread):
    res = student_of(small_teacher, QuantConfig(8, 8))
    student = res.student
    student.extra = nn.LayerNorm(4)
    with pytest.raises(ZkdError, match=r"module 'extra' \(LayerNorm\) is not supported"):
        onnx_bytes(student)
    del student.extra
    name, last = quant_layers(student)[-1]
    float_fc = nn.Linear(last.in_features, last.out_features)
    setattr(student, name, float_fc)
    assert isinstance(last, QuantLinear)
    with pytest.raises(ZkdError, match=rf"module '{name}' \(Linear\) is not quantized"):
        onnx_bytes(student)


def test_missing_packages_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ZkdError, match=r"pip install zeroshot_kd\[export\]"):
        require_onnx()


@pytest.fixture()
def student_file(tmp_path, small_teacher):
    config = QuantConfig(4, 4)
    res = student_of(small_teacher, config)
    path = tmp_path / "s.pt"
    save_student(path, res.student, config, res.layers, small_teacher, res.folded, ARCH,
                 {"data": "gaussian:24"})
    return path, res.student


def run(args):
    return CliRunner().invoke(cli, args)


def test_cli_export_checks_and_evaluate_runs_it(tmp_path, student_file, one_thread):
    path, student = student_file
    out = tmp_path / "s.onnx"
    r = run(["export", "--model", str(path), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["check"]["images"] == 24 and summary["check"]["agreement"] >= 99.5
    assert summary["summary"]["weight_types"]["W4"] == "int4" and summary["summary"]["opset"] == 21
    # zkd evaluate on the .onnx: same argmax as PyTorch, so the same agreement with the student as teacher
    x = images(16, 3)
    sess = ort_session(out.read_bytes(), threads=1)
    with torch.no_grad():
        same = (torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]).argmax(1) == student(x).argmax(1))
    r = run(["evaluate", "--model", str(out), "--data", "gaussian:16", "--device", "cpu", "-q", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["kind"] == "onnx" and ev["images"] == 16
    assert bool(same.all()) or same.float().mean() >= 0.9


def test_cli_export_refuses_below_threshold(tmp_path, student_file, one_thread):
    path, _ = student_file
    out = tmp_path / "refused.onnx"
    r = run(["export", "--model", str(path), "--out", str(out), "--min-agreement", "100.1"])
    assert r.exit_code == 2
    assert "below --min-agreement 100.1%; nothing written" in r.output and "Traceback" not in r.output
    assert not out.exists() and list(tmp_path.glob("refused*")) == []


def test_cli_export_onnx_needs_a_student(tmp_path):
    r = run(["export", "--model", "fmnist_resnet14", "--out", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "--format onnx exports a student file" in r.output


def test_evaluate_corrupted_and_foreign_onnx(tmp_path, student_file, one_thread):
    path, _ = student_file
    good = tmp_path / "good.onnx"
    assert run(["export", "--model", str(path), "--out", str(good)]).exit_code == 0
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(good.read_bytes()[:500])
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 28, 28])])
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(helper.make_model(graph).SerializeToString())
    for f, msg in ((bad, "corrupted or not an ONNX model"), (foreign, "not written by 'zkd export'"),
                   (tmp_path / "missing.onnx", "does not exist")):
        r = run(["evaluate", "--model", str(f), "--data", "gaussian:4", "--device", "cpu", "-q"])
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("zkd: error:") and msg in lines[0]
