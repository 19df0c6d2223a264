"""Dataset similarity from a frozen teacher's BatchNorm statistics (The Knowledge Within, Haroush et al. 2020).

A trained teacher's BatchNorm layers hold the per-channel mean and variance of its training data at every
layer. Streaming another dataset through the same (frozen) teacher and measuring the same statistics gives a
**signature**: one Gaussian per channel per BN layer. Comparing signatures measures how close datasets are to
the unseen training data, and to each other, without touching the training data.

Statistics (conventions of :mod:`zeroshot_kd.bn`):

* taken at the **input** of every BatchNorm layer that tracks running statistics, per channel, pooled over
  images and spatial positions;
* ``exact`` mode (default): the mean and the biased variance over the *whole* dataset, accumulated in float64
  with Chan et al.'s parallel merge of (count, mean, M2), so the result does not depend on the batch size;
* ``per-batch`` mode: the average over batches of each batch's mean and biased variance, i.e. what the BNS
  loss sees during synthesis. Every full batch has the same weight; a last, partial batch is dropped when
  there is at least one full batch. The average batch variance is smaller than the dataset variance by the
  spread of the batch means, so the two modes are not interchangeable;
* the teacher's ``running_var`` was accumulated with the *unbiased* estimator; it is used as stored (the
  factor N/(N-1) is negligible at N*H*W in the thousands), and every variance gets the layer's ``eps`` added
  before a log or a division, as BatchNorm itself does.

Divergences of a dataset D from the teacher T, per layer (mean over the layer's channels), then averaged
over layers for the overall score:

============  ===========================================================================================
``bns``       **headline**: KL(N(mu_T, var_T) || N(mu_D, var_D)), the BNS form of The Knowledge Within
``reverse``   KL(N(mu_D, var_D) || N(mu_T, var_T))
``symmetric`` (bns + reverse) / 2
``l2``        DeepInversion's R_feature term: ||mu_D - mu_T||_2 + ||var_D - var_T||_2 over the layer's
              channels (first-layer multiplier 1, no eps)
============  ===========================================================================================

Dataset to dataset: the ``symmetric`` divergence between two signatures (mean over channels, then layers).

Signatures are saved as JSON or ``.pt`` together with the teacher's weights sha256
(:attr:`~zeroshot_kd.teachers.Teacher.weights_sha256`); loading them for another teacher is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .bn import bn_layers, gaussian_kl
from .capture import Capture
from .errors import ZkdError
from .io import atomic_torch_save, atomic_write_bytes, atomic_write_json, load_versioned
from .spec import InputSpec
from .teachers import Teacher

__all__ = [
    "DIVERGENCES",
    "HEADLINE",
    "TRANSFORMS",
    "MomentAccumulator",
    "Signature",
    "TransformedDataset",
    "compute_signature",
    "dataset_distance",
    "divergences",
    "load_signatures",
    "make_similarity_dataset",
    "parse_transforms",
    "save_signatures",
    "similarity_matrix",
    "similarity_report",
    "spearman",
    "teacher_signature",
    "write_report",
]

HEADLINE = "bns"
DIVERGENCES: dict[str, str] = {
    "bns": "KL(N(mu_teacher, var_teacher) || N(mu_data, var_data)), mean over channels (The Knowledge Within)",
    "reverse": "KL(N(mu_data, var_data) || N(mu_teacher, var_teacher)), mean over channels",
    "symmetric": "(bns + reverse) / 2, mean over channels",
    "l2": "||mu_data - mu_teacher||_2 + ||var_data - var_teacher||_2 over channels (DeepInversion R_feature)",
}
SIGNATURE_FORMAT = "zkd-bn-signature"
SIGNATURE_VERSION = 1
MODES = ("exact", "per-batch")
# Largest number of activation elements turned into float64 at once (bounds the extra memory to ~256 MiB).
_CHUNK_ELEMENTS = 1 << 25


def _no_bn_error() -> ZkdError:
    return ZkdError("similarity needs a teacher with BatchNorm layers that keep running statistics; this teacher has "
                    "none -- pass a teacher with BatchNorm (track_running_stats=True)")


class MomentAccumulator:
    """Exact per-channel count, mean and sum of squared deviations (M2) of a stream of tensors, in float64.

    Each update computes its chunk's mean and M2 in float64 (centred, so no cancellation) and merges it with
    Chan et al.'s pairwise formula; the result equals a one-shot computation on the concatenated data up to
    float64 rounding, whatever the chunking.

    Args:
        channels: number of channels (dimension 1 of the updates).
        device: where the float64 accumulators live (float64-less devices such as MPS should pass ``cpu``).
    """

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.channels = channels
        self.device = torch.device(device)
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=self.device)

    @staticmethod
    def moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count per channel, mean, M2) of ``x`` (N, C, *) in float64, over every dimension but 1."""
        if x.dim() < 2:
            raise ValueError(f"expected (N, C, ...) activations, got shape {tuple(x.shape)}")
        dims = [0] + list(range(2, x.dim()))
        xd = x.detach().to(torch.float64)
        n = x.numel() // x.shape[1]
        mean = xd.mean(dim=dims)
        m2 = (xd - mean.view(1, -1, *([1] * (x.dim() - 2)))).square_().sum(dim=dims)
        return n, mean, m2

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge the moments of another part of the stream (Chan, Golub and LeVeque 1979)."""
        if n == 0:
            return
        mean, m2 = mean.to(self.device, torch.float64), m2.to(self.device, torch.float64)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def update(self, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Add activations ``x`` (N, C, *); returns the moments of ``x`` alone (for per-batch statistics)."""
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {x.shape[1]}")
        per_item = max(1, x[0].numel())
        step = max(1, _CHUNK_ELEMENTS // per_item)
        part = MomentAccumulator(self.channels, x.device if x.device.type != "mps" else "cpu")
        for start in range(0, x.shape[0], step):
            chunk = x[start:start + step]
            if part.device != chunk.device:
                chunk = chunk.to(part.device)
            part.merge(*self.moments(chunk))
        self.merge(part.count, part.mean, part.m2)
        return part.count, part.mean, part.m2

    @property
    def var(self) -> torch.Tensor:
        """Biased (population) variance per channel."""
        if self.count == 0:
            raise ValueError("no data accumulated")
        return self.m2 / self.count


@dataclass
class Signature:
    """Per-layer, per-channel Gaussians (mean, variance) of a dataset inside one teacher.

    Attributes:
        name: the dataset's name in reports.
        layers: BN layer paths, in module order.
        mean, var: one float64 CPU tensor (C,) per layer; ``var`` is the biased variance (running_var for the
            teacher's own signature).
        eps: each layer's BatchNorm eps (added to variances before logs and divisions).
        teacher_sha256: ``Teacher.weights_sha256`` of the teacher the statistics were taken in.
        source: where the data came from (a ``--data`` string, a stats file, or ``running statistics``).
        mode: ``exact``, ``per-batch`` or ``running`` (the teacher's own BN buffers).
        count: images seen (0 for the teacher's running statistics).
        batch_size, num_batches: how the data was streamed (per-batch mode depends on them).
        teacher: provenance of the teacher (``Teacher.to_dict()``), kept in saved files.
    """

    name: str
    layers: list[str]
    mean: list[torch.Tensor]
    var: list[torch.Tensor]
    eps: list[float]
    teacher_sha256: str
    source: str = ""
    mode: str = "exact"
    count: int = 0
    batch_size: int | None = None
    num_batches: int = 0
    teacher: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> list[int]:
        return [int(m.numel()) for m in self.mean]

    def to_dict(self, tensors: bool = False) -> dict[str, Any]:
        """Serializable form: float lists (exact float64 round trip through JSON), or float64 tensors."""
        def conv(t: torch.Tensor) -> Any:
            return t.detach().to("cpu", torch.float64).clone() if tensors else t.double().tolist()

        return {
            "name": self.name, "source": self.source, "mode": self.mode, "count": self.count,
            "batch_size": self.batch_size, "num_batches": self.num_batches,
            "layers": [{"name": n, "channels": int(m.numel()), "eps": e, "mean": conv(m), "var": conv(v)}
                       for n, m, v, e in zip(self.layers, self.mean, self.var, self.eps)],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], teacher_sha256: str, teacher: dict[str, Any], where: str) -> "Signature":
        try:
            layers = d["layers"]
            mean = [torch.as_tensor(l["mean"], dtype=torch.float64).reshape(-1) for l in layers]
            var = [torch.as_tensor(l["var"], dtype=torch.float64).reshape(-1) for l in layers]
            sig = cls(str(d["name"]), [str(l["name"]) for l in layers], mean, var, [float(l["eps"]) for l in layers],
                      teacher_sha256, str(d.get("source", "")), str(d.get("mode", "exact")), int(d.get("count", 0)),
                      d.get("batch_size"), int(d.get("num_batches", 0)), dict(teacher))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ZkdError(f"stats file {where} is malformed ({type(e).__name__}: {e}); save it again with "
                           "'zkd similarity --save-stats'") from None
        if any(m.shape != v.shape for m, v in zip(sig.mean, sig.var)):
            raise ZkdError(f"stats file {where}: mean and var differ in size in signature {sig.name!r}; save it again")
        return sig


