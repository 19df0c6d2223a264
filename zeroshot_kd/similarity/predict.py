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

__all__ = ["PREDICTOR", "SCORE_FORMS", "VERDICTS", "VERDICT_CLOSE", "VERDICT_FAR", "predicted_ranks", "score_forms",
           "verdict"]

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

# The form that ranks calibration sets. In bench/results/calibration_quality.md it ties with bns-max (-0.26 vs -0.27)
# for the best worst case over both teachers and both settings (W3A3, W4A4 all layers) of the Spearman correlation
# with the students' top-1 and is better in the other cells (and, as an average, less noisy than a maximum): what
# the deep layers (the class-specific features that decide the logits) see matters for calibration more than
# pixel-level statistics of the first layers, which noise, inverted or rotated images disturb most.
PREDICTOR = "bns-last"
# Verdict thresholds on the PREDICTOR score (nats), from the same benchmark (128-image sets): below
# VERDICT_CLOSE sit real training images (0.001-0.002, the finite-sample floor) and the sets whose students lost
# at most ~3 points of top-1 against real data on either teacher; from VERDICT_FAR on, the students lost 4 or more
# points (mean of both settings) on both teachers, the threshold that misclassifies the fewest sets as far / not
# far (a loss of 5 points or more counted as far). Between them: usable, with a loss that depends on the teacher.
VERDICT_CLOSE = 0.03
VERDICT_FAR = 0.5
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
