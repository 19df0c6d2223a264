"""Data sources, addressed by one string everywhere (``--data``).

=====================  ==============================================================================
``DIR`` / ``shards:DIR``  synthetic shards written by ``zkd synthesize`` (see :mod:`zeroshot_kd.shards`)
``folder:DIR``            an ImageFolder tree, resized/center-cropped/normalized to the teacher's input spec
``fashion-mnist:SPLIT``   Fashion-MNIST ``train`` or ``test`` (Debian ``dataset-fashion-mnist`` IDX files,
                          else ``torchvision.datasets.FashionMNIST(download=True)``)
``gaussian:N``            N images drawn from N(0, 1) in normalized space, clamped to the valid range
=====================  ==============================================================================

Every source yields ``(normalized float32 tensor (C, H, W), int label)``; label is -1 where none is known.

``num_images=N`` takes a seeded random sample of N items, stratified by class where labels are known (never the
first N: an ImageFolder is sorted by class); the returned dataset's ``zkd_subset`` records which items were used.
An unreadable image in a ``folder:`` tree is an error naming the file (not skipped: a silently smaller set would
change results without notice).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import ZkdError
from .runtime import batch_generator
from .shards import ShardDataset
from .spec import InputSpec

__all__ = [
    "FASHION_MNIST_DIRS",
    "FASHION_MNIST_SPEC",
    "GaussianDataset",
    "load_fashion_mnist",
    "make_dataset",
    "parse_source",
    "read_idx",
    "sample_indices",
    "subset_record",
]

SOURCE_KINDS = ("shards", "folder", "fashion-mnist", "gaussian")


def parse_source(source: str) -> tuple[str, str]:
    """``(kind, argument)`` of a ``--data`` string: the one parser of the grammar in the module docstring.

    A string without a known ``KIND:`` prefix is a shard folder (``DIR`` = ``shards:DIR``).
    """
    kind, _, arg = source.partition(":")
    if not arg and kind not in SOURCE_KINDS:
        return "shards", source
    return kind, arg


def sample_indices(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """A seeded random sample of ``n`` of ``len(labels)`` items, stratified by class where labels are known.

    Each class c (label >= 0) gets ``floor(n * n_c / total)`` items, and the remainder goes to the classes with the
    largest fractional parts (ties by class id), so every class is within one item of its share; items without a
    label (-1) form one more stratum. Within a class the items are a seeded random choice. The result is in a seeded
    random order (a prefix of it is itself a random sample). It depends only on (labels, n, seed): not on batch size,
    worker or process count. ``n >= len(labels)`` returns every index.
    """
    total = len(labels)
    g = batch_generator(seed, 0, "subset")
    if n >= total:
        return torch.randperm(total, generator=g).tolist()
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(int(y) if int(y) >= 0 else -1, []).append(i)
    classes = sorted(groups)
    exact = {c: n * len(groups[c]) / total for c in classes}
    quota = {c: int(exact[c]) for c in classes}
    rest = n - sum(quota.values())
    for c in sorted(classes, key=lambda c: (-(exact[c] - quota[c]), c))[:rest]:
        quota[c] += 1
    picked: list[int] = []
    for c in classes:
        members = groups[c]
        perm = torch.randperm(len(members), generator=g)[: quota[c]]
        picked.extend(members[j] for j in perm.tolist())
    order = torch.randperm(len(picked), generator=g).tolist()
    return [picked[j] for j in order]


def subset_record(indices: Sequence[int], seed: int, source_size: int) -> dict[str, Any]:
    """What ``ds.zkd_subset`` holds: count, seed, source size and the sha256 of the sorted indices."""
    digest = hashlib.sha256(",".join(map(str, sorted(indices))).encode()).hexdigest()
    return {"n": len(indices), "seed": seed, "source_size": source_size, "sha256": digest}

# Where Debian's dataset-fashion-mnist puts the IDX files; ZKD_FASHION_MNIST overrides.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
# Mean/std of the Fashion-MNIST training pixels (computed from the 60k training images in [0, 1]).
FASHION_MNIST_SPEC = InputSpec(1, 28, (0.2860,), (0.3530,), 10)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (optionally gzipped) into a uint8 tensor of its declared shape."""
    opener: Callable = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ZkdError(f"{path}: not an unsigned-byte IDX file; reinstall the dataset package")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim
    count = 1
    for d in dims:
        count *= d
    if len(data) != expected + count:
        raise ZkdError(f"{path}: truncated IDX file ({len(data)} bytes, expected {expected + count})")
    return torch.frombuffer(bytearray(data[expected:]), dtype=torch.uint8).view(*dims)


