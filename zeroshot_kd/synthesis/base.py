"""What a synthesis method is: a name, its default hyper-parameters and its BatchNorm term.

Every method shares one loss with weighted terms (the weights are hyper-parameters, 0 switches a term off):

    L = ce_weight * CE(teacher(aug(x)), y) + bn_weight * R_bn + tv_l1 * TV_l1 + tv_l2 * TV_l2 + l2 * L2
        + adi_scale * (1 - JS(student || teacher))

and differs in the defaults and in the form of R_bn (none, BNS-KL, or DeepInversion's L2 norms). The method
modules (gaussian, inception, bns, deepinversion, adi) each define one :class:`Method`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..bn import BNStats

__all__ = ["COMMON_DEFAULTS", "Method"]

# Hyper-parameters every method has; a method overrides what it needs. Values follow NVlabs/DeepInversion's
# ImageNet script (imagenet_inversion.py + README) unless a method says otherwise.
COMMON_DEFAULTS: dict[str, Any] = {
    "iterations": 2000,
    "lr": 0.25,
    "betas": (0.5, 0.9),
    "warmup": 100,
    "bn_weight": 0.0,
    "first_bn_multiplier": 1.0,
    "ce_weight": 0.0,
    "tv_l1": 0.0,
    "tv_l2": 0.0,
    "l2": 0.0,
    "adi_scale": 0.0,
    "adi_temperature": 3.0,
    "adi_js": "textbook",
    "jitter": None,  # None: 30 px at 224 px, scaled with the resolution (4 px at 28 px)
    "flip": False,
    "clip": True,
    "multires_iterations": 0,
}


@dataclass(frozen=True)
class Method:
    """A synthesis method.

    Attributes:
        name: the ``--method`` value.
        summary: one line for ``--help``.
        defaults: hyper-parameters that differ from :data:`COMMON_DEFAULTS`.
        bn_loss: the BatchNorm term ``f(stats, first_bn_multiplier) -> scalar``, or None.
        optimize: False for methods that draw inputs without optimizing them (gaussian).
        needs_student: True when the loss needs a ``student`` model (adi).
    """

    name: str
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    bn_loss: Callable[[BNStats, float], torch.Tensor] | None = None
    optimize: bool = True
    needs_student: bool = False

    def hyperparameters(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The full hyper-parameter set: common defaults, then this method's, then the non-None overrides."""
        hp = {**COMMON_DEFAULTS, **self.defaults}
        for k, v in (overrides or {}).items():
            if k not in hp:
                raise KeyError(k)
            if v is not None:
                hp[k] = v
        return hp
