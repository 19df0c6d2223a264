"""Inception scheme (logit maximization, "Inceptionism"): minimize CE to the target class plus image priors.

No BatchNorm term, so it also works for teachers without BatchNorm. Priors (TV-L2, L2), jitter and flips follow
DeepInversion's defaults, which regularize the same way.
"""

from .base import Method

METHOD = Method(
    name="inception",
    summary="maximize the target logit (CE) with TV/L2 priors, jitter and flips",
    defaults={"ce_weight": 1.0, "tv_l2": 1e-4, "l2": 1e-5, "flip": True},
)
