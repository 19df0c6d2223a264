"""``zkd calibrate``: a low-bit fake-quantized student of the teacher, calibrated on (synthetic) data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from zeroshot_kd.quant.modules import QuantConfig
from zeroshot_kd.quant.pipeline import CalibrationOptions

from .common import (config_options, device_option, echo, emit_json, handle_errors, json_option,
                     load_checked_teacher, precision_option, seed_option, teacher_kwargs, teacher_options,
                     verify_option)

EXAMPLES = """
\b
Examples:
  # W4A4 student of the shipped teacher on DeepInversion shards (ranges + reconstruction), real test accuracy
  zkd calibrate --data synth/di --bits 4 --out w4a4.pt --eval-data fashion-mnist:test
  # + 4000 steps of KD fine-tuning after the reconstruction
  zkd calibrate --data synth/di --bits 4 --finetune-steps 4000 --out w4a4r.pt
  # everything at 4 bits, including the first and last layers and the network input
  zkd calibrate --data synth/bns --bits 4 --keep-8bit none --out all4.pt
  # the guard and the checks choose on a few real images (or full-length shards) instead of the BN probe
  zkd calibrate --data synth/bns --bits 4 --validation-data folder:real-few/ --out v.pt
"""

bits_type = int  # validated below, so a bad value gets zkd's one-line error

# CalibrationOptions fields shown after the quantization options, in --help order (flags/help/defaults on the fields)
_ORDER = ["w_method", "a_method", "equalize", "relu6", "equalize_criterion", "bias_correction",
          "bias_correction_mode", "absorb_bias", "mixed_precision", "size_budget", "lp_p", "candidates", "percentile",
          "act_images", "validation", "probe_images", "probe_iterations", "validation_data", "validation_images",
          "batch_size",
          "recon", "recon_iters", "recon_images", "recon_check", "check_tolerance", "recon_drop", "recon_lambda",
          "recon_mode", "recon_lr", "finetune_steps", "lr", "scale_lr", "temperature", "finetune_check",
          "finetune_mixup", "finetune_shift", "finetune_flip", "finetune_drop"]


@click.command(help="Build a fake-quantized student (BN folded, per-channel weights, per-tensor activations), "
               "calibrate its ranges on --data, optionally reconstruct / fine-tune it against the teacher, and "
               "write the student file plus report.json / report.md.\n" + EXAMPLES,
               context_settings={"show_default": True, "max_content_width": 110})
@teacher_options
@config_options(CalibrationOptions, ["data", "num_images"])
@verify_option
@config_options(CalibrationOptions, ["holdout", "eval_data", "eval_images"])
@click.option("--bits", type=bits_type, default=4, help="Weight and activation bits, 2..8.")
@click.option("--w-bits", type=bits_type, default=None, help="Weight bits, 2..8 (overrides --bits).")
@click.option("--a-bits", type=bits_type, default=None, help="Activation bits, 2..8 (overrides --bits).")
@config_options(QuantConfig, ["w_asym", "keep_8bit", "fold_bn"], keep_8bit={"default": "first,last"})
@config_options(CalibrationOptions, _ORDER)
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
    from zeroshot_kd.quant.pipeline import calibrate_student
    from zeroshot_kd.quant.report import finetune_check_line, recon_check_line, render_markdown, rounding_rate_line
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
    ranges, check = result.report["ranges"], result.report.get("recon_check")
    if ranges.get("kl_by_candidate"):
        echo(f"ranges: kept {ranges['chosen']} (lowest validation KL of {len(ranges['kl_by_candidate'])} candidates, "
             f"{ranges['images']})")
    rate = rounding_rate_line(result.report)
    if rate:
        echo("reconstruction: " + rate[0].lower() + rate[1:])
    if check:
        echo(recon_check_line(check))
    if result.report.get("finetune_check"):
        echo(finetune_check_line(result.report["finetune_check"]))
    s = result.summary
    line = (f"W{config.w_bits}A{config.a_bits}: {s['agreement_label']} {s['heldout_agreement']:.2f}%, "
            f"KL {s['heldout_kl']:.4f}")
    if "student_top1" in s and s["student_top1"] is not None:
        line += f"; {opts.eval_data} top-1 teacher {s['teacher_top1']:.2f}% student {s['student_top1']:.2f}%"
    echo(f"{line}; {s['seconds']:.1f}s -> {out_path} (+ {rdir / 'report.md'})")
    if as_json:
        emit_json({"out": str(out_path), "report": str(rdir / "report.json"), **json.loads(json.dumps(s))})
