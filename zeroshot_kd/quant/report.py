"""Quantization reports: per-layer bits, scales, SQNR and clipping; global teacher-student agreement and KL.

SQNR is ``20 log10(||x|| / ||x - x_hat||)`` dB (``torch.ao.ns`` ``compute_sqnr``), accumulated over all
evaluation batches (sums of squares, then one ratio). For weights, ``x`` is the float (folded) weight and ``x_hat``
the student's fake-quantized weight, so learned rounding and fine-tuning show up as changes. For activations,
``x`` is a layer's input in the student and ``x_hat`` its fake-quantized value; the clipping rate is the fraction of
input values whose code ``round(x / s) + z`` falls outside the grid. Output SQNR compares each layer's output in
the student with the same layer's output in the float model on the same images (errors accumulate with depth).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..capture import Capture
from ..evaluate import evaluate_model
from ..similarity import VERDICTS
from .fakequant import sqnr_db
from .modules import quant_layers

__all__ = ["CALIBRATION_SET_AGREEMENT", "finetune_check_line", "global_metrics", "layer_report", "recon_check_line",
           "render_markdown", "rounding_rate_line"]

# What the agreement is called when --data had no images beyond the calibration set (so none were held out).
CALIBRATION_SET_AGREEMENT = "calibration-set agreement (no held-out images)"


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{nd}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


@torch.no_grad()
def layer_report(student: nn.Module, fp_model: nn.Module, batches: Sequence[torch.Tensor],
                 device: torch.device) -> list[dict[str, Any]]:
    """Per quantized layer: bits, grids, scales, weight/activation/output SQNR and clipping rates."""
    student.eval()
    fp_model.eval()
    fp_layers = dict(fp_model.named_modules())
    layers = dict(quant_layers(student))
    acc = {name: {"x2": 0.0, "e2": 0.0, "clip": 0.0, "n": 0.0, "y2": 0.0, "ye2": 0.0} for name in layers}

    def act_error(addr: str, value: torch.Tensor) -> None:
        name = addr[: -len("@in")]
        m, a = layers[name], acc[name]
        x = value.float()
        xq = m.aq(x)
        s, z = m.aq.scale.detach(), m.aq.zero_point
        codes = torch.round(x * (1.0 / s)) + z
        a["x2"] += x.pow(2).sum().item()
        a["e2"] += (x - xq).pow(2).sum().item()
        a["clip"] += ((codes < m.aq.qmin) | (codes > m.aq.qmax)).sum().item()
        a["n"] += x.numel()

    act_in = Capture(student, [f"{n}@in" for n, m in layers.items() if m.aq is not None], detach=True,
                     reduce=act_error)
    outs_s = Capture(student, list(layers), detach=True)
    outs_f = Capture(fp_model, [n for n in layers if n in fp_layers], detach=True)
    with act_in, outs_s, outs_f:
        for x in batches:
            outs_s.clear()
            outs_f.clear()
            student(x.to(device))
            fp_model(x.to(device))
            for name, y in outs_s.features.items():
                f = outs_f.features.get(name)
                if f is not None and f.shape == y.shape:
                    f, y = f.float(), y.float()
                    acc[name]["y2"] += f.pow(2).sum().item()
                    acc[name]["ye2"] += (f - y).pow(2).sum().item()
    rows = []
    for name, layer in quant_layers(student):
        ref = fp_layers[name].weight.detach().float() if name in fp_layers else layer.weight.detach().float()
        w_hat = layer.wq(layer.weight).float()
        wq = layer.wq
        shape = [-1] + [1] * (ref.dim() - 1)
        codes = torch.round(ref * (1.0 / wq.scale.view(shape))) + wq.zero_point.view(shape)
        a = acc[name]
        row = {
            "layer": name,
            "type": type(layer).__name__.replace("Quant", ""),
            "groups": getattr(layer, "groups", 1),
            "params": layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0),
            "w_bits": wq.bits,
            "w_grid": [wq.qmin, wq.qmax],
            "w_scale_min": wq.scale.min().item(),
            "w_scale_median": wq.scale.median().item(),
            "w_scale_max": wq.scale.max().item(),
            "w_sqnr_db": sqnr_db(ref.pow(2).sum().item(), (ref - w_hat).pow(2).sum().item()),
            "w_clip_rate": ((codes < wq.qmin) | (codes > wq.qmax)).float().mean().item(),
            "a_bits": layer.aq.bits if layer.aq is not None else None,
            "a_grid": [layer.aq.qmin, layer.aq.qmax] if layer.aq is not None else None,
            "a_signed": bool(layer.aq is not None and not layer.aq.symmetric),
            "a_scale": layer.aq.scale.item() if layer.aq is not None else None,
            "a_zero_point": int(layer.aq.zero_point.item()) if layer.aq is not None else None,
            "a_sqnr_db": sqnr_db(a["x2"], a["e2"]) if layer.aq is not None and a["n"] else None,
            "a_clip_rate": a["clip"] / a["n"] if layer.aq is not None and a["n"] else None,
            "out_sqnr_db": sqnr_db(a["y2"], a["ye2"]) if a["y2"] > 0 else None,
        }
        rows.append(row)
    return rows


def _compare(res: dict[str, Any]) -> dict[str, float]:
    t, s = res["teacher_logits"], res["logits"]
    return {"agreement": res["agreement"], "kl": res["kl"],
            "logit_sqnr_db": sqnr_db(t.pow(2).sum().item(), (t - s).pow(2).sum().item())}


@torch.no_grad()
def global_metrics(student: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor], device: torch.device,
                   precision: str = "fp32") -> dict[str, Any]:
    """Teacher-student agreement (%), KL(p_t || p_s) and logit SQNR on ``batches``; also weight-only and
    activation-only quantization (the sensitivity split). Agreement and KL come from the one evaluator,
    :func:`zeroshot_kd.evaluate.evaluate_model`."""
    x = torch.cat(list(batches))
    data = TensorDataset(x, torch.full((x.shape[0],), -1, dtype=torch.long))
    size = max(1, batches[0].shape[0]) if len(batches) else 1

    def compare() -> dict[str, float]:
        return _compare(evaluate_model(student, data, device, size, teacher, precision, progress=False,
                                       return_logits=True))

    out = {"images": int(x.shape[0]), **compare()}
    layers = [m for _, m in quant_layers(student)]
    for label, attr in (("weights_only", "aq"), ("activations_only", "wq")):
        qs = [getattr(m, attr) for m in layers if getattr(m, attr) is not None]
        for q in qs:
            q.enabled = False
        try:
            out[label] = compare()
        finally:
            for q in qs:
                q.enabled = True
    return out


def rounding_rate_line(report: dict[str, Any]) -> str | None:
    """One line on the reconstruction's rounding learning rate and how far its images are from the training data
    (with advice when they are far), or None without reconstruction."""
    rec = (report.get("settings") or {}).get("reconstruction") or {}
    if "lr_round" not in rec:
        return None
    line = f"Rounding learning rate {rec['lr_round']:.3g}"
    fit = rec.get("data_fit") or {}
    if fit.get("score") is None:
        return line + "."
    line += f"; calibration images: bns {fit['score']:.4g}, {fit['verdict']}."
    if fit["verdict"] == VERDICTS[2]:
        line += (" Reconstruction may fit their artifacts: prefer images closer to the training data (zkd "
                 "synthesize at its default iterations), or --recon-lr 1e-3 to fit them less.")
    return line


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable report.md from the report dict written by the calibration pipeline."""
    cfg, g = report["config"], report["heldout"]
    lines = ["# zkd calibrate report", "", f"**Convention:** {cfg['convention']}", "",
             "## Configuration", "", "| key | value |", "|---|---|"]
    for k, v in report["settings"].items():
        lines.append(f"| {k} | {_fmt(v) if not isinstance(v, (dict, list)) else v} |")
    which = (f"held-out agreement on {g['images']} held-out images" if report["heldout_is_separate"] else
             f"{CALIBRATION_SET_AGREEMENT} on {g['images']} calibration images")
    lines += ["", f"## Teacher vs student: {which} of `{report['settings']['data']}`", "",
              "| quantized | top-1 agreement % | KL(t‖s) | logit SQNR dB |", "|---|---|---|---|"]
    for label, d in (("weights + activations", g), ("weights only", g["weights_only"]),
                     ("activations only", g["activations_only"])):
        lines.append(f"| {label} | {_fmt(d['agreement'])} | {_fmt(d['kl'], 4)} | {_fmt(d['logit_sqnr_db'])} |")
    if report.get("eval"):
        e = report["eval"]
        lines += ["", f"## Accuracy on `{e['data']}` ({e['student']['images']} images)", "",
                  "| model | top-1 % | top-5 % | agreement % |", "|---|---|---|---|",
                  f"| teacher (FP32) | {_fmt(e['teacher']['top1'])} | {_fmt(e['teacher']['top5'])} | - |",
                  f"| student | {_fmt(e['student']['top1'])} | {_fmt(e['student']['top5'])} | "
                  f"{_fmt(e['student']['agreement'])} |"]
    if report.get("size"):
        z = report["size"]
        lines += ["", "## Model size", "", "| FP32 MB | student MB | ratio | bits/weight incl. scales |",
                  "|---|---|---|---|", f"| {z['fp32_bytes'] / 1e6:.3f}{' (est.)' if z.get('fp32_estimated') else ''}"
                  f" | {z['student_bytes'] / 1e6:.3f} | {z['ratio']:.2f}x | {z['bits_per_weight']:.3f} |"]
    lines += ["", "## Per layer", "",
              "| layer | type | W bits | W scale min/med/max | W SQNR dB | W clip % | A bits | A grid | A scale | A zp "
              "| A SQNR dB | A clip % | out SQNR dB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["layers"]:
        typ = r["type"] + (f" (groups={r['groups']})" if r["groups"] != 1 else "")
        agrid = "-" if r["a_grid"] is None else f"[{r['a_grid'][0]},{r['a_grid'][1]}]{'+zp' if r['a_signed'] else ''}"
        wclip = 100 * r["w_clip_rate"]
        aclip = None if r["a_clip_rate"] is None else 100 * r["a_clip_rate"]
        lines.append(f"| {r['layer']} | {typ} | {r['w_bits']} | {_fmt(r['w_scale_min'], 4)}/"
                     f"{_fmt(r['w_scale_median'], 4)}/{_fmt(r['w_scale_max'], 4)} | {_fmt(r['w_sqnr_db'])} | "
                     f"{_fmt(wclip)} | {_fmt(r['a_bits'])} | {agrid} | {_fmt(r['a_scale'], 4)} | "
                     f"{_fmt(r['a_zero_point'])} | {_fmt(r['a_sqnr_db'])} | {_fmt(aclip)} | {_fmt(r['out_sqnr_db'])} |")
    ranges = report.get("ranges") or {}
    if ranges.get("kl_by_candidate"):
        lines += ["", f"## Range guard: kept `{ranges['chosen']}`", "",
                  f"KL(teacher || student) on the validation images ({ranges['images']}); lowest wins.", "",
                  "| candidate | KL |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, 5)} |" for k, v in sorted(ranges["kl_by_candidate"].items(), key=lambda kv: kv[1])]
    if report.get("recon"):
        rate = rounding_rate_line(report)
        lines += ["", "## Block reconstruction", ""] + ([rate, ""] if rate else []) + [
            "| block | layers | loss before | loss after |", "|---|---|---|---|"]
        for r in report["recon"]:
            lines.append(f"| {r['block']} | {r['layers']} | {_fmt(r['loss_before'], 5)} | {_fmt(r['loss_after'], 5)} |")
        check = report.get("recon_check")
        if check:
            lines += ["", recon_check_line(check) + "."]
    if report.get("finetune"):
        keys = [k for k in report["finetune"][0] if k != "step"]
        lines += ["", "## Fine-tuning", "", "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for r in report["finetune"]:
            lines.append(f"| {r['step']} | " + " | ".join(_fmt(r[k], 5) for k in keys) + " |")
        if report.get("finetune_check"):
            lines += ["", finetune_check_line(report["finetune_check"]) + "."]
    if report.get("mixed_precision"):
        mp = report["mixed_precision"]
        lines += ["", "## Mixed precision (weight bits per layer: see the per-layer table)", "",
                  f"Weight size {mp['size_mb']:.4f} MB ({mp['ratio_of_fp32']:.4f}x FP32 {mp['fp32_mb']:.4f} MB) within "
                  f"the budget {mp['budget_mb']:.4f} MB; uniform student {mp['uniform_mb']:.4f} MB. Predicted "
                  f"sensitivity (sum of per-layer KL) {_fmt(mp['predicted_sensitivity'], 5)}, uniform "
                  f"{_fmt(mp['uniform_sensitivity'], 5)}.", "", "![frontier](frontier.png)"]
    lines += ["", "## Timing (s)", "", "| stage | seconds |", "|---|---|"]
    for k, v in report["timing"].items():
        lines.append(f"| {k} | {_fmt(v)} |")
    return "\n".join(lines) + "\n"


def _noise(check: dict[str, Any], before: str, after: str) -> str:
    """`` (+1.3 SE, tolerance 2 SE)``: the KL change ``check[after] - check[before]`` in paired standard errors
    (reports written before the tolerance existed have none)."""
    if "se" not in check:
        return ""
    change = f"{(check[after] - check[before]) / check['se']:+.1f} SE" if check["se"] > 0 else "no spread"
    return f" ({change}, tolerance {check['tolerance_se']:g} SE)"


def recon_check_line(check: dict[str, Any]) -> str:
    """``Reconstruction check: validation KL a after PTQ, b after reconstruction (...): kept ...`` (report.md, CLI)."""
    which = "reconstructed" if check["kept"] == "reconstruction" else "PTQ"
    return (f"Reconstruction check: validation KL {_fmt(check['ptq_kl'], 5)} after PTQ, {_fmt(check['recon_kl'], 5)} "
            f"after reconstruction{_noise(check, 'ptq_kl', 'recon_kl')}: kept the {which} student")


def finetune_check_line(check: dict[str, Any]) -> str:
    """``Fine-tuning check: validation KL a before, b after (...): kept ...`` (report.md and the CLI)."""
    which = "the fine-tuned student" if check["kept"] == "finetune" else "the student from before fine-tuning"
    return (f"Fine-tuning check: validation KL {_fmt(check['before_kl'], 5)} before, {_fmt(check['finetune_kl'], 5)} "
            f"after{_noise(check, 'before_kl', 'finetune_kl')}: kept {which}")
