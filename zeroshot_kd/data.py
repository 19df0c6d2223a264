"""Data sources, addressed by one string everywhere (``--data``).

=====================  ==============================================================================
``DIR`` / ``shards:DIR``  synthetic shards written by ``zkd synthesize`` (see :mod:`zeroshot_kd.shards`)
``folder:DIR``            an ImageFolder tree, resized/center-cropped/normalized to the teacher's input spec
``fashion-mnist:SPLIT``   Fashion-MNIST ``train`` or ``test`` (Debian ``dataset-fashion-mnist`` IDX files,
                          else ``torchvision.datasets.FashionMNIST(download=True)``)
``gaussian:N``            N images drawn from N(0, 1) in normalized space, clamped to the valid range
=====================  ==============================================================================

Every source yields ``(normalized float32 tensor (C, H, W), int label)``; label is -1 where none is known.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import ZkdError
from .spec import InputSpec

__all__ = [
    "FASHION_MNIST_DIRS",
    "FASHION_MNIST_SPEC",
    "GaussianDataset",
    "load_fashion_mnist",
    "make_dataset",
    "read_idx",
]

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
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
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
        return datasets.ImageFolder(root, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise ZkdError(f"folder:{root}: {e}".splitlines()[0]) from None


def make_dataset(source: str, spec: InputSpec, num_images: int | None = None, seed: int = 0,
                 verify: bool = False) -> Dataset:
    """Resolve a ``--data`` string into a map-style Dataset of ``(normalized tensor, label)``.

    Args:
        source: one of the forms in the module docstring.
        spec: the consuming model's input spec (real images are converted to it; shards must match it).
        num_images: keep only the first N items (the order of the source).
        seed: seed of the ``gaussian:N`` source.
        verify: for shards, check every shard's sha256 against the manifest first.
    """
    kind, _, arg = source.partition(":")
    if not arg and kind not in ("fashion-mnist", "gaussian", "folder", "shards"):
        kind, arg = "shards", source
    if kind == "shards":
        from .shards import ShardDataset

        ds: Dataset = ShardDataset(arg, verify=verify, expect_spec=spec)
    elif kind == "folder":
        ds = _folder_dataset(arg, spec)
    elif kind == "fashion-mnist":
        images, labels = load_fashion_mnist(arg or "train")
        if num_images is not None:
            images, labels = images[:num_images], labels[:num_images]
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
    if num_images is not None and num_images < len(ds):
        ds = Subset(ds, range(num_images))
    return ds
