"""``zkd export``: a student as a QDQ ONNX graph (or the float teacher as FP32 ONNX), checked in ONNX Runtime."""

from __future__ import annotations

import click

from .common import echo, emit_json, handle_errors, json_option, teacher_kwargs, teacher_options

EXAMPLES = """
\b
Examples:
  zkd export --model w4a4.pt --format onnx --out w4a4.onnx
  zkd export --model w4a4.pt --format onnx-fp32 --out fp32.onnx      # its float teacher, the speed baseline
  zkd export --model w8a8.pt --out w8a8.onnx --check-data fashion-mnist:test --check-images 512
  zkd evaluate --model w4a4.onnx --data fashion-mnist:test
"""


@click.command(help="Export a 'zkd calibrate' student to ONNX with QuantizeLinear/DequantizeLinear around every "
               "quantized layer (--format onnx), or a float teacher (--format onnx-fp32). The graph is run in "
               "ONNX Runtime on --check-images images and compared with PyTorch; below --min-agreement top-1 "
               "agreement nothing is written. Needs pip install zeroshot_kd[export].\n" + EXAMPLES,
               context_settings={"show_default": True, "max_content_width": 110})
@click.option("--model", "model_spec", required=True, metavar="STUDENT.pt|SPEC",
              help="Student file from 'zkd calibrate'; for onnx-fp32 also a teacher spec (the student's own "
              "teacher is used when a student file is given).")
@teacher_options
@click.option("--format", "fmt", type=click.Choice(["onnx", "onnx-fp32"]), default="onnx",
              help="onnx: the quantized student as a QDQ graph; onnx-fp32: the float teacher.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--check-data", default=None, metavar="SOURCE", show_default="the student's calibration data",
              help="Images for the ONNX Runtime check (DIR, fashion-mnist:test, gaussian:N, ...); teachers given "
              "as specs default to gaussian noise.")
@click.option("--check-images", type=click.IntRange(min=1), default=256, help="Images of the check.")
@click.option("--min-agreement", type=click.FloatRange(min=0), default=99.5,
              help="Least top-1 agreement (percent) between ONNX Runtime and PyTorch to write the file.")
@click.option("--opset", type=click.IntRange(13, 23), default=None, show_default="17, or 21 for int4 weights",
              help="ONNX opset.")
@click.option("--integer-qdq/--student-qdq", "integer_qdq", default=True,
              help="--integer-qdq: add export-only 8-bit QDQ at conv outputs, residual Adds and the first layer's "
              "input (ranges observed on the check images) so ONNX Runtime runs every W8A8 conv and Add as an "
              "integer kernel (students with 8-bit activations); --student-qdq: exactly the student's quantizers.")
@json_option
@handle_errors
def command(model_spec: str, fmt: str, out: str, check_data: str | None, check_images: int, min_agreement: float,
            opset: int | None, integer_qdq: bool, as_json: bool, **kw) -> None:  # noqa: ANN003
    from pathlib import Path

    from zeroshot_kd.export import check_images as load_check_images
    from zeroshot_kd.export import export_onnx
    from zeroshot_kd.export.resolve import resolve_export_model
    from zeroshot_kd.export.onnx import require_onnx
    from zeroshot_kd.errors import ZkdError

    require_onnx()
    if not Path(out).resolve().parent.is_dir():
        raise ZkdError(f"folder of --out {out} does not exist; create it first")
    tk = teacher_kwargs(kw)
    model, spec, default_data, info = resolve_export_model(model_spec, fmt, tk)
    source = check_data or default_data
    echo(f"{info['what']}; checking against PyTorch on images of {source}")
    inputs = load_check_images(source, spec, check_images)
    res = export_onnx(model, out, spec, check_inputs=inputs, min_agreement=min_agreement, info=info["meta"],
                      opset=opset, integer_qdq=integer_qdq)
    c = res.check
    kernels = ", ".join(f"{k} x{v}" for k, v in sorted(res.integer_kernels.items())) or "none"
    types = ", ".join(f"{k} {v}" for k, v in sorted(res.summary["weight_types"].items())) or "float32"
    echo(f"ONNX Runtime vs PyTorch on {c['images']} images: top-1 agreement {c['agreement']:.2f}%, max logit "
         f"difference {c['max_logit_diff']:.3g}")
    echo(f"-> {out}: {res.bytes / 1e6:.2f} MB, opset {res.summary['opset']}, weights {types}; "
         f"ORT integer kernels: {kernels}")
    ex = res.summary.get("extra_qdq")
    if ex:
        echo(f"extra 8-bit QDQ (ONNX graph only): {ex['points']} tensors ({ex['reused']} on the student's grids, "
             f"{ex['observed']} observed, {ex['pooled']} pooled), {ex['first_layer_inputs']} first-layer input(s)")
    if as_json:
        emit_json({"out": out, "format": fmt, "check_data": source, **res.to_dict()})
