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

The guard keeps the candidate of lowest KL. The checks compare two students, the one before a step and the one
after it, image by image (:meth:`Validation.compare`), and keep the step unless it raised the KL by more than
:data:`CHECK_TOLERANCE` standard errors of the per-image difference: 64 probe images are a noisy yardstick, and a
step that lowered the calibration loss is more often right than not when the validation images cannot tell.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..bn import bn_layers
from ..io import atomic_torch_save
from ..runtime import autocast, batch_seed
from ..version import __version__
from ..similarity.predict import VERDICTS
from .ranges import logit_kl, logit_kl_per_image

__all__ = ["CHECK_TOLERANCE", "PROBE_ITERATIONS", "VALIDATION_KINDS", "Comparison", "Validation", "bn_probe",
           "clear_probe_cache", "guard_split", "make_validation", "probe_cache_dir", "validation_kind"]

#: Adam steps of the BN probe: on the low-bit grid a 500-step probe ranked the guard's candidates and the
#: reconstruction check as real images did, a 50- or 200-step one did not (module docstring). 500 passes of one
#: 64-image batch: about 20 s for a 28-px teacher on one CPU core, seconds on a GPU, tens of minutes for a
#: ResNet-50 at 224 px on a CPU.
PROBE_ITERATIONS = 500


#: The checks' tolerance in paired standard errors (:class:`Comparison`). Measured on the low-bit grid's 35 cells
#: (``bench/results/check.md``): mean top-1 of the kept students 85.43 at 0 (any rise rejects), 85.70 at 1.5 and 2,
#: 85.19 at 3, 84.32 when always reconstructing; the better of the two students averages 85.99.
CHECK_TOLERANCE = 2.0

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
    """Forget every BN probe cached in this process (not the files of :func:`probe_cache_dir`)."""
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
    # The probe is a function of the weights, the input spec and these arguments: it is computed once and kept in
    # the process and on disk (probe_cache_dir), so calibrating several bit widths of one teacher pays for it once.
    # Hand-made Teachers without a weights hash are never cached.
    key = (teacher.weights_sha256, repr(teacher.spec), num_images, seed, iterations, str(device))
    if teacher.weights_sha256 and key in _PROBES:
        return _PROBES[key].clone()
    disk = _probe_file(key) if teacher.weights_sha256 else None
    cached = _read_probe(disk, key)
    if cached is not None:
        _remember(key, cached)
        return cached
    method = get_method("bns")
    hp = method.hyperparameters({"iterations": iterations})
    cfg = SynthesisConfig("bns", num_images, num_images, batch_seed(seed, 0, "validation-probe"), "balanced", hp)
    with tqdm(total=iterations, desc="BN probe", unit="step", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        images = optimize_batch(teacher.model, teacher.spec, method, cfg, 0, device,
                                on_iteration=lambda it, losses: bar.update(1)).images
    if teacher.weights_sha256:
        _remember(key, images)
    if disk is not None:
        try:
            disk.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"key": repr(key), "images": images.cpu()}, disk)
        except OSError:  # a read-only or full cache directory costs the next run the synthesis, nothing else
            pass
    return images


def _remember(key: tuple, images: torch.Tensor) -> None:
    while len(_PROBES) >= _PROBE_CACHE_SIZE:
        _PROBES.pop(next(iter(_PROBES)))
    _PROBES[key] = images.clone()


def probe_cache_dir() -> Path | None:
    """Where BN probes are kept between runs: ``$ZKD_CACHE_DIR/probes`` (default ``$XDG_CACHE_HOME/zkd/probes``, else
    ``~/.cache/zkd/probes``); ``ZKD_CACHE_DIR=off`` keeps none. Why: for a large teacher on a CPU the probe costs
    minutes to tens of minutes, and users calibrate one teacher at several bit widths in separate runs."""
    root = os.environ.get("ZKD_CACHE_DIR")
    if root is not None and root.strip().lower() in ("off", "0", "none", ""):
        return None
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zkd"
    return base / "probes"


def _probe_file(key: tuple) -> Path | None:
    """The file of one probe: named by a hash of its key, which also names the zkd and torch versions (a probe
    depends on BNS-KL's defaults and on the kernels)."""
    root = probe_cache_dir()
    if root is None:
        return None
    full = repr((key, __version__, torch.__version__))
    return root / (hashlib.sha256(full.encode()).hexdigest()[:32] + ".pt")


def _read_probe(path: Path | None, key: tuple) -> torch.Tensor | None:
    """The cached probe at ``path`` if it is one for ``key``; None when absent, unreadable or another key's."""
    if path is None or not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, never an error
        return None
    if not isinstance(blob, dict) or blob.get("key") != repr(key) or not isinstance(blob.get("images"), torch.Tensor):
        return None
    images = blob["images"]
    return images if images.shape[0] == key[2] else None


@dataclass(frozen=True)
class Comparison:
    """A check's verdict on two students scored on the same validation images.

    ``kl_before`` / ``kl_after``: ``KL(p_teacher || p_student)`` (batchmean) of the student before and after a step
    (reconstruction, fine-tuning); ``se``: the standard error of the mean of the per-image differences
    ``KL_after(x) - KL_before(x)`` (paired: the same images score both). The step is kept unless its KL rises by
    more than ``tolerance`` standard errors: a step that fits the calibration images is the better student unless
    the validation images show otherwise beyond their own noise (64 probe images, or a held-out quarter).
    """

    kl_before: float
    kl_after: float
    se: float
    tolerance: float

    @property
    def kept(self) -> bool:
        return self.kl_after - self.kl_before <= self.tolerance * self.se

    def to_dict(self, keys: tuple[str, str], labels: tuple[str, str]) -> dict[str, Any]:
        """The report entry: the two KLs under ``keys`` (before, after), the SE, the tolerance, and ``kept``: the
        label (of ``labels``) of the student kept."""
        return {keys[0]: self.kl_before, keys[1]: self.kl_after, "se": self.se, "tolerance_se": self.tolerance,
                "kept": labels[1] if self.kept else labels[0]}


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

    @torch.no_grad()
    def compare(self, before: nn.Module, after: nn.Module, device: torch.device, precision: str = "fp32",
                tolerance: float = CHECK_TOLERANCE) -> Comparison:
        """Score ``before`` and ``after`` image by image and judge the step between them (:class:`Comparison`)."""
        kb = logit_kl_per_image(before, self.batches, self.ref_logits, device, precision).double()
        ka = logit_kl_per_image(after, self.batches, self.ref_logits, device, precision).double()
        d = ka - kb
        se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else 0.0
        return Comparison(float(kb.mean()), float(ka.mean()), se, tolerance)

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
