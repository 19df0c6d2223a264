"""Deployable students: file sizes per bit width, ONNX Runtime latency of W8A8 QDQ vs FP32, ORT vs PyTorch top-1.

For each model (the two shipped teachers, and a torchvision ResNet-18 with random weights at 224 px):

* student file size for W8A8, W4A4, W3A3, W2A2 (first/last layers at 8 bits, the default convention) against the
  FP32 state_dict, with bits per weight including scales (``zeroshot_kd.quant.size``);
* the W8A8 student exported as a QDQ graph and the float model as FP32 ONNX, both timed in ONNX Runtime (CPU,
  one intra-op thread, full graph optimization) in the same run, alternating, at batch 1 and 32; median of
  ``--repeats`` runs after a warm-up; ratio = QDQ / FP32 (< 1: the quantized graph is faster);
* whether ORT's optimized graph runs integer kernels (QLinearConv / ConvInteger / QGemm counts);
* top-1 on the real Fashion-MNIST test set of every exported student in ORT vs the same student in PyTorch, and
  the export check's agreement (``--test-images`` of the test set, a seeded stratified sample; the random
  ResNet-18 has no data set, its check runs on gaussian images).

The Fashion-MNIST students are calibrated on ``--cal-images`` real training images (this benchmark measures
deployment, not data-free accuracy; bench_quant.py covers that), the ResNet-18 on gaussian images.
Writes ``bench/results/export.md`` and ``bench/results/export.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import markdown_table, write_json, write_result  # noqa: E402
from zeroshot_kd import load_teacher  # noqa: E402
from zeroshot_kd.data import make_dataset  # noqa: E402
from zeroshot_kd.evaluate import evaluate_model  # noqa: E402
from zeroshot_kd.export import OrtModel, export_onnx, ort_session  # noqa: E402
from zeroshot_kd.export.runtime import INTEGER_OPS  # noqa: E402
from zeroshot_kd.quant.modules import QuantConfig  # noqa: E402
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student  # noqa: E402
from zeroshot_kd.quant.size import model_size  # noqa: E402
from zeroshot_kd.quant.student import architecture_record, load_student, save_student  # noqa: E402

BITS = (8, 4, 3, 2)
MODELS = {
    "fmnist_resnet14": {"spec": "fmnist_resnet14", "kw": {}, "cal": "fashion-mnist:train", "eval": True},
    "fmnist_mobilenetv2": {"spec": "fmnist_mobilenetv2", "kw": {}, "cal": "fashion-mnist:train", "eval": True},
    "resnet18@224": {"spec": "resnet18", "kw": {"weights": "none"}, "cal": "gaussian:64", "eval": False},
}


def median_ms(session: Any, x: torch.Tensor) -> float:
    arr = x.numpy()
    name = session.get_inputs()[0].name
    t0 = time.perf_counter()
    session.run(None, {name: arr})
    return (time.perf_counter() - t0) * 1e3


def latency(graphs: list[bytes], spec: Any, batch: int, repeats: int, threads: int | None) -> list[float]:
    """Median ms of each graph, timed alternately (round-robin) in the same process."""
    sessions = [ort_session(g, threads=threads) for g in graphs]
    x = torch.randn(batch, *spec.shape, generator=torch.Generator().manual_seed(batch))
    for s in sessions:  # warm-up
        median_ms(s, x)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for s, t in zip(sessions, times):
            t.append(median_ms(s, x))
    return [statistics.median(t) for t in times]


def first_images(source: str, spec: Any, n: int) -> torch.Tensor:
    ds = make_dataset(source, spec, num_images=n)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


def run_model(label: str, cfg: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    teacher = load_teacher(cfg["spec"], **cfg["kw"])
    spec = teacher.spec
    out: dict[str, Any] = {"model": label, "input": list(spec.shape), "bits": {}, "test_images": args.test_images}
    test = make_dataset("fashion-mnist:test", spec, num_images=args.test_images) if cfg["eval"] else None
    check_src = "fashion-mnist:test" if cfg["eval"] else f"gaussian:{args.check_images}"
    check = first_images(check_src, spec, args.check_images)
    cal_images = args.cal_images if cfg["eval"] else min(args.cal_images, 64)
    # ranges of the export-only 8-bit QDQ (zeroshot_kd.export.integer): the calibration source, not the check set
    ranges = first_images(cfg["cal"], spec, min(cal_images, 64))
    fp32_onnx = export_onnx(teacher.model, tmp / f"{label}-fp32.onnx", spec, check_inputs=check, threads=1)
    out["fp32_onnx_bytes"] = fp32_onnx.bytes
    for b in BITS:
        if b != 8 and not cfg["eval"] and args.quick_resnet:
            cal = 8  # sizes only: the weight codes do not depend on activation calibration
        else:
            cal = cal_images
        config = QuantConfig(b, b)
        opts = CalibrationOptions(data=cfg["cal"], num_images=cal, holdout=0, batch_size=16, candidates=50,
                                  recon=False, progress=False)
        t0 = time.perf_counter()
        res = calibrate_student(teacher, config, opts, torch.device("cpu"))
        path = tmp / f"{label}-w{b}.pt"
        save_student(path, res.student, config, res.layers, teacher, res.folded, architecture_record(teacher),
                     {"data": cfg["cal"]})
        size = model_size(path)
        row: dict[str, Any] = {"size": size.to_dict(), "calibrate_s": time.perf_counter() - t0}
        if cfg["eval"] or b == 8:
            student = load_student(path)
            exp = export_onnx(student, tmp / f"{label}-w{b}.onnx", check_inputs=check, min_agreement=0.0,
                              threads=1, range_inputs=ranges)
            row.update(onnx_bytes=exp.bytes, check=exp.check, weight_types=exp.summary["weight_types"],
                       integer_kernels=exp.integer_kernels, optimized_ops=exp.optimized_ops,
                       extra_qdq=exp.summary.get("extra_qdq"),
                       convs=sum(v for k, v in exp.optimized_ops.items() if "Conv" in k))
            if b == 8:  # the student's own quantizers only (no extra QDQ): what ORT fused before
                plain = export_onnx(student, tmp / f"{label}-w{b}-plain.onnx", check_inputs=check,
                                    min_agreement=0.0, threads=1, integer_qdq=False)
                row["plain"] = {"check": plain.check, "integer_kernels": plain.integer_kernels,
                                "optimized_ops": plain.optimized_ops}
            if test is not None:
                ort_model = OrtModel(ort_session(exp.path, threads=1))
                row["top1_ort"] = evaluate_model(ort_model, test, "cpu", 500, student, progress=False)
                row["top1_torch"] = evaluate_model(student, test, "cpu", 500, progress=False)["top1"]
            if b == 8:
                graphs = [Path(p).read_bytes() for p in (fp32_onnx.path, tmp / f"{label}-w8-plain.onnx", exp.path)]
                for threads in args.threads:
                    for batch, reps in ((1, args.repeats), (32, max(3, args.repeats // 4))):
                        t_fp, t_plain, t_q = latency(graphs, spec, batch, reps, threads or None)
                        out[f"latency_t{threads}_b{batch}"] = {"fp32_ms": t_fp, "w8a8_ms": t_q, "ratio": t_q / t_fp,
                                                               "plain_ms": t_plain, "plain_ratio": t_plain / t_fp}
        out["bits"][f"W{b}"] = row
        print(f"[bench] {label} W{b}: {size.student_bytes / 1e6:.3f} MB, {size.bits_per_weight:.2f} b/w"
              + (f", ORT agreement {row['check']['agreement']:.2f}%" if "check" in row else ""), file=sys.stderr)
    out["fp32_bytes"] = out["bits"]["W8"]["size"]["fp32_bytes"]
    return out


def render(results: list[dict[str, Any]]) -> str:
    lines = ["# Export benchmark", "",
             "Student file sizes (zkd student format 2: sub-byte codes bit-packed; first/last layers W8), ONNX "
             "Runtime CPU latency (1 thread, median) of the W8A8 QDQ graph vs the same model's FP32 export, and "
             "top-1 on the real Fashion-MNIST test set of each exported student in ORT vs PyTorch.", "",
             "## Sizes (MB; bits/weight include per-channel scales and zero points)", ""]
    rows = []
    for r in results:
        cells = [r["model"], f"{r['fp32_bytes'] / 1e6:.2f}"]
        for b in BITS:
            z = r["bits"][f"W{b}"]["size"]
            cells.append(f"{z['student_bytes'] / 1e6:.3f} ({z['ratio']:.1f}x, {z['bits_per_weight']:.2f} b/w)")
        rows.append(cells)
    lines.append(markdown_table(["model", "FP32"] + [f"W{b}A{b} student" for b in BITS], rows))
    threads = sorted({int(k.split("_")[1][1:]) for r in results for k in r if k.startswith("latency_t")})
    for t in threads:
        tname = "1 thread" if t == 1 else ("ONNX Runtime's default threads" if t == 0 else f"{t} threads")
        lines += [f"## ONNX Runtime latency, W8A8 QDQ vs FP32 ({tname}; ms, median; ratio < 1 = quantized faster)",
                  "", "`student QDQ`: only the student's own quantizers; `integer QDQ` (the default export): with "
                  "the export-only 8-bit QDQ at conv outputs, residual Adds and the first-layer input.", ""]
        rows = []
        for r in results:
            cells = [r["model"]]
            for batch in (1, 32):
                lt = r[f"latency_t{t}_b{batch}"]
                cells.append(f"{lt['fp32_ms']:.2f} / {lt['plain_ms']:.2f} / {lt['w8a8_ms']:.2f} = "
                             f"{lt['plain_ratio']:.2f} / **{lt['ratio']:.2f}**")
            rows.append(cells)
        lines.append(markdown_table(["model", "batch 1: FP32 / student QDQ / integer QDQ = ratios",
                                     "batch 32: FP32 / student QDQ / integer QDQ = ratios"], rows))
    lines += ["## ORT optimized graph of the W8A8 export: node counts, student QDQ -> integer QDQ", ""]
    rows = []
    for r in results:
        w8 = r["bits"]["W8"]
        before, after = w8["plain"]["optimized_ops"], w8["optimized_ops"]

        def conv_counts(ops: dict) -> str:
            return (f"QLinearConv {ops.get('QLinearConv', 0)}, float Conv/FusedConv "
                    f"{ops.get('Conv', 0) + ops.get('FusedConv', 0)}, QLinearAdd {ops.get('QLinearAdd', 0)}, "
                    f"float Add {ops.get('Add', 0)}, Q/DQ {ops.get('QuantizeLinear', 0)}/"
                    f"{ops.get('DequantizeLinear', 0)}")
        ex = w8.get("extra_qdq") or {}
        rows.append([r["model"], conv_counts(before), conv_counts(after),
                     f"{ex.get('points', 0)} ({ex.get('reused', 0)} student grids, {ex.get('observed', 0)} "
                     f"observed, {ex.get('pooled', 0)} pooled; {ex.get('first_layer_inputs', 0)} input)",
                     f"{w8['plain']['check']['agreement']:.2f} -> {w8['check']['agreement']:.2f}",
                     f"{w8['plain']['check']['max_logit_diff']:.3g} -> {w8['check']['max_logit_diff']:.3g}"])
    lines.append(markdown_table(["model", "student QDQ", "integer QDQ", "extra 8-bit quantizers",
                                 "check agreement %", "max logit diff"], rows))
    lines += ["## Top-1 on Fashion-MNIST test: ORT model vs PyTorch student", "",
              f"{results[0].get('test_images', '')} test images (seeded stratified sample).", ""]
    rows = []
    for r in results:
        for b in BITS:
            w = r["bits"][f"W{b}"]
            if "top1_ort" not in w:
                continue
            rows.append([r["model"], f"W{b}A{b}", ", ".join(f"{k} {v}" for k, v in w["weight_types"].items()),
                         f"{w['top1_torch']:.2f}", f"{w['top1_ort']['top1']:.2f}",
                         f"{w['top1_ort']['agreement']:.2f}"])
    lines.append(markdown_table(["model", "bits", "ONNX weight types", "PyTorch top-1", "ORT top-1",
                                 "ORT-PyTorch agreement %"], rows))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    ap.add_argument("--cal-images", type=int, default=256, help="calibration images per student")
    ap.add_argument("--check-images", type=int, default=256, help="images of each export check")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs at batch 1 (batch 32: a quarter, >= 3)")
    ap.add_argument("--result", default="export", help="name of the bench/results/<name>.md/.json files")
    ap.add_argument("--test-images", type=int, default=10000, help="Fashion-MNIST test images for the top-1 rows")
    ap.add_argument("--threads", type=lambda v: [int(t) for t in v.split(",")], default=[1],
                    help="comma list of ORT intra-op thread counts for the latency rows (0: ORT's default)")
    ap.add_argument("--quick-resnet", action=argparse.BooleanOptionalAction, default=True,
                    help="calibrate the random ResNet-18's W4/W3/W2 students on 8 images (sizes only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as d:
        for label in args.models.split(","):
            results.append(run_model(label, MODELS[label], args, Path(d)))
            # after every model, so a long run leaves the finished rows
            write_json(args.result, results)
            write_result(args.result, render(results) + "\nCommand: `python bench/bench_export.py "
                         f"{' '.join(sys.argv[1:])}`".rstrip() + "\n")


if __name__ == "__main__":
    main()
