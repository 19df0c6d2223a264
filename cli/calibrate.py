"""``zkd calibrate``: a low-bit fake-quantized student of the teacher, calibrated on (synthetic) data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from .common import (device_option, echo, emit_json, handle_errors, json_option, load_checked_teacher,
                     precision_option, seed_option, teacher_kwargs, teacher_options, verify_option)

EXAMPLES = """
\b
Examples:
  # W4A4 PTQ of the shipped teacher on DeepInversion shards, accuracy on the real test set
  zkd calibrate --data synth/di --bits 4 --out w4a4.pt --eval-data fashion-mnist:test
  # + block reconstruction (AdaRound/QDrop) and 500 steps of KD fine-tuning
  zkd calibrate --data synth/di --bits 4 --recon --finetune-steps 500 --out w4a4r.pt
  # everything at 4 bits, including the first and last layers and the network input
  zkd calibrate --data synth/bns --bits 4 --keep-8bit none --out all4.pt
"""

bits_type = int  # validated below, so a bad value gets zkd's one-line error


@click.command(help="Build a fake-quantized student (BN folded, per-channel weights, per-tensor activations), "
               "calibrate its ranges on --data, optionally reconstruct / fine-tune it against the teacher, and "
               "write the student file plus report.json / report.md.\n" + EXAMPLES,
               context_settings={"show_default": True, "max_content_width": 110})
@teacher_options
@click.option("--data", required=True, metavar="SOURCE",
              help="Calibration data: DIR or shards:DIR (zkd synthesize), folder:DIR, fashion-mnist:train|test, "
              "gaussian:N.")
@click.option("--num-images", type=click.IntRange(min=1), default=1024,
              help="Calibration images used: a seeded random sample of --data, stratified by class where labels are "
                   "known.")
@verify_option
@click.option("--holdout", type=click.IntRange(min=0), default=256,
              help="Further images of --data kept out of calibration for the report's agreement/KL.")
@click.option("--eval-data", default=None, metavar="SOURCE", help="Also report top-1/top-5 on this source "
              "(e.g. fashion-mnist:test).")
@click.option("--eval-images", type=click.IntRange(min=1), default=None, help="Cap on --eval-data images.")
@click.option("--bits", type=bits_type, default=4, help="Weight and activation bits, 2..8.")
@click.option("--w-bits", type=bits_type, default=None, help="Weight bits, 2..8 (overrides --bits).")
@click.option("--a-bits", type=bits_type, default=None, help="Activation bits, 2..8 (overrides --bits).")
@click.option("--w-asym", is_flag=True, help="Asymmetric per-channel weight grid [0, 2^b-1] + zero point "
              "(default: symmetric narrow [-(2^(b-1)-1), 2^(b-1)-1]).")
@click.option("--keep-8bit", default="first,last", metavar="first,last|first|last|none",
              help="Layers kept at 8 bits: first = first layer W8 and network input unquantized; last = last "
              "layer W8 with A8 input. none quantizes everything.")
@click.option("--fold/--no-fold", "fold_bn", default=True, help="Fold BatchNorm into the student's convs "
              "(without folding, BN stays in eval mode).")
@click.option("--w-method", type=click.Choice(["lp", "mse", "minmax"]), default="lp",
              help="Weight range search per channel.")
@click.option("--a-method", type=click.Choice(["output", "auto", "mse", "lp", "percentile", "minmax"]),
              default="auto", show_default=True, help="Activation range search per tensor: auto = build "
              "{mse, output, minmax} x {CLE+bias correction off, on} and keep the one with the lowest logit KL to "
              "the FP32 teacher on a held-out quarter of the calibration images (fits ranges on the other three "
              "quarters); output = clipping that minimizes the consuming layer's output error; "
              "mse/lp/percentile/minmax = the tensor's own error.")
@click.option("--equalize/--no-equalize", default=None, help="Cross-layer equalization of consecutive conv pairs "
              "(DFQ) on the folded float copy before quantization [default: chosen by the --a-method auto guard; with "
              "another --a-method: on with --keep-8bit none, else off].")
@click.option("--relu6", type=click.Choice(["clip", "relu", "skip"]), default="clip",
              help="Equalization through ReLU6: clip = per-channel rescaled clip (exact), relu = replace by ReLU, "
              "skip = leave those pairs.")
@click.option("--equalize-criterion", type=click.Choice(["weight", "activation"]), default="weight",
              help="Equalization ranges: weight = DFQ (A's output-channel weight ranges vs B's input-channel "
              "ranges); activation = measured activation channel ranges vs B's input-channel ranges.")
@click.option("--bias-correction/--no-bias-correction", default=None,
              help="Subtract the mean output shift caused by weight quantization (empirical, calibration images) "
              "[default: chosen by the --a-method auto guard, together with --equalize; with another --a-method: on "
              "with --keep-8bit none, else off].")
@click.option("--bias-correction-mode", type=click.Choice(["empirical", "analytic"]), default="empirical",
              show_default=True, help="empirical = mean output shift measured on the calibration images; analytic = "
              "DFQ's E[x] from the preceding BN's beta/gamma (clipped normal), data-free, only layers fed by conv+BN.")
@click.option("--absorb-high-bias/--no-absorb-high-bias", "absorb_bias", default=False, show_default=True,
              help="DFQ high-bias absorption (max(0, beta - 3 gamma) moved through a ReLU into the next unpadded "
              "conv) on the folded float copy.")
@click.option("--mixed-precision", is_flag=True, help="Per-layer weight bits from {2,3,4,6,8} by ZeroQ "
              "sensitivity within --size-budget.")
@click.option("--size-budget", default=None, metavar="MB|RATIO", help="Weight size budget for --mixed-precision, "
              "e.g. 2.5MB or 0.125x of FP32 [default: the size of the uniform --bits student].")
@click.option("--lp-p", type=click.FloatRange(min=1), default=2.4, help="Exponent of the lp searches.")
@click.option("--candidates", type=click.IntRange(min=1), default=100, help="Clipping ratios tried per range.")
@click.option("--percentile", type=click.FloatRange(0, 100, min_open=True), default=99.99,
              help="Upper percentile kept by --a-method percentile.")
@click.option("--act-images", type=click.IntRange(min=1), default=None,
              help="Images used for the activation range search [default: all calibration images].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Batch size of calibration, "
              "reconstruction and fine-tuning.")
@click.option("--recon", is_flag=True, help="Block-wise reconstruction against the float model (AdaRound weights, "
              "learned activation steps, QDrop).")
@click.option("--recon-iters", type=click.IntRange(min=0), default=1000, help="Optimizer steps per block.")
@click.option("--recon-images", type=click.IntRange(min=1), default=None,
              help="Images cached for reconstruction [default: all calibration images].")
@click.option("--recon-drop", type=click.FloatRange(0, 1, min_open=True), default=0.5,
              help="QDrop probability of using the quantized value (1 = BRECQ, no dropping).")
@click.option("--recon-lambda", type=click.FloatRange(min=0), default=0.01, help="AdaRound rounding-loss weight.")
@click.option("--recon-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3,
              help="Adam learning rate of the AdaRound rounding variables.")
@click.option("--finetune-steps", type=click.IntRange(min=0), default=0,
              help="KD fine-tuning steps of weights and step sizes (0 = off).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-5,
              help="Fine-tuning Adam learning rate of weights/biases (cosine decay).")
@click.option("--scale-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Fine-tuning learning rate of the step sizes [default: --lr].")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=4.0,
              help="KD temperature T of the fine-tuning loss T^2 * KL(p_t^T || p_s^T).")
@click.option("--objective", "objectives", multiple=True, metavar="NAME[:k=v,...]",
              help="Fine-tuning objective, repeatable, e.g. --objective kd:T=4 --objective rkd:weight=1 "
              "[default: kd at --temperature]; see docs/objectives.md.")
@click.option("--out", default="student.pt", type=click.Path(dir_okay=False), help="Student file to write.")
@click.option("--report-dir", default=None, type=click.Path(file_okay=False),
              help="Folder for report.json and report.md [default: the folder of --out].")
@device_option
@precision_option
@seed_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@json_option
@handle_errors
def command(bits: int, w_bits: int | None, a_bits: int | None, w_asym: bool, keep_8bit: str, fold_bn: bool,
            objectives: tuple[str, ...], out: str, report_dir: str | None, device: str, precision: str, seed: int,
            quiet: bool, as_json: bool, **kw) -> None:  # noqa: ANN003
    """Options named like CalibrationOptions fields reach it through ``kw``; the rest are the teacher options."""
    from zeroshot_kd.errors import ZkdError
    from zeroshot_kd.io import atomic_write_bytes, atomic_write_json
    from zeroshot_kd.quant.modules import QuantConfig
    from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student
    from zeroshot_kd.quant.report import render_markdown
    from zeroshot_kd.quant.student import architecture_record, save_student
    from zeroshot_kd.runtime import resolve_device

    for flag, value in (("--bits", bits), ("--w-bits", w_bits), ("--a-bits", a_bits)):
        if value is not None and not 2 <= value <= 8:
            raise ZkdError(f"{flag} {value} is outside 2..8; pick a bit width from 2 to 8")
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise ZkdError(f"folder of --out {out} does not exist; create it first")
    from zeroshot_kd.validate import check_writable

    check_writable(out_path, "--out")
    rdir = Path(report_dir) if report_dir else out_path.parent
    if not rdir.is_dir():
        raise ZkdError(f"--report-dir {rdir} does not exist; create it first")
    if objectives:
        from zeroshot_kd.objectives import build

        build(list(objectives))  # bad names or parameters fail before any work
    config = QuantConfig(w_bits or bits, a_bits or bits, w_asym, keep_8bit, fold_bn)
    option_names = {f.name for f in dataclasses.fields(CalibrationOptions)}
    opts = CalibrationOptions(**{k: kw.pop(k) for k in list(kw) if k in option_names}, seed=seed,
                              precision=precision, progress=not quiet)
    dev = resolve_device(device)
    teacher = load_checked_teacher(dev, **teacher_kwargs(kw))
    echo(f"teacher: {teacher.source.get('kind')} {teacher.source.get('spec')}, input {teacher.spec.shape}; "
         f"device {dev}")
    echo(f"convention: {config.convention()}")
    result = calibrate_student(teacher, config, opts, dev, objectives=list(objectives) or None)
    calibration = {k: v for k, v in result.report["settings"].items() if k not in ("device",)}
    save_student(out_path, result.student, config, result.layers, teacher, result.folded,
                 architecture_record(teacher), calibration)
    from zeroshot_kd.quant.size import format_model_size, model_size

    size = model_size(out_path)
    result.report["size"] = size.to_dict()
    echo(f"size: {format_model_size(size)}")
    atomic_write_json(rdir / "report.json", result.report)
    atomic_write_bytes(rdir / "report.md", render_markdown(result.report).encode())
    if result.report.get("mixed_precision"):
        from zeroshot_kd.quant.mixed import frontier_png

        atomic_write_bytes(rdir / "frontier.png", frontier_png(result.report["mixed_precision"]))
        mp = result.report["mixed_precision"]
        echo(f"mixed precision: {mp['size_mb']:.4f} MB of budget {mp['budget_mb']:.4f} MB "
             f"({mp['ratio_of_fp32']:.4f}x FP32), predicted sensitivity {mp['predicted_sensitivity']:.4g} "
             f"(uniform W{config.w_bits}: {mp['uniform_sensitivity']:.4g}) -> {rdir / 'frontier.png'}")
    s = result.summary
    line = (f"W{config.w_bits}A{config.a_bits}: {s['agreement_label']} {s['heldout_agreement']:.2f}%, "
            f"KL {s['heldout_kl']:.4f}")
    if "student_top1" in s and s["student_top1"] is not None:
        line += f"; {opts.eval_data} top-1 teacher {s['teacher_top1']:.2f}% student {s['student_top1']:.2f}%"
    echo(f"{line}; {s['seconds']:.1f}s -> {out_path} (+ {rdir / 'report.md'})")
    if as_json:
        emit_json({"out": str(out_path), "report": str(rdir / "report.json"), **json.loads(json.dumps(s))})
