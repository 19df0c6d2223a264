"""The images and the score by which the calibration pipeline validates its own choices.

Three steps of ``zkd calibrate`` choose by a measurement: the default PTQ guard (which range set and pre-steps),
the reconstruction check (keep the reconstructed student or the PTQ one) and the fine-tuning check. Each scores a
candidate student by the logit KL to the FP32 teacher, ``KL(p_teacher || p_student)`` (batchmean, float32), on a
*validation set* that set no range, corrected no bias and trained no rounding (``--validation``):

* ``--validation-data``: the user's images (a few real ones, or a shard set synthesized at full length);
* ``held-out``: the last quarter of the calibration images (:func:`guard_split`); the rest fit;
* ``probe``: ``probe_images`` images synthesized from the teacher alone against its BatchNorm statistics (BNS-KL,
  The Knowledge Within; :data:`PROBE_ITERATIONS` Adam steps from Gaussian noise, a seed of its own so it never
  equals a shard batch of the same seed); every calibration image fits;
* ``auto`` (the default): ``held-out`` when the calibration images are close to the teacher's training data by
  its BN statistics (``zkd similarity``'s verdict, :func:`~zeroshot_kd.quant.pipeline.calibration_fit`), else
  ``probe``. Teachers without BN layers, and ``--probe-images 0``, get ``held-out``.

Why: images close to the training data (real images, full-length DeepInversion shards) are the best yardstick
there is, and a probe costs 500 teacher passes; but the held-out quarter of weak images (Gaussian noise, 50-step
shards) makes the choices that fit weak images, and so does a short probe, which is weak data itself. Measured
(``docs/lowbit-results.md``, "Validation images"): on the low-bit grid's weak cells the 500-step probe alone picked
students averaging 79.5% (MobileNetV2) where the held-out quarter pooled with a 50-step probe picked 74.1%; on
1024 1000-step deepinversion images (close) the held-out quarter gave 90.15% after fine-tuning where the probe
gave 89.10 / 89.78 (two seeds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..bn import bn_layers
from ..runtime import autocast, batch_seed
from ..similarity.predict import VERDICTS
from .ranges import logit_kl

__all__ = ["PROBE_ITERATIONS", "VALIDATION_KINDS", "Validation", "bn_probe", "clear_probe_cache", "guard_split",
           "make_validation", "validation_kind"]

#: Adam steps of the BN probe: on the low-bit grid a 500-step probe ranked the guard's candidates and the
#: reconstruction check as real images did, a 50- or 200-step one did not (module docstring). 500 passes of one
#: 64-image batch: about 20 s for a 28-px teacher on one CPU core, seconds on a GPU, tens of minutes for a
#: ResNet-50 at 224 px on a CPU.
PROBE_ITERATIONS = 500


_PROBE_CACHE_SIZE = 8
_PROBES: dict[tuple, torch.Tensor] = {}  # bn_probe's per-process cache, oldest entry dropped first


#: ``--validation`` choices (``auto`` picks one of the other two by the calibration images' BN-statistics verdict)
VALIDATION_KINDS = ("auto", "held-out", "probe")
CLOSE_VERDICT = VERDICTS[0]


def validation_kind(choice: str, verdict: str, probe_images: int) -> str:
    """``held-out`` or ``probe``: what ``--validation choice`` means for calibration images of ``verdict``
    (:func:`zeroshot_kd.similarity.verdict`). ``auto`` trusts the calibration images' own held-out quarter only when
    they are close to the teacher's training data; ``--probe-images 0`` always means the held-out quarter."""
    if probe_images <= 0 or choice == "held-out":
        return "held-out"
    if choice == "probe":
        return "probe"
    return "held-out" if verdict == CLOSE_VERDICT else "probe"


def clear_probe_cache() -> None:
    """Forget every cached BN probe (benchmarks that time each calibration as a standalone run call this)."""
    _PROBES.clear()


def guard_split(n: int) -> int:
    """Images of an ``n``-image calibration set held out for validation: the last quarter (none below 8)."""
    return n // 4 if n >= 8 else 0


