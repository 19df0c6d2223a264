"""Gaussian scheme (The Knowledge Within, Haroush et al. 2020): x ~ N(0, 1) in normalized space, no optimization.

Images are clamped to the valid pixel range and labelled with the teacher's argmax. When a student is fine-tuned on
such data its BatchNorm must stay in eval mode (frozen running statistics), or the statistics drift to the noise.
"""

from .base import Method

METHOD = Method(
    name="gaussian",
    summary="x ~ N(0,1) in normalized space, clamped; labels = teacher argmax; no optimization",
    defaults={"iterations": 0},
    optimize=False,
)