def teacher_signature(teacher: Teacher) -> Signature:
    """The teacher's own signature: its BN layers' running mean and (unbiased) running variance."""
    layers = bn_layers(teacher.model)
    if not layers:
        raise _no_bn_error()
    return Signature(
        "teacher", [n for n, _ in layers],
        [bn.running_mean.detach().to("cpu", torch.float64) for _, bn in layers],
        [bn.running_var.detach().to("cpu", torch.float64) for _, bn in layers],
        [float(bn.eps) for _, bn in layers], teacher.weights_sha256, "running statistics", "running", 0,
        teacher=teacher.to_dict(),
    )


def compute_signature(
    teacher: Teacher,
    dataset: Dataset,
    name: str,
    source: str = "",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    per_batch: bool = False,
    num_workers: int = 0,
    progress: bool | None = False,
) -> Signature:
    """Stream a dataset through the frozen teacher and accumulate the statistics at every BN layer's input.

    Args:
        teacher: the teacher (its model is run in eval mode under ``torch.no_grad``; nothing is modified).
        dataset: yields ``(normalized image (C, H, W), label)`` or bare images, in the teacher's input space.
        name: the dataset's name in reports.
        source: provenance string kept with the signature.
        batch_size: images per forward pass (the exact statistics do not depend on it).
        device: where the teacher's model is (default: the device of its first parameter or buffer).
        per_batch: average per-batch statistics (the BNS loss's view) instead of exact whole-dataset ones.
        num_workers: DataLoader worker processes.
        progress: show a tqdm bar on stderr (None: only on a terminal).

    Raises:
        ZkdError: the teacher has no BatchNorm, the dataset is empty, or its images do not fit the teacher.
    """
    from tqdm import tqdm

    layers = bn_layers(teacher.model)
    if not layers:
        raise _no_bn_error()
    try:
        n_items = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        n_items = None
    if n_items == 0:
        raise ZkdError(f"data {name!r} ({source or 'dataset'}) is empty; pass a source with at least one image")
    if batch_size < 1:
        raise ZkdError(f"batch size must be at least 1, got {batch_size}")
    if device is None:
        first = next(iter(list(teacher.model.parameters()) + list(teacher.model.buffers())), None)
        dev = first.device if first is not None else torch.device("cpu")
    else:
        dev = torch.device(device)
    acc_dev = dev if dev.type != "mps" else torch.device("cpu")
    model = teacher.model
    exact = {n: MomentAccumulator(bn.num_features, acc_dev) for n, bn in layers}
    full_sums = {n: [torch.zeros(bn.num_features, dtype=torch.float64, device=acc_dev) for _ in range(2)]
                 for n, bn in layers}  # per-batch means and variances, summed
    partial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    current: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def accumulate(address: str, x: torch.Tensor) -> None:
        layer = address[: -len("@in")]
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        n, mean, m2 = exact[layer].update(x)
        current[layer] = (mean, m2 / n)

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    capture = Capture(model, [f"{n}@in" for n, _ in layers], reduce=accumulate).open()
    was_training = model.training
    model.eval()
    count = batches = full_batches = 0
    try:
        disable = None if progress is None else not progress
        with torch.no_grad(), tqdm(total=n_items, desc=name, unit="img", disable=disable, leave=False,
                                   dynamic_ncols=True) as bar:
            for batch in loader:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != teacher.spec.shape:
                    shape = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else type(x).__name__
                    raise ZkdError(f"data {name!r} gives images of shape {shape}, but the teacher expects "
                                   f"{teacher.spec.shape}; use a source made for this teacher")
                current.clear()
                model(x.to(dev, non_blocking=True))
                count += x.shape[0]
                batches += 1
                if per_batch and x.shape[0] == batch_size:
                    for n, (m, v) in current.items():
                        full_sums[n][0] += m
                        full_sums[n][1] += v
                    full_batches += 1
                elif per_batch:  # the last, partial batch: used only when there is no full batch
                    partial = dict(current)
                bar.update(x.shape[0])
    finally:
        capture.close()
        model.train(was_training)
    if count == 0:
        raise ZkdError(f"data {name!r} ({source or 'dataset'}) is empty; pass a source with at least one image")
    missing = [n for n, _ in layers if exact[n].count == 0]
    if missing:
        raise ZkdError(f"BatchNorm layer(s) {', '.join(missing[:3])} never ran on data {name!r}; similarity needs a "
                       "teacher whose forward pass uses all its BatchNorm layers")
    names = [n for n, _ in layers]
    if per_batch and full_batches:
        means = [(full_sums[n][0] / full_batches).cpu() for n in names]
        variances = [(full_sums[n][1] / full_batches).cpu() for n in names]
    elif per_batch:
        full_batches = 1
        means = [partial[n][0].cpu() for n in names]
        variances = [partial[n][1].cpu() for n in names]
    else:
        means = [exact[n].mean.cpu() for n in names]
        variances = [exact[n].var.cpu() for n in names]
    return Signature(name, names, means, variances, [float(bn.eps) for _, bn in layers], teacher.weights_sha256,
                     source, "per-batch" if per_batch else "exact", count, batch_size,
                     full_batches if per_batch else batches, teacher.to_dict())