def bn_probe(teacher: Any, num_images: int, seed: int, device: torch.device,
             iterations: int = PROBE_ITERATIONS, progress: bool = False) -> torch.Tensor | None:
    """``num_images`` images matched to ``teacher``'s BN statistics (one BNS batch of ``iterations`` Adam steps), or
    None without BN layers.

    Deterministic in ``seed`` (the synthesis engine's per-batch generator, salted so that the probe is not batch
    0 of a shard set synthesized with the same seed). ``progress`` shows a bar of the steps: for a large teacher
    on a CPU the probe takes minutes.
    """
    from tqdm import tqdm

    from ..synthesis import SynthesisConfig, get_method, optimize_batch

    if num_images <= 0 or not bn_layers(teacher.model):
        return None
    device = torch.device(device)
    # The probe is a function of the weights, the input spec and these arguments: one process computes it once
    # (calibrating several bit widths of one teacher from Python pays for it once). Hand-made Teachers without a
    # weights hash are never cached.
    key = (teacher.weights_sha256, repr(teacher.spec), num_images, seed, iterations, str(device))
    if teacher.weights_sha256 and key in _PROBES:
        return _PROBES[key].clone()
    method = get_method("bns")
    hp = method.hyperparameters({"iterations": iterations})
    cfg = SynthesisConfig("bns", num_images, num_images, batch_seed(seed, 0, "validation-probe"), "balanced", hp)
    with tqdm(total=iterations, desc="BN probe", unit="step", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        images = optimize_batch(teacher.model, teacher.spec, method, cfg, 0, device,
                                on_iteration=lambda it, losses: bar.update(1)).images
    if teacher.weights_sha256:
        while len(_PROBES) >= _PROBE_CACHE_SIZE:
            _PROBES.pop(next(iter(_PROBES)))
        _PROBES[key] = images.clone()
    return images


@dataclass
class Validation:
    """Validation images (one of the three sources in the module docstring) and the teacher's logits on them."""

    batches: list[torch.Tensor]
    ref_logits: list[torch.Tensor]
    kind: str  # "validation data", "probe", "held-out" or "calibration" (fewer than 8 images: no split)
    source: str | None = None  # the --validation-data source
    probe_iterations: int = PROBE_ITERATIONS
    verdict: str | None = None  # the calibration images' BN-statistics verdict that chose the kind (auto)

    @property
    def num_images(self) -> int:
        return sum(int(b.shape[0]) for b in self.batches)

    @torch.no_grad()
    def score(self, model: nn.Module, device: torch.device, precision: str = "fp32") -> float:
        """``KL(p_teacher || p_model)`` over every validation image (batchmean, float32)."""
        return logit_kl(model, self.batches, self.ref_logits, device, precision)

    def describe(self) -> dict[str, Any]:
        n = self.num_images
        images = {"validation data": f"{n} images of --validation-data {self.source}",
                  "probe": f"{n} BN-probe images, {self.probe_iterations} steps",
                  "held-out": f"{n} held-out calibration images",
                  "calibration": f"{n} calibration images (fewer than 8: none held out)"}[self.kind]
        if self.verdict is not None:
            images += f"; calibration images {self.verdict}"
        return {"validation_images": n, "validation": self.kind, "images": images,
                "probe": f"BNS-KL, {self.probe_iterations} steps" if self.kind == "probe" else None,
                "validation_data": self.source, "calibration_verdict": self.verdict, "reference": "FP32 teacher"}


@torch.no_grad()
def make_validation(teacher: Any, images: torch.Tensor, kind: str, device: torch.device, precision: str = "fp32",
                    batch_size: int = 128, source: str | None = None, probe_iterations: int = PROBE_ITERATIONS,
                    verdict: str | None = None) -> Validation:
    """The validation set of ``images`` with the teacher's logits on them; ``kind`` names where they come from."""
    batches = [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]
    refs = []
    for b in batches:
        with autocast(device, precision):
            refs.append(teacher.model(b.to(device)).float())
    return Validation(batches, refs, kind, source, probe_iterations, verdict)