def _fashion_mnist_files(split: str) -> tuple[Path, Path] | None:
    prefix = "train" if split == "train" else "t10k"
    dirs = [os.environ["ZKD_FASHION_MNIST"]] if os.environ.get("ZKD_FASHION_MNIST") else []
    for d in dirs + list(FASHION_MNIST_DIRS):
        for ext in (".gz", ""):
            img = Path(d) / f"{prefix}-images-idx3-ubyte{ext}"
            lbl = Path(d) / f"{prefix}-labels-idx1-ubyte{ext}"
            if img.is_file() and lbl.is_file():
                return img, lbl
    return None


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as (uint8 images (N, 28, 28), int64 labels).

    Reads the Debian package's IDX files; on a machine with internet and without the package, falls back to
    torchvision's downloader (into ``$TORCH_HOME/datasets``).
    """
    if split not in ("train", "test"):
        raise ZkdError(f"unknown Fashion-MNIST split {split!r}; use fashion-mnist:train or fashion-mnist:test")
    files = _fashion_mnist_files(split)
    if files is not None:
        return read_idx(files[0]), read_idx(files[1]).long()
    root = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "datasets"
    try:
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(str(root), train=(split == "train"), download=True)
    except Exception as e:  # offline: say exactly what to install
        raise ZkdError(
            "Fashion-MNIST not found: install it with 'apt-get install dataset-fashion-mnist' "
            f"(or set ZKD_FASHION_MNIST=DIR with the IDX files); download failed: {type(e).__name__}"
        ) from None
    return ds.data, ds.targets.long()


class GaussianDataset(Dataset):
    """N images x ~ N(0, 1) in normalized space, clamped to the valid pixel range; seeded per index."""

    def __init__(self, n: int, spec: InputSpec, seed: int = 0) -> None:
        self.n, self.spec, self.seed = n, spec, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = batch_generator(self.seed, i, "gaussian")
        x = torch.randn(1, *self.spec.shape, generator=g)
        return self.spec.clamp(x)[0], -1


def _pixels_to_spec(pixels: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) images -> normalized float (N, C, S, S) for ``spec``."""
    x = pixels.float().div_(255)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != spec.channels:
        x = x.mean(1, keepdim=True) if spec.channels == 1 else x[:, :1].expand(-1, spec.channels, -1, -1)
    if x.shape[-1] != spec.image_size or x.shape[-2] != spec.image_size:
        x = torch.nn.functional.interpolate(x, size=spec.image_size, mode="bilinear", antialias=True,
                                            align_corners=False)
    return spec.normalize(x)


def _load_image(path: str) -> Any:
    """ImageFolder's loader, but an unreadable or corrupt image is a ZkdError naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ZkdError(f"folder image {path} cannot be read ({type(e).__name__}); remove or replace it") from None


def _folder_dataset(root: str, spec: InputSpec) -> Dataset:
    from torchvision import datasets, transforms

    if not Path(root).is_dir():
        raise ZkdError(f"data folder {root!r} does not exist; pass folder:DIR with one sub-folder per class")
    tf = transforms.Compose([
        transforms.Grayscale(1) if spec.channels == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.Resize(spec.resize),
        transforms.CenterCrop(spec.image_size),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])
    try:
        return datasets.ImageFolder(root, transform=tf, loader=_load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise ZkdError(f"folder:{root}: {e}".splitlines()[0]) from None


def _labels_of(ds: Dataset) -> list[int] | None:
    """Every item's label without loading images, where the source knows them cheaply."""
    if hasattr(ds, "labels") and not isinstance(ds, TensorDataset):
        return list(ds.labels)  # ShardDataset
    if hasattr(ds, "targets"):
        return [int(t) for t in ds.targets]  # ImageFolder
    return None


def make_dataset(source: str, spec: InputSpec, num_images: int | None = None, seed: int = 0,
                 verify: bool = True) -> Dataset:
    """Resolve a ``--data`` string into a map-style Dataset of ``(normalized tensor, label)``.

    Args:
        source: one of the forms in the module docstring.
        spec: the consuming model's input spec (real images are converted to it; shards must match it).
        num_images: keep a seeded random sample of N items, stratified by class where labels are known
            (:func:`sample_indices`); None or N >= the source's size keeps all of it.
        seed: seed of the sample and of the ``gaussian:N`` source.
        verify: for shards, check every shard's sha256 against the manifest first (the default).

    Returns:
        The dataset, with ``zkd_subset`` = ``{"n", "seed", "source_size", "sha256"}`` (sha256 of the sorted
        indices used) recorded on it.
    """
    kind, arg = parse_source(source)
    indices: list[int] | None = None
    if kind == "shards":
        ds: Dataset = ShardDataset(arg, verify=verify, expect_spec=spec)
    elif kind == "folder":
        ds = _folder_dataset(arg, spec)
    elif kind == "fashion-mnist":
        images, labels = load_fashion_mnist(arg or "train")
        size = len(labels)
        if num_images is not None and num_images < size:
            indices = sample_indices(labels.tolist(), num_images, seed)
            pick = torch.tensor(indices)
            images, labels = images[pick], labels[pick]
        ds = TensorDataset(_pixels_to_spec(images, spec), labels)
    elif kind == "gaussian":
        try:
            n = int(arg)
        except ValueError:
            raise ZkdError(f"gaussian:N needs an image count, got {source!r}") from None
        if n <= 0:
            raise ZkdError(f"gaussian:N needs a positive image count, got {n}")
        ds = GaussianDataset(n, spec, seed)
    else:
        raise ZkdError(
            f"unknown data source {source!r}; use DIR, shards:DIR, folder:DIR, fashion-mnist:train|test or gaussian:N"
        )
    if len(ds) == 0:
        raise ZkdError(f"data source {source!r} is empty")
    if indices is not None:  # sampled before conversion
        ds.zkd_subset = subset_record(indices, seed, size)  # type: ignore[attr-defined]
        return ds
    size = len(ds)
    if num_images is not None and num_images < size:
        labels_list = _labels_of(ds)
        indices = sample_indices(labels_list if labels_list is not None else [-1] * size, num_images, seed)
        ds = Subset(ds, indices)
    ds.zkd_subset = subset_record(indices if indices is not None else range(size), seed, size)  # type: ignore
    return ds
