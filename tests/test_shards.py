"""Shard format: round trip, WebDataset layout, PNG preview rounding, verification and corruption errors."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from zeroshot_kd.errors import ZkdError
from zeroshot_kd.shards import ShardDataset, decode_npy, encode_npy, encode_png, write_shard
from zeroshot_kd.spec import InputSpec

SPEC = InputSpec(3, 8, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 5)


def _folder(tmp_path, n=6):
    """A hand-made shard folder (two shards) with a minimal manifest."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *SPEC.shape, generator=g)
    labels = [i % 5 for i in range(n)]
    shards = []
    for b, sl in enumerate([slice(0, 4), slice(4, n)]):
        name = f"shard-{b:06d}.tar"
        keys = [f"{i:08d}" for i in range(sl.start, sl.stop)]
        sha = write_shard(tmp_path / name, keys, x[sl], labels[sl], SPEC)
        shards.append({"file": name, "count": len(keys), "sha256": sha, "batch": b})
    manifest = {"format": "zkd-shards", "format_version": 1, "input_spec": SPEC.to_dict(), "shards": shards}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return x, labels


def test_npy_is_numpy_compatible():
    t = torch.randn(3, 5, 7)
    arr = np.load(io.BytesIO(encode_npy(t)))
    assert arr.dtype == np.float16 and arr.shape == (3, 5, 7)
    assert np.array_equal(arr, t.half().numpy())
    torch.testing.assert_close(decode_npy(encode_npy(t)), t.half().float(), rtol=0, atol=0)


def test_round_trip_and_webdataset_layout(tmp_path):
    x, labels = _folder(tmp_path)
    ds = ShardDataset(tmp_path, verify=True, expect_spec=SPEC)
    assert len(ds) == 6
    for i in range(6):
        xi, yi = ds[i]
        torch.testing.assert_close(xi, x[i].half().float(), rtol=0, atol=0)
        assert yi == labels[i]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["00000000.npy", "00000000.png", "00000000.cls"]
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in tar.getmembers())
        assert tar.extractfile("00000001.cls").read() == b"1"


def test_png_preview_is_denormalized_and_rounded():
    x = torch.randn(*SPEC.shape)
    im = np.array(Image.open(io.BytesIO(encode_png(x, SPEC))))
    mean = torch.tensor(SPEC.mean).view(3, 1, 1)
    std = torch.tensor(SPEC.std).view(3, 1, 1)
    expected = torch.floor((x * std + mean).clamp(0, 1) * 255 + 0.5).permute(1, 2, 0).numpy()
    assert im.shape == (8, 8, 3) and im.dtype == np.uint8
    assert np.abs(im.astype(np.int32) - expected.astype(np.int32)).max() <= 0  # rounding, not truncation


def test_same_samples_same_bytes(tmp_path):
    x = torch.randn(2, *SPEC.shape)
    a = write_shard(tmp_path / "a.tar", ["k0", "k1"], x, [0, 1], SPEC)
    b = write_shard(tmp_path / "b.tar", ["k0", "k1"], x, [0, 1], SPEC)
    assert a == b and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_corrupted_and_truncated_shards_are_named(tmp_path):
    _folder(tmp_path)
    shard = tmp_path / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ZkdError, match="shard-000001.tar is corrupted"):
        ShardDataset(tmp_path, verify=True)
    shard.write_bytes(bytes(data[:700]))
    with pytest.raises(ZkdError, match="shard-000001.tar"):
        ShardDataset(tmp_path)
    shard.unlink()
    with pytest.raises(ZkdError, match="shard-000001.tar is missing"):
        ShardDataset(tmp_path)


def test_manifest_problems(tmp_path):
    with pytest.raises(ZkdError, match="does not exist"):
        ShardDataset(tmp_path / "nope")
    with pytest.raises(ZkdError, match="no manifest.json"):
        ShardDataset(tmp_path)
    _folder(tmp_path)
    with pytest.raises(ZkdError, match="made for input"):
        ShardDataset(tmp_path, expect_spec=InputSpec(1, 28, (0.5,), (0.5,), 10))
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ZkdError, match="unknown shard format"):
        ShardDataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ZkdError, match="corrupted"):
        ShardDataset(tmp_path)


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="dots"):
        write_shard(tmp_path / "s.tar", ["a.b"], torch.zeros(1, *SPEC.shape), [0], SPEC)
    assert not list(tmp_path.iterdir())  # nothing half-written
