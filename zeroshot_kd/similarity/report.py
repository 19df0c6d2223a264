"""The similarity report: ranked scores, per-layer profile and dataset matrix, as JSON, Markdown and a chart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ZkdError
from ..io import atomic_write_bytes, atomic_write_json
from ..teachers import Teacher
from .divergence import DIVERGENCES, HEADLINE, divergences, similarity_matrix
from .predict import (PREDICTOR, SCORE_FORMS, VERDICT_CLOSE, VERDICT_FAR, VERDICTS, predicted_ranks, score_forms,
                      verdict)
from .signature import Signature, teacher_signature

__all__ = ["report_chart", "report_markdown", "similarity_report", "write_report"]


def similarity_report(teacher: Teacher, signatures: Sequence[Signature]) -> dict[str, Any]:
    """Scores of every signature against the teacher, ranked (closest first), and the pairwise matrix.

    Returns:
        A JSON-ready dict: ``teacher``, ``headline``, ``divergences`` (definitions), ``layers``, ``datasets``
        (ranked, each with ``scores``, ``per_layer``, ``forms`` (every :data:`SCORE_FORMS` value), ``predicted_rank``
        as a calibration set and ``verdict``), ``predictor`` (form and verdict thresholds) and ``matrix`` (``names``
        incl. the teacher's running statistics first, ``values`` = symmetric KL).
    """
    if not signatures:
        raise ZkdError("nothing to compare; pass at least one --data NAME=SOURCE or --stats FILE")
    names = [s.name for s in signatures]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ZkdError(f"dataset name(s) {', '.join(dup)} used more than once; give each --data/--stats a unique NAME=")
    ref = teacher_signature(teacher)
    entries = []
    for s in signatures:
        if s.teacher_sha256 != ref.teacher_sha256:
            raise ZkdError(f"signature {s.name!r} ({s.source}) was computed with another teacher (weights sha256 "
                           f"{s.teacher_sha256[:12]}... vs {ref.teacher_sha256[:12]}...); recompute it with this "
                           "teacher")
        d = divergences(ref, s)
        forms = score_forms(ref, s)
        entries.append({"name": s.name, "source": s.source, "mode": s.mode, "images": s.count,
                        "batch_size": s.batch_size, "scores": d["scores"], "per_layer": d["per_layer"],
                        "forms": forms, "verdict": verdict(forms[PREDICTOR])})
    entries.sort(key=lambda e: e["scores"][HEADLINE])
    predicted = predicted_ranks({e["name"]: e["forms"][PREDICTOR] for e in entries})
    for rank, e in enumerate(entries, 1):
        e["rank"] = rank
        e["predicted_rank"] = predicted[e["name"]]
    all_sigs = [ref] + list(signatures)
    return {
        "teacher": teacher.to_dict(),
        "headline": HEADLINE,
        "divergences": DIVERGENCES,
        "predictor": {"form": PREDICTOR, "definition": SCORE_FORMS[PREDICTOR], "close_below": VERDICT_CLOSE,
                      "far_from": VERDICT_FAR, "evidence": "bench/results/calibration_quality.md"},
        "layers": ref.layers,
        "datasets": entries,
        "matrix": {"names": ["teacher (running)"] + names, "metric": "symmetric",
                   "values": similarity_matrix(all_sigs)},
    }


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: ranked scores, the per-layer headline profile, the dataset matrix."""
    from ..charts import markdown_table

    teacher = report["teacher"]
    h = report["headline"]
    pred = report["predictor"]
    lines = [
        "# Dataset similarity to the teacher's training data",
        "",
        f"Teacher: `{teacher.get('spec', '?')}` (weights sha256 `{str(teacher.get('weights_sha256', ''))[:16]}...`). "
        f"Statistics at the input of {len(report['layers'])} BatchNorm layers. Lower is closer; ranked by "
        f"**{h}** = {DIVERGENCES[h]}, averaged over layers.",
        "",
        markdown_table(
            ["rank", "dataset", "source", "images", "mode", "bns (headline)", "reverse", "symmetric", "l2"],
            [[e["rank"], e["name"], e["source"], e["images"], e["mode"], e["scores"]["bns"], e["scores"]["reverse"],
              e["scores"]["symmetric"], e["scores"]["l2"]] for e in report["datasets"]],
            align="rllrlrrrr"),
        "",
        "## As a calibration set",
        "",
        f"Predicted rank by **{pred['form']}** = {pred['definition']} (the form that best predicted the top-1 of "
        f"low-bit students in `{pred['evidence']}`). Verdict: *{VERDICTS[0]}* below {pred['close_below']:g}, "
        f"*{VERDICTS[2]}* from {pred['far_from']:g}, *{VERDICTS[1]}* between.",
        "",
        markdown_table(["predicted rank", "dataset", pred["form"], "verdict"],
                       [[e["predicted_rank"], e["name"], e["forms"][pred["form"]], e["verdict"]]
                        for e in sorted(report["datasets"], key=lambda e: e["predicted_rank"])], align="rlrl"),
        "",
        f"## Per-layer {h} divergence",
        "",
        markdown_table(["layer"] + [e["name"] for e in report["datasets"]],
                       [[layer] + [e["per_layer"][h][i] for e in report["datasets"]]
                        for i, layer in enumerate(report["layers"])]),
        "",
        "## Dataset to dataset (symmetric KL, mean over channels and layers)",
        "",
        markdown_table([""] + report["matrix"]["names"],
                       [[n] + row for n, row in zip(report["matrix"]["names"], report["matrix"]["values"])]),
        "",
        "Divergences: " + "; ".join(f"`{k}`: {v}" for k, v in DIVERGENCES.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def report_chart(report: Mapping[str, Any], kind: str | None = None):
    """The predictor score per dataset (bars, log scale, verdict thresholds drawn as lines, datasets labelled with
    their predicted rank and verdict) above the per-layer divergence profile (one line per dataset), as one image."""
    from PIL import Image, ImageDraw

    from ..charts import bar_chart, line_chart

    kind = kind or report["headline"]
    pred = report["predictor"]
    form = pred["form"]
    short = {VERDICTS[0]: "close", VERDICTS[1]: "usable", VERDICTS[2]: "far"}
    ordered = sorted(report["datasets"], key=lambda e: e["predicted_rank"])
    values = [e["forms"][form] for e in ordered]
    finite = [v for v in values if v == v and 0 < v < float("inf")]
    lo = min(finite + [pred["close_below"]]) / 3
    hi = max(finite + [pred["far_from"]]) * 3
    bars, axes = bar_chart({f"{form}; green line: close below {pred['close_below']:g}; red: far from "
                            f"{pred['far_from']:g}": values},
                           [f"#{e['predicted_rank']} {e['name']} ({short.get(e['verdict'], e['verdict'])})"
                            for e in ordered],
                           title="Predicted rank as a calibration set",
                           y_label=f"{form} (nats)", log_y=True, y_min=lo, y_max=hi, slot_px=90)
    draw = ImageDraw.Draw(bars)
    for value, color in ((pred["close_below"], (40, 150, 40)), (pred["far_from"], (200, 40, 40))):
        y = round(axes.y_px(value))
        for x in range(axes.left, axes.right, 12):
            draw.line([(x, y), (min(x + 6, axes.right), y)], fill=color, width=2)
    series = {f"#{e['predicted_rank']} {e['name']} ({e['scores'][kind]:.3g}, {short.get(e['verdict'])})":
              e["per_layer"][kind] for e in ordered}
    profile, _ = line_chart(series, report["layers"],
                            title=f"Per-layer {kind} divergence to the teacher's BN statistics",
                            y_label=f"{kind} (nats, mean over channels)" if kind != "l2" else "l2",
                            x_label="BatchNorm layer (input), in depth order", log_y=True)
    img = Image.new("RGB", (max(bars.width, profile.width), bars.height + profile.height), "white")
    img.paste(bars, (0, 0))
    img.paste(profile, (0, bars.height))
    return img


def write_report(report: Mapping[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """Write ``similarity.json``, ``similarity.md`` and ``similarity.png`` into ``out`` (created if needed)."""
    from ..charts import save_png

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZkdError(f"cannot create output folder {out} ({e.strerror}); pass a writable --out") from None
    paths = {"json": out / "similarity.json", "markdown": out / "similarity.md", "chart": out / "similarity.png"}
    atomic_write_json(paths["json"], report)
    atomic_write_bytes(paths["markdown"], report_markdown(report).encode())
    save_png(report_chart(report), paths["chart"])
    return paths