def check_compatible(a: Signature, b: Signature) -> None:
    """Refuse to compare signatures taken in different teachers (or different BN layouts)."""
    if a.teacher_sha256 != b.teacher_sha256:
        raise ZkdError(f"signatures {a.name!r} and {b.name!r} come from different teachers (weights sha256 "
                       f"{a.teacher_sha256[:12]}... vs {b.teacher_sha256[:12]}...); recompute both with the same "
                       "--teacher")
    if a.layers != b.layers or a.channels != b.channels:
        raise ZkdError(f"signatures {a.name!r} and {b.name!r} have different BatchNorm layers; recompute both with "
                       "the same --teacher")


def _layer_terms(ref: Signature, data: Signature, i: int) -> dict[str, float]:
    eps = ref.eps[i]
    mu_t, var_t, mu_d, var_d = ref.mean[i], ref.var[i], data.mean[i], data.var[i]
    fwd = gaussian_kl(mu_t, var_t + eps, mu_d, var_d + eps).mean().item()
    rev = gaussian_kl(mu_d, var_d + eps, mu_t, var_t + eps).mean().item()
    l2 = (torch.linalg.vector_norm(mu_d - mu_t) + torch.linalg.vector_norm(var_d - var_t)).item()
    return {"bns": fwd, "reverse": rev, "symmetric": 0.5 * (fwd + rev), "l2": l2}


