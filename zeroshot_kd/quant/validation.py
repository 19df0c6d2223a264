"""The images and the score by which the calibration pipeline validates its own choices.

Two steps of ``zkd calibrate`` choose by a measurement: the default PTQ guard (which range set and pre-steps) and
the reconstruction check (keep the reconstructed student or the PTQ one). Both score a candidate student by the
logit KL to the FP32 teacher, ``KL(p_teacher || p_student)`` (batchmean, float32), on a *validation set* that
set no range, corrected no bias and trained no rounding:

* the **held-out quarter** of the calibration images (:func:`guard_split`), and
* a **BN probe**: ``probe_images`` images synthesized from the teacher alone against its BatchNorm statistics
  (BNS-KL, The Knowledge Within; :data:`PROBE_ITERATIONS` Adam steps from Gaussian noise, a seed of its own so it
  never equals a shard batch of the same seed).

Why the probe: the held-out quarter comes from the same source as the calibration images, so when those are far
from the teacher's training data (Gaussian noise, weak synthetic sets) the choice that fits them best is often the
worst on real data. Measured (``bench/results/lowbit-before-validation.md``): on every-layer W4A4 with Gaussian
calibration images the guard chose output-error ranges at 70.15% (ResNet14) and 27.60% (MobileNetV2) where naive
min/max gave 90.75 / 65.85; scored with 64 probe images it picks min/max (90.40 / 57.90). The teacher's BN
statistics are the one description of its training data that zkd always has, and images matched to them exercise
the activation ranges that real data exercises. The two parts are pooled (one KL over all validation images), so
neither source is trusted alone; teachers without BN layers get the held-out quarter only.

Both parts are only as good as their images: on weak calibration data (Gaussian noise, 50-step shards) the
held-out quarter and a 50-step probe ranked students wrongly where better images ranked them rightly
(``docs/lowbit-results.md``). ``--probe-iterations`` synthesizes a longer probe, and ``--validation-data``
replaces both parts by the user's images (:func:`make_validation` with ``source``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..bn import bn_layers
from ..runtime import autocast, batch_seed
from .ranges import logit_kl

__all__ = ["PROBE_ITERATIONS", "Validation", "bn_probe", "guard_split", "make_validation"]

#: Adam steps of the BN probe: the shipped teachers' probe KLs ranked the guard's candidates the same at 20 and
#: 50 steps; 50 is a few seconds for 64 images of a small teacher on one CPU core.
PROBE_ITERATIONS = 50


def guard_split(n: int) -> int:
    """Images of an ``n``-image calibration set held out for validation: the last quarter (none below 8)."""
    return n // 4 if n >= 8 else 0


def bn_probe(teacher: Any, num_images: int, seed: int, device: torch.device,
             iterations: int = PROBE_ITERATIONS) -> torch.Tensor | None:
    """``num_images`` images matched to ``teacher``'s BN statistics (one BNS batch of ``iterations`` Adam steps), or
    None without BN layers.

    Deterministic in ``seed`` (the synthesis engine's per-batch generator, salted so that the probe is not batch
    0 of a shard set synthesized with the same seed).
    """
    from ..synthesis import SynthesisConfig, get_method, optimize_batch

    if num_images <= 0 or not bn_layers(teacher.model):
        return None
    method = get_method("bns")
    hp = method.hyperparameters({"iterations": iterations})
    cfg = SynthesisConfig("bns", num_images, num_images, batch_seed(seed, 0, "validation-probe"), "balanced", hp)
    return optimize_batch(teacher.model, teacher.spec, method, cfg, 0, device).images


@dataclass
class Validation:
    """Validation images (held-out calibration images, then the probe) and the teacher's logits on them."""

    batches: list[torch.Tensor]
    ref_logits: list[torch.Tensor]
    held_images: int
    probe_images: int
    held_out: bool = True  # False: fewer than 8 calibration images, the "held" part is the calibration set
    source: str | None = None  # the --validation-data source, when the images are the user's, not held out
    probe_iterations: int = PROBE_ITERATIONS

    @torch.no_grad()
    def score(self, model: nn.Module, device: torch.device, precision: str = "fp32") -> float:
        """``KL(p_teacher || p_model)`` over every validation image (batchmean, float32)."""
        return logit_kl(model, self.batches, self.ref_logits, device, precision)

    def describe(self) -> dict[str, Any]:
        if self.source is not None:
            images = f"{self.held_images} images of --validation-data {self.source}"
        else:
            images = (f"{self.held_images} {'held-out' if self.held_out else 'calibration'} + {self.probe_images} "
                      "BN-probe images")
        return {"held_out_images": self.held_images, "probe_images": self.probe_images,
                "kl_split": ("validation data" if self.source is not None else "held-out" if self.held_out
                             else "calibration (fewer than 8 images: no split)"),
                "probe": f"BNS-KL, {self.probe_iterations} steps" if self.probe_images else None,
                "validation_data": self.source, "images": images, "reference": "FP32 teacher"}


@torch.no_grad()
def make_validation(teacher: Any, held: torch.Tensor, probe: torch.Tensor | None, device: torch.device,
                    precision: str = "fp32", held_out: bool = True, batch_size: int = 128,
                    source: str | None = None, probe_iterations: int = PROBE_ITERATIONS) -> Validation:
    """The validation set of ``held`` (held-out calibration images, or the ``source`` images) and ``probe`` (may be
    None)."""
    x = held if probe is None else torch.cat([held, probe.to(held.dtype)])
    batches = [x[i:i + batch_size] for i in range(0, x.shape[0], batch_size)]
    refs = []
    for b in batches:
        with autocast(device, precision):
            refs.append(teacher.model(b.to(device)).float())
    return Validation(batches, refs, int(held.shape[0]), 0 if probe is None else int(probe.shape[0]), held_out,
                      source, probe_iterations)
