"""From a signature to a prediction: score forms, the predicted rank of a dataset as calibration set, a verdict.

``bench/bench_calibration_quality.py`` calibrates low-bit students on a ladder of calibration sets (real, each
synthesis method at two budgets, real/noise mixtures, shifted real) and correlates every form of
:data:`SCORE_FORMS` with the students' top-1. The constants below are what that benchmark found
(``bench/results/calibration_quality.md``); the reasons are in ``docs/similarity.md``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .divergence import divergences
from .signature import Signature

__all__ = ["PREDICTOR", "SCORE_FORMS", "VERDICTS", "VERDICT_CLOSE", "VERDICT_FAR", "derive_verdict_thresholds",
           "predicted_ranks", "score_forms", "verdict"]

# Fraction of the BN layers (the deepest ones) that "last-layers-only" forms average over.
LAST_FRACTION = 1 / 3

SCORE_FORMS: dict[str, str] = {
    "bns": "KL(teacher || data), mean over channels, then over layers (The Knowledge Within)",
    "reverse": "KL(data || teacher), mean over channels, then over layers",
    "symmetric": "(bns + reverse) / 2",
    "l2": "||mu_data - mu_teacher|| + ||var_data - var_teacher|| per layer, mean over layers (DeepInversion)",
    "bns-channels": "bns per layer weighted by the layer's channel count (every channel counts the same)",
    "bns-depth": "bns per layer weighted by depth (layer i of L gets weight i / sum), deep layers count more",
    "bns-first": "bns of the first third of the layers (near the input, where all-layer quantization starts)",
    "bns-last": "bns of the last third of the layers (near the logits)",
    "bns-max": "bns of the worst layer (the bottleneck)",
    "symmetric-max": "symmetric of the worst layer",
}

# The form that ranks calibration sets: the plain BNS divergence (The Knowledge Within's form, also the report's
# headline). In bench/results/calibration_quality.md (13 sets of 256 images per teacher, 128-image students, 3
# seeds, W3A3 and every-layer W4A4 with the default PTQ) it has the best worst case of the Spearman correlation
# with top-1 over the cells whose seed noise allows a correlation of 0.8 at all (worst -0.82), and it is at or below
# -0.80 in every cell of both teachers. The partial forms (first or last third of the layers, the worst layer)
# looked better on smaller, noisier runs (64-image students, 1-2 seeds) and lost their lead once the noise was
# averaged out: the whole network's statistics decide how ranges fit, not one part of it.
PREDICTOR = "bns"
# Verdict thresholds on the PREDICTOR score (nats), from the same benchmark by derive_verdict_thresholds: below
# VERDICT_CLOSE every set lost at most 3 points of top-1 (mean of both settings) against real training images on
# each teacher (real images sit at 0.0005-0.0013, the finite-sample floor of 256 images); from VERDICT_FAR on, the
# threshold that misclassifies the fewest sets as losing 5 points or more. Between them: usable, with a loss that
# depends on the teacher. Both rounded to two significant digits.
VERDICT_CLOSE = 0.035
VERDICT_FAR = 0.21
VERDICTS = ("close to the training data", "usable", "far")


def _weighted(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total


def score_forms(ref: Signature, data: Signature) -> dict[str, float]:
    """Every form of :data:`SCORE_FORMS` for ``data`` against ``ref`` (usually the teacher's running statistics).

    Per-batch statistics are not a separate form here: they are a signature taken with ``per_batch=True`` at the
    calibration batch size, scored by the same forms.
    """
    d = divergences(ref, data)
    per = d["per_layer"]
    n = len(ref.layers)
    k = max(1, math.ceil(n * LAST_FRACTION))
    bns = per["bns"]
    return {
        "bns": d["scores"]["bns"],
        "reverse": d["scores"]["reverse"],
        "symmetric": d["scores"]["symmetric"],
        "l2": d["scores"]["l2"],
        "bns-channels": _weighted(bns, ref.channels),
        "bns-depth": _weighted(bns, list(range(1, n + 1))),
        "bns-first": sum(bns[:k]) / k,
        "bns-last": sum(bns[-k:]) / k,
        "bns-max": max(bns),
        "symmetric-max": max(per["symmetric"]),
    }


def verdict(score: float, close: float = VERDICT_CLOSE, far: float = VERDICT_FAR) -> str:
    """Plain verdict for a :data:`PREDICTOR` score: ``close`` below ``close``, ``far`` from ``far`` on, else usable.

    NaN or infinite scores (statistics that overflow) are ``far``.
    """
    if not math.isfinite(score) or score >= far:
        return VERDICTS[2]
    if score < close:
        return VERDICTS[0]
    return VERDICTS[1]


def derive_verdict_thresholds(teachers: Sequence[Sequence[tuple[float, float]]], close_loss: float = 3.0,
                              far_loss: float = 5.0) -> tuple[float, float]:
    """Verdict thresholds from a benchmark: per teacher, ``(score, loss)`` of each calibration set, ``loss`` = top-1
    points lost against real training data.

    * ``close``: per teacher, the sets sorted by score; the longest prefix whose losses are all <= ``close_loss``
      ends between two scores, and the threshold sits at their geometric mean (at the lowest score when even the
      first set lost more; above every score when none did); the lowest over teachers (close must hold on each).
    * ``far``: among thresholds above ``close`` (geometric means of consecutive scores, and one above all), the
      one that misclassifies the fewest sets of all teachers as far (``score >= far``) vs. lost ``>= far_loss``;
      ties: the highest (fewer sets called far).
    """
    closes = []
    for sets in teachers:
        pts = sorted((sc, loss) for sc, loss in sets if math.isfinite(sc))
        if not pts:
            continue
        i = 0
        while i < len(pts) and pts[i][1] <= close_loss:
            i += 1
        if i == 0:
            closes.append(pts[0][0])
        elif i == len(pts):
            closes.append(pts[-1][0] * 2)
        else:
            closes.append(math.sqrt(pts[i - 1][0] * pts[i][0]))
    close = min(closes) if closes else math.nan
    every = [(sc, loss) for sets in teachers for sc, loss in sets]
    finite = sorted({sc for sc, _ in every if math.isfinite(sc) and sc > 0})
    cands = [math.sqrt(a * b) for a, b in zip(finite, finite[1:])] + ([finite[-1] * 2] if finite else [])
    cands = [t for t in cands if t > close] or [max(finite[-1] * 2, close * 2) if finite else math.nan]

    def errors(t: float) -> int:
        return sum((not math.isfinite(sc) or sc >= t) != (loss >= far_loss) for sc, loss in every)

    far = min(cands, key=lambda t: (errors(t), -t))
    return close, far


def predicted_ranks(scores: Mapping[str, float]) -> dict[str, int]:
    """Predicted rank as calibration set (1 = expected to give the most accurate student): lowest score first.

    Equal scores share the better rank ("competition" ranking: 1, 2, 2, 4); NaN scores come last.
    """
    def key(v: float) -> float:
        return v if v == v else math.inf

    out: dict[str, int] = {}
    ordered = sorted(scores, key=lambda n: key(scores[n]))
    for i, name in enumerate(ordered):
        prev = ordered[i - 1] if i else None
        same = prev is not None and key(scores[prev]) == key(scores[name])
        out[name] = out[prev] if same else i + 1  # type: ignore[index]
    return out


def form_table(ref: Signature, signatures: Sequence[Signature]) -> dict[str, dict[str, float]]:
    """``{dataset name: score_forms(...)}`` for several signatures against one reference."""
    return {s.name: score_forms(ref, s) for s in signatures}


def summarize_predictor(values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready record of the predictor settings (kept in every similarity report)."""
    return {"form": PREDICTOR, "definition": SCORE_FORMS[PREDICTOR], "close_below": VERDICT_CLOSE,
            "far_from": VERDICT_FAR, **values}