def divergences(ref: Signature, data: Signature) -> dict[str, Any]:
    """Every divergence of :data:`DIVERGENCES` from ``ref`` (usually the teacher) to ``data``.

    Returns:
        ``{"scores": {kind: mean over layers}, "per_layer": {kind: [one value per layer]}}``.
    """
    check_compatible(ref, data)
    per_layer: dict[str, list[float]] = {k: [] for k in DIVERGENCES}
    for i in range(len(ref.layers)):
        for k, v in _layer_terms(ref, data, i).items():
            per_layer[k].append(v)
    scores = {k: sum(v) / len(v) for k, v in per_layer.items()}
    return {"scores": scores, "per_layer": per_layer}


def dataset_distance(a: Signature, b: Signature) -> float:
    """Symmetric KL between two signatures: mean over channels, then over layers (0 iff they are equal)."""
    check_compatible(a, b)
    total = 0.0
    for i in range(len(a.layers)):
        eps = a.eps[i]
        va, vb = a.var[i] + eps, b.var[i] + eps
        kl = gaussian_kl(a.mean[i], va, b.mean[i], vb) + gaussian_kl(b.mean[i], vb, a.mean[i], va)
        total += 0.5 * kl.mean().item()
    return total / len(a.layers)


def similarity_matrix(signatures: Sequence[Signature]) -> list[list[float]]:
    """Pairwise :func:`dataset_distance` of the signatures (symmetric, zero diagonal)."""
    n = len(signatures)
    out = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            out[i][j] = out[j][i] = dataset_distance(signatures[i], signatures[j])
    return out


