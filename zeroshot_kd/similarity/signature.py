"""Signatures: per-channel Gaussians of a dataset at every BN layer's input, how they are accumulated, and their file.

The statistics conventions are in the package docstring (:mod:`zeroshot_kd.similarity`). The file format
(``zkd-bn-signature`` v1, JSON or ``.pt``) is owned here: :func:`save_signatures` writes it,
:func:`load_signatures` reads it (``.pt`` through :func:`zeroshot_kd.io.load_versioned`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..bn import bn_layers
from ..capture import Capture
from ..errors import ZkdError
from ..io import atomic_torch_save, atomic_write_json, load_versioned
from ..teachers import Teacher

__all__ = ["MODES", "SIGNATURE_FORMAT", "SIGNATURE_VERSION", "MomentAccumulator", "Signature", "check_compatible",
           "compute_signature", "load_signatures", "save_signatures", "teacher_signature"]

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
