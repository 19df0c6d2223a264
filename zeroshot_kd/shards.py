"""WebDataset-compatible tar shards of synthetic images, their manifest, and a Dataset that reads them.

Layout of an output folder::

    shard-000000.tar   one per synthesis batch; members KEY.npy, KEY.png, KEY.cls for each sample
    .parts/shard-000000.json   per-batch record (count, sha256, labels, loss terms) used by --resume
    manifest.json      provenance + per-shard sha256/count, written when every batch is done
    preview.png        one row per class

``KEY.npy`` is the source of truth: the float16 tensor (C, H, W) in the teacher's *normalized* input space.
``KEY.png`` is an 8-bit preview (denormalized, clamped, rounded; lossless). ``KEY.cls`` is the ASCII label.
Tar members have fixed metadata (mtime 0, uid/gid 0, mode 0644) so the same samples give the same bytes.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import struct
import tarfile
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import ZkdError
from .io import atomic_path
from .spec import InputSpec

__all__ = [
    "MANIFEST",
    "ShardDataset",
    "decode_npy",
    "encode_npy",
    "encode_png",
    "read_manifest",
    "shard_name",
    "to_uint8",
    "write_shard",
]

MANIFEST = "manifest.json"
FORMAT = "zkd-shards"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def encode_npy(t: torch.Tensor) -> bytes:
    """Serialize a float16 tensor in NumPy's .npy format (version 1.0, C order, little endian)."""
    t = t.detach().to("cpu", torch.float16).contiguous()
    header = f"{{'descr': '<f2', 'fortran_order': False, 'shape': {tuple(t.shape)}, }}"
    # Pad so that magic (6) + version (2) + length (2) + header + newline is a multiple of 64 bytes.
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * (pad % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + t.numpy().tobytes()


def decode_npy(data: bytes) -> torch.Tensor:
    """Parse the .npy bytes written by :func:`encode_npy` (float16/float32, C order) into a float32 tensor."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy payload")
    major = data[6]
    if major == 1:
        hlen, start = struct.unpack("<H", data[8:10])[0], 10
    else:
        hlen, start = struct.unpack("<I", data[8:12])[0], 12
    header = ast.literal_eval(data[start : start + hlen].decode("latin1"))
    dtypes = {"<f2": torch.float16, "<f4": torch.float32}
    if header.get("descr") not in dtypes or header.get("fortran_order"):
        raise ValueError(f"unsupported .npy header {header}")
    dtype, shape = dtypes[header["descr"]], tuple(header["shape"])
    body = data[start + hlen :]
    count = 1
    for s in shape:
        count *= s
    if len(body) != count * (2 if dtype == torch.float16 else 4):
        raise ValueError("truncated .npy payload")
    return torch.frombuffer(bytearray(body), dtype=dtype).view(shape).float()


def to_uint8(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Normalized (..., C, H, W) -> uint8 pixels: denormalize, clamp to [0, 1], round (not truncate)."""
    return spec.denormalize(x.float()).clamp(0, 1).mul(255).round().to(torch.uint8)


def encode_png(x: torch.Tensor, spec: InputSpec) -> bytes:
    """A lossless 8-bit PNG preview of one normalized image (C, H, W)."""
    px = to_uint8(x.unsqueeze(0), spec)[0].cpu()
    arr = px[0].numpy() if px.shape[0] == 1 else px.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def write_shard(path: str | os.PathLike, keys: Sequence[str], images: torch.Tensor, labels: Sequence[int],
                spec: InputSpec) -> str:
    """Write one shard atomically and return its sha256.

    Args:
        path: final shard path; the data goes to a temporary name and is renamed once complete.
        keys: one sample key per image (no dots; WebDataset splits the extension at the first one).
        images: normalized images (N, C, H, W); stored as float16 .npy plus an 8-bit .png preview.
        labels: class of each image.
        spec: the teacher's input spec (for the PNG denormalization).
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, x, y in zip(keys, images, labels):
            if "." in key:
                raise ValueError(f"sample key {key!r} must not contain dots")
            for ext, payload in (("npy", encode_npy(x)), ("png", encode_png(x, spec)), ("cls", str(int(y)).encode())):
                tar.addfile(_tarinfo(f"{key}.{ext}", len(payload)), io.BytesIO(payload))
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``manifest.json`` of a shard folder."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise ZkdError(f"shard folder {root} does not exist; pass the --out folder of 'zkd synthesize'")
    if not path.is_file():
        raise ZkdError(f"{root} has no {MANIFEST}: not a finished 'zkd synthesize' output (run it again with --resume)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ZkdError(f"{path} is corrupted ({e.msg}); re-run 'zkd synthesize --resume'") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ZkdError(f"{path}: unknown shard format {manifest.get('format')} v{manifest.get('format_version')}; "
                       f"this zkd reads {FORMAT} v{FORMAT_VERSION}")
    return manifest


class ShardDataset(Dataset):
    """Map-style Dataset over a ``zkd synthesize`` folder, yielding ``(float32 tensor (C, H, W), label)``.

    Shards are indexed once (member offsets), then each item is read with one seek. A truncated or corrupted
    shard raises :class:`~zeroshot_kd.errors.ZkdError` naming the file.

    Args:
        root: the folder with ``manifest.json`` and the shards.
        verify: check every shard's sha256 against the manifest before use.
        expect_spec: refuse shards whose input spec differs (they were made for another teacher input).
    """

    def __init__(self, root: str | os.PathLike, verify: bool = False, expect_spec: InputSpec | None = None) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(root)
        self.spec = InputSpec.from_dict(self.manifest["input_spec"])
        if expect_spec is not None and not _same_input(self.spec, expect_spec):
            raise ZkdError(f"shards in {root} were made for input {self.spec.shape} mean={list(self.spec.mean)} "
                           f"std={list(self.spec.std)}, but the model expects {expect_spec.shape} "
                           f"mean={list(expect_spec.mean)} std={list(expect_spec.std)}; synthesize for this teacher")
        self.items: list[tuple[Path, int, int, int]] = []  # (shard, npy offset, npy size, label)
        for entry in self.manifest["shards"]:
            path = self.root / entry["file"]
            if verify:
                self.verify_shard(path, entry["sha256"])
            found = self._index(path)
            if len(found) != entry["count"]:
                raise ZkdError(f"shard {path} holds {len(found)} samples, manifest says {entry['count']}; "
                               "re-run 'zkd synthesize --resume'")
            self.items.extend(found)

    @staticmethod
    def verify_shard(path: Path, sha256: str) -> None:
        if not path.is_file():
            raise ZkdError(f"shard {path} is missing; re-run 'zkd synthesize --resume' on its folder")
        h = hashlib.sha256(path.read_bytes()).hexdigest()
        if h != sha256:
            raise ZkdError(f"shard {path} is corrupted (sha256 {h[:12]}... != manifest {sha256[:12]}...); "
                           "delete it and re-run 'zkd synthesize --resume'")

    @staticmethod
    def _index(path: Path) -> list[tuple[Path, int, int, int]]:
        samples: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    s = samples.setdefault(key, {})
                    if ext == "npy":
                        s["npy"] = (m.offset_data, m.size)
                    elif ext == "cls":
                        s["cls"] = int(tar.extractfile(m).read())
        except FileNotFoundError:
            raise ZkdError(f"shard {path} is missing; re-run 'zkd synthesize --resume' on its folder") from None
        except (tarfile.TarError, ValueError, EOFError, OSError) as e:
            raise ZkdError(f"shard {path} is truncated or corrupted ({type(e).__name__}); delete it and re-run "
                           "'zkd synthesize --resume'") from None
        out = []
        for key in sorted(samples):
            s = samples[key]
            if "npy" not in s or "cls" not in s:
                raise ZkdError(f"shard {path}: sample {key} lacks its .npy or .cls member; the shard is corrupted")
            out.append((path, s["npy"][0], s["npy"][1], s["cls"]))
        return out

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, offset, size, label = self.items[i]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        try:
            return decode_npy(data), label
        except (ValueError, SyntaxError) as e:
            raise ZkdError(f"shard {path} is truncated or corrupted ({e}); re-run 'zkd synthesize --resume'") from None


def _same_input(a: InputSpec, b: InputSpec) -> bool:
    close = lambda u, v: len(u) == len(v) and all(abs(x - y) < 1e-6 for x, y in zip(u, v))  # noqa: E731
    return a.shape == b.shape and close(a.mean, b.mean) and close(a.std, b.std)