# ---------------------------------------------------------------------------------------------- saving, loading


def save_signatures(path: str | os.PathLike, signatures: Sequence[Signature]) -> None:
    """Write signatures (all from one teacher) to ``.json`` or ``.pt``/``.pth``, atomically.

    The file records the teacher's weights sha256 and provenance; float64 values round-trip exactly in both.
    """
    if not signatures:
        raise ZkdError("no signatures to save; pass at least one --data")
    for s in signatures[1:]:
        check_compatible(signatures[0], s)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".pt", ".pth"):
        raise ZkdError(f"--save-stats {path}: use a .json or .pt file name")
    if not path.parent.is_dir():
        raise ZkdError(f"--save-stats {path}: folder {path.parent} does not exist; create it first")
    tensors = suffix != ".json"
    obj = {
        "format": SIGNATURE_FORMAT, "format_version": SIGNATURE_VERSION,
        "teacher_weights_sha256": signatures[0].teacher_sha256,
        "teacher": signatures[0].teacher,
        "signatures": [s.to_dict(tensors=tensors) for s in signatures],
    }
    if tensors:
        atomic_torch_save(obj, path)
    else:
        atomic_write_json(path, obj)


def load_signatures(path: str | os.PathLike, teacher: Teacher | None = None) -> list[Signature]:
    """Read signatures saved by :func:`save_signatures`; with ``teacher``, refuse those made in another teacher."""
    path = Path(path)
    if not path.is_file():
        raise ZkdError(f"stats file {path} does not exist; write one with 'zkd similarity --save-stats FILE'")
    raw = path.read_bytes()
    obj: Any
    if raw[:1] in (b"{", b"[") or path.suffix.lower() == ".json":
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ZkdError(f"stats file {path} is not valid JSON ({e}); save it again with --save-stats") from None
    else:
        obj = load_versioned(path, SIGNATURE_FORMAT, (SIGNATURE_VERSION,), "signature", "recompute it")
    if not isinstance(obj, dict) or obj.get("format") != SIGNATURE_FORMAT:
        raise ZkdError(f"{path} is not a zkd signature file; write one with 'zkd similarity --save-stats FILE'")
    if obj.get("format_version") != SIGNATURE_VERSION:
        raise ZkdError(f"{path}: signature format v{obj.get('format_version')} is not supported (this zkd reads "
                       f"v{SIGNATURE_VERSION}); recompute it")
    sha = str(obj.get("teacher_weights_sha256", ""))
    entries, teacher_rec = obj.get("signatures", []), obj.get("teacher") or {}
    if not isinstance(entries, list) or not all(isinstance(d, dict) for d in entries) or not isinstance(teacher_rec,
                                                                                                      dict):
        raise ZkdError(f"stats file {path} is malformed ('signatures' must be a list of objects, 'teacher' an object); "
                       "save it again with 'zkd similarity --save-stats'")
    sigs = [Signature.from_dict(d, sha, teacher_rec, str(path)) for d in entries]
    if not sigs:
        raise ZkdError(f"stats file {path} holds no signatures; save it again with --data")
    if teacher is not None:
        if sha != teacher.weights_sha256:
            spec = (obj.get("teacher") or {}).get("spec", "another teacher")
            raise ZkdError(f"stats file {path} was computed with teacher {spec} (weights sha256 {sha[:12]}...), not "
                           f"with this --teacher ({teacher.weights_sha256[:12]}...); recompute it with this teacher")
        ref = teacher_signature(teacher)
        for s in sigs:
            check_compatible(ref, s)
    return sigs


# ---------------------------------------------------------------------------------------------- shifted data


