"""The similarity report: ranked scores, per-layer profile and dataset matrix, as JSON, Markdown and a chart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ZkdError
from ..io import atomic_write_bytes, atomic_write_json
from ..teachers import Teacher
from .divergence import DIVERGENCES, HEADLINE, divergences, similarity_matrix
from .signature import Signature, teacher_signature

__all__ = ["report_chart", "report_markdown", "similarity_report", "write_report"]


def similarity_report(teacher: Teacher, signatures: Sequence[Signature]) -> dict[str, Any]:
    """Scores of every signature against the teacher, ranked (closest first), and the pairwise matrix.

    Returns:
        A JSON-ready dict: ``teacher``, ``headline``, ``divergences`` (definitions), ``layers``, ``datasets``
        (ranked, each with ``scores`` and ``per_layer``) and ``matrix`` (``names`` incl. the teacher's running
        statistics first, ``values`` = symmetric KL).
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
        entries.append({"name": s.name, "source": s.source, "mode": s.mode, "images": s.count,
                        "batch_size": s.batch_size, "scores": d["scores"], "per_layer": d["per_layer"]})
    entries.sort(key=lambda e: e["scores"][HEADLINE])
    for rank, e in enumerate(entries, 1):
        e["rank"] = rank
    all_sigs = [ref] + list(signatures)
    return {
        "teacher": teacher.to_dict(),
        "headline": HEADLINE,
        "divergences": DIVERGENCES,
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
    """Per-layer divergence profile, one line per dataset (log scale), as a Pillow image."""
    from ..charts import line_chart

    kind = kind or report["headline"]
    series = {f"{e['name']} ({e['scores'][kind]:.3g})": e["per_layer"][kind] for e in report["datasets"]}
    img, _ = line_chart(series, report["layers"], title=f"Per-layer {kind} divergence to the teacher's BN statistics",
                        y_label=f"{kind} (nats, mean over channels)" if kind != "l2" else "l2",
                        x_label="BatchNorm layer (input), in depth order", log_y=True)
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