def _invert(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    return spec.normalize(1 - spec.denormalize(x.unsqueeze(0)))[0]


TRANSFORMS: dict[str, Callable[[torch.Tensor, InputSpec], torch.Tensor]] = {
    "invert": _invert,  # negative image: pixel p -> 1 - p
    "rot90": lambda x, spec: torch.rot90(x, 1, (-2, -1)),
    "rot180": lambda x, spec: torch.rot90(x, 2, (-2, -1)),
    "rot270": lambda x, spec: torch.rot90(x, 3, (-2, -1)),
    "hflip": lambda x, spec: x.flip(-1),
    "vflip": lambda x, spec: x.flip(-2),
}


def parse_transforms(text: str) -> list[str]:
    """``"rot90,invert"`` -> ``["rot90", "invert"]`` (applied left to right); unknown names raise ZkdError."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ZkdError(f"empty transform {text!r}; use one or more of {', '.join(TRANSFORMS)} separated by commas")
    for t in names:
        if t not in TRANSFORMS:
            raise ZkdError(f"unknown transform {t!r}; use one or more of {', '.join(TRANSFORMS)} separated by commas")
    return names


class TransformedDataset(Dataset):
    """A dataset with pixel-space shifts applied to each image (to build deliberately shifted real data).

    Args:
        base: yields ``(normalized image, label)``.
        transforms: names from :data:`TRANSFORMS`, applied left to right.
        spec: the input spec the images are normalized for (``invert`` works on [0, 1] pixels).
    """

    def __init__(self, base: Dataset, transforms: Sequence[str], spec: InputSpec) -> None:
        self.base, self.transforms, self.spec = base, list(transforms), spec
        for t in self.transforms:
            if t not in TRANSFORMS:
                raise ZkdError(f"unknown transform {t!r}; use one of {', '.join(TRANSFORMS)}")

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[i]
        for t in self.transforms:
            x = TRANSFORMS[t](x, self.spec)
        return x, y


def make_similarity_dataset(source: str, spec: InputSpec, num_images: int | None = None,
                            transforms: Sequence[str] = (), seed: int = 0, verify: bool = True) -> Dataset:
    """:func:`zeroshot_kd.data.make_dataset` plus optional pixel-space shifts (see :data:`TRANSFORMS`)."""
    from .data import make_dataset

    ds = make_dataset(source, spec, num_images=num_images, seed=seed, verify=verify)
    if not transforms:
        return ds
    shifted = TransformedDataset(ds, transforms, spec)
    shifted.zkd_subset = getattr(ds, "zkd_subset", None)  # type: ignore[attr-defined]
    return shifted


# ---------------------------------------------------------------------------------------------- reports


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks); NaN when either side is constant or n < 2."""
    if len(x) != len(y):
        raise ValueError("spearman needs sequences of equal length")

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


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
    from .charts import markdown_table

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
    from .charts import line_chart

    kind = kind or report["headline"]
    series = {f"{e['name']} ({e['scores'][kind]:.3g})": e["per_layer"][kind] for e in report["datasets"]}
    img, _ = line_chart(series, report["layers"], title=f"Per-layer {kind} divergence to the teacher's BN statistics",
                        y_label=f"{kind} (nats, mean over channels)" if kind != "l2" else "l2",
                        x_label="BatchNorm layer (input), in depth order", log_y=True)
    return img


def write_report(report: Mapping[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """Write ``similarity.json``, ``similarity.md`` and ``similarity.png`` into ``out`` (created if needed)."""
    from .charts import save_png

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


_NAME_RE = re.compile(r"^[A-Za-z0-9_.+\-]+$")


def split_named(entry: str) -> tuple[str | None, str]:
    """``"NAME=VALUE"`` -> (NAME, VALUE) when NAME is a plain name (letters, digits, ``_.+-``); else (None, entry)."""
    name, sep, value = entry.partition("=")
    if sep and name and _NAME_RE.match(name) and value:
        return name, value
    return None, entry


def iter_named(entries: Iterable[str]) -> Iterable[tuple[str, str]]:
    """Named entries for ``--data``: a bare SOURCE is named after itself."""
    for e in entries:
        name, value = split_named(e)
        yield (name or value), value
