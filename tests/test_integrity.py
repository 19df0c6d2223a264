"""Integrity by default and one-line refusals of malformed inputs (issue 10: shards, manifests, options)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from zeroshot_kd.errors import ZkdError
from zeroshot_kd.shards import MAX_SHARDS, ShardDataset, decode_npy, encode_npy, write_shard
from zeroshot_kd.spec import InputSpec

SPEC = InputSpec(1, 4, (0.5,), (0.5,), 5)


def _manifest(root, shards, **extra):
    man = {"format": "zkd-shards", "format_version": 1, "input_spec": SPEC.to_dict(), "shards": shards, **extra}
    (root / "manifest.json").write_text(json.dumps(man))


def _good(root, n=4):
    x = torch.linspace(-1, 1, n * 16).view(n, *SPEC.shape)
    sha = write_shard(root / "shard-000000.tar", [f"{i:08d}" for i in range(n)], x, [i % 5 for i in range(n)], SPEC)
    _manifest(root, [{"file": "shard-000000.tar", "count": n, "sha256": sha, "batch": 0}])
    return x


def _custom(root, members):
    """A one-shard folder whose tar holds ``members``: (name, bytes) regular files or prepared TarInfo objects."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    data = buf.getvalue()
    (root / "shard-000000.tar").write_bytes(data)
    _manifest(root, [{"file": "shard-000000.tar", "count": 1, "sha256": hashlib.sha256(data).hexdigest()}])


def _npy_with_header(header: str, body: bytes = b"") -> bytes:
    h = header.encode("latin1") + b"\n"
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + body


# --------------------------------------------------------------------------------------------- shard payloads


def test_flipped_payload_byte_is_refused_by_default_and_named(tmp_path):
    x = _good(tmp_path)
    shard = tmp_path / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[512 + 128 + 3] ^= 0x40  # inside the first sample's float16 body
    shard.write_bytes(bytes(data))
    with pytest.raises(ZkdError, match="shard-000000.tar is corrupted"):
        ShardDataset(tmp_path)
    ds = ShardDataset(tmp_path, verify=False)  # the opt-out reads it, and the flipped value is really there
    assert not torch.equal(ds[0][0], x[0].half().float())


def test_cli_evaluate_refuses_a_corrupted_shard(tmp_path, teacher):
    from cli.evaluate import command

    x = torch.zeros(2, *teacher.spec.shape)
    sha = write_shard(tmp_path / "shard-000000.tar", ["a", "b"], x, [0, 1], teacher.spec)
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "zkd-shards", "format_version": 1, "input_spec": teacher.spec.to_dict(),
        "shards": [{"file": "shard-000000.tar", "count": 2, "sha256": sha}]}))
    data = bytearray((tmp_path / "shard-000000.tar").read_bytes())
    data[512 + 200] ^= 0x01
    (tmp_path / "shard-000000.tar").write_bytes(bytes(data))
    res = CliRunner().invoke(command, ["--model", "fmnist_resnet14", "--data", str(tmp_path), "--quiet"])
    _one_line(res, "shard-000000.tar is corrupted")
    ok = CliRunner().invoke(command, ["--model", "fmnist_resnet14", "--data", str(tmp_path), "--quiet", "--no-verify"])
    assert ok.exit_code == 0, ok.output


def test_shape_nan_and_label_checks_name_file_and_sample(tmp_path):
    wrong = torch.zeros(1, 4, 4)
    _custom(tmp_path, [("k0.npy", encode_npy(torch.zeros(1, 5, 5))), ("k0.cls", b"0")])
    with pytest.raises(ZkdError, match=r"shard-000000.tar, sample k0: .npy shape \(1, 5, 5\) differs"):
        ShardDataset(tmp_path)
    bad = wrong.clone()
    bad[0, 1, 2] = float("nan")
    _custom(tmp_path, [("k1.npy", encode_npy(bad)), ("k1.cls", b"0")])
    ds = ShardDataset(tmp_path)
    with pytest.raises(ZkdError, match="shard-000000.tar, sample k1 holds NaN or infinite"):
        ds[0]
    bad[0, 1, 2] = float("inf")
    _custom(tmp_path, [("k1.npy", encode_npy(bad)), ("k1.cls", b"0")])
    with pytest.raises(ZkdError, match="sample k1 holds NaN or infinite"):
        ShardDataset(tmp_path)[0]
    for label in (b"5", b"-2", b"x"):
        _custom(tmp_path, [("k2.npy", encode_npy(wrong)), ("k2.cls", label)])
        with pytest.raises(ZkdError, match="sample k2"):
            ShardDataset(tmp_path)
    _custom(tmp_path, [("k3.npy", encode_npy(wrong)), ("k3.cls", b"-1")])  # -1 is zkd's "no label"
    assert ShardDataset(tmp_path)[0][1] == -1


@pytest.mark.parametrize("payload", [
    _npy_with_header("{'descr': '<f2', 'fortran_order': False, 'shape': 16, }", bytes(32)),
    _npy_with_header("[1, 2, 3]", bytes(32)),
    b"\x93NUMPY\x01",  # 7 bytes
])
def test_malformed_npy_headers_are_one_line_errors(tmp_path, payload):
    with pytest.raises(ValueError):
        decode_npy(payload)
    _custom(tmp_path, [("k.npy", payload), ("k.cls", b"0")])
    with pytest.raises(ZkdError, match="shard-000000.tar, sample k: bad .npy"):
        ShardDataset(tmp_path)


@pytest.mark.parametrize("kind", ["symlink", "device", "directory"])
def test_cls_member_that_is_not_a_regular_file(tmp_path, kind):
    info = tarfile.TarInfo("k.cls")
    info.type = {"symlink": tarfile.SYMTYPE, "device": tarfile.CHRTYPE, "directory": tarfile.DIRTYPE}[kind]
    if kind == "symlink":
        info.linkname = "/etc/passwd"
    _custom(tmp_path, [("k.npy", encode_npy(torch.zeros(1, 4, 4))), info])
    with pytest.raises(ZkdError, match=f"member k.cls is a {'device' if kind == 'device' else kind}"):
        ShardDataset(tmp_path)


# ------------------------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("edit,message", [
    (lambda m: [m], "a JSON list"),
    (lambda m: {k: v for k, v in m.items() if k != "shards"}, "shards is missing"),
    (lambda m: {**m, "teacher": "fmnist_resnet14"}, "teacher must be an object"),
    (lambda m: {**m, "input_spec": {**m["input_spec"], "mean": [0.5, 0.5, 0.5]}}, "input_spec.mean must list 1"),
    (lambda m: {**m, "input_spec": {**m["input_spec"], "std": [0.0]}}, "std values must be positive"),
    (lambda m: {**m, "input_spec": {**m["input_spec"], "image_size": "4"}}, "image_size must be an integer"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "file": "../x.tar"}]}, "plain .tar name"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "count": -3}]}, "count must be an integer"),
])
def test_malformed_manifests_are_refused_by_the_schema(tmp_path, edit, message):
    _good(tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(edit(man)))
    with pytest.raises(ZkdError, match=message):
        ShardDataset(tmp_path)


def test_huge_manifest_fails_fast(tmp_path):
    _good(tmp_path)
    man = json.loads((tmp_path / "manifest.json").read_text())
    entry = man["shards"][0]
    man["shards"] = [entry] + [{**entry, "file": f"shard-{i:06d}.tar"} for i in range(1, 40_000)]
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ZkdError, match="shard-000001.tar is missing"):
        ShardDataset(tmp_path)  # refused before any shard is read or hashed
    man["shards"] = [{**entry, "file": f"shard-{i:06d}.tar"} for i in range(MAX_SHARDS + 1)]
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ZkdError, match=f"more than the {MAX_SHARDS}"):
        ShardDataset(tmp_path)


def test_synthesized_manifest_is_valid_and_old_files_load(tmp_path, teacher):
    from zeroshot_kd import synthesize
    from zeroshot_kd.shards import read_manifest

    m = synthesize(tmp_path / "g", teacher=teacher, method="gaussian", num_images=3, batch_size=2, device="cpu",
                   progress=False)
    assert read_manifest(tmp_path / "g")["shards"] == m["shards"] and m["format"] == "zkd-shards"
    assert len(ShardDataset(tmp_path / "g")) == 3


# -------------------------------------------------------------------------------------------------- options


def _one_line(res, needle):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("zkd: error:")]
    assert len(errors) == 1 and needle in errors[0], res.output


def _synth(args):
    from cli.synthesize import command

    return CliRunner().invoke(command, ["--quiet", "--num-images", "2", "--batch-size", "2", "--iterations", "1",
                                        *args])


@pytest.mark.parametrize("args,needle", [
    (["--mean", "0.1,0.2,0.3"], "first layer takes 1 channel(s), but the input spec has 3"),
    (["--channels", "3"], "first layer takes 1 channel(s)"),
    (["--num-classes", "5"], "outputs 10 classes, not 5"),
    (["--image-size", "2"], "2x2 input is too small"),
    (["--image-size", "4", "--multires-iterations", "2"], "--multires-iterations optimizes at half resolution"),
    (["--std", "nan"], "--std nan is not a finite number"),
    (["--bn-weight", "nan"], "--bn-weight nan is not a finite number"),
    (["--lr", "inf"], "--lr inf is not a finite number"),
    (["--method", "bns", "--student", "fmnist_mobilenetv2"], "--student only apply to --method adi"),
    (["--method", "deepinversion", "--adi-scale", "1"], "--adi-scale only apply to --method adi"),
])
def test_synthesize_refuses_bad_specs_before_any_output(tmp_path, args, needle):
    out = tmp_path / "out"
    _one_line(_synth(["--out", str(out), *args]), needle)
    assert not out.exists()  # nothing half-made


def test_unwritable_outputs_are_one_line(tmp_path, monkeypatch):
    from cli.calibrate import command as calibrate
    from cli.distill import command as distill
    from cli.similarity import command as similarity

    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line(_synth(["--out", str(blocker / "sub")]), f"{blocker} is not a folder")
    runner = CliRunner()
    _one_line(runner.invoke(similarity, ["--data", "gaussian:4", "--save-stats", str(blocker / "s.json")]),
              "--save-stats")
    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    _one_line(_synth(["--out", str(locked / "out")]), f"folder {locked} is not writable")
    _one_line(runner.invoke(calibrate, ["--data", "gaussian:8", "--out", str(locked / "s.pt")]),
              f"folder {locked} is not writable")
    _one_line(runner.invoke(distill, ["--student", "cifar-resnet:8", "--data", "gaussian:8",
                                      "--out", str(locked / "s.pt")]), f"folder {locked} is not writable")
    assert list(locked.iterdir()) == []


def test_unreadable_folder_image_is_named(tmp_path):
    from cli.evaluate import command

    (tmp_path / "a").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    res = CliRunner().invoke(command, ["--model", "fmnist_resnet14", "--data", f"folder:{tmp_path}", "--quiet"])
    _one_line(res, "broken.png cannot be read")


def test_similarity_stats_with_a_number_for_signatures(tmp_path):
    from cli.similarity import command

    f = tmp_path / "s.json"
    f.write_text(json.dumps({"format": "zkd-bn-signature", "format_version": 1, "signatures": 3}))
    _one_line(CliRunner().invoke(command, ["--stats", str(f)]), "'signatures' must be a list")


# ---------------------------------------------------------------------------------------------- small defects


def test_synthesize_does_not_move_the_callers_teacher(teacher):
    from zeroshot_kd.synthesis import _on_device

    before = [p.device for p in teacher.model.parameters()]
    moved = _on_device(teacher, torch.device("meta"))
    assert moved is not teacher and next(moved.model.parameters()).device.type == "meta"
    assert [p.device for p in teacher.model.parameters()] == before  # the caller's object is untouched
    assert _on_device(teacher, torch.device("cpu")) is teacher  # already there: no copy


def test_gaussian_source_draws_from_batch_generator():
    from zeroshot_kd.data import GaussianDataset
    from zeroshot_kd.runtime import batch_generator

    ds = GaussianDataset(5, SPEC, seed=7)
    expected = SPEC.clamp(torch.randn(1, *SPEC.shape, generator=batch_generator(7, 3, "gaussian")))[0]
    torch.testing.assert_close(ds[3][0], expected, rtol=0, atol=0)


def test_missing_subcommand_module_fails_loudly(monkeypatch):
    import importlib
    import sys

    import cli.main

    monkeypatch.setitem(sys.modules, "cli.evaluate", None)  # importing it now raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError):
        importlib.reload(cli.main)
    monkeypatch.undo()
    importlib.reload(cli.main)
    assert "evaluate" in cli.main.cli.commands


def test_versioned_loader_is_shared(tmp_path):
    from zeroshot_kd.io import load_versioned

    torch.save({"format": "f", "format_version": 2}, tmp_path / "a.pt")
    torch.save({"format": "other"}, tmp_path / "b.pt")
    assert load_versioned(tmp_path / "a.pt", "f", (1, 2), "thing", "redo")["format_version"] == 2
    assert load_versioned(tmp_path / "b.pt", "f", (1,), "thing", "redo") is None
    with pytest.raises(ZkdError, match="unknown thing format version 2"):
        load_versioned(tmp_path / "a.pt", "f", (1,), "thing", "redo")
    (tmp_path / "c.pt").write_bytes(b"junk")
    with pytest.raises(ZkdError, match="cannot read"):
        load_versioned(tmp_path / "c.pt", "f", (1,), "thing", "redo")


@pytest.mark.parametrize("command", ["calibrate", "distill", "similarity"])
def test_spec_checked_against_teacher_in_every_command(tmp_path, command):
    from cli.main import cli

    out = tmp_path / "out"
    args = {"calibrate": ["--data", "gaussian:8", "--out", str(out / "s.pt")],
            "distill": ["--student", "cifar-resnet:8", "--data", "gaussian:8", "--out", str(out / "s.pt")],
            "similarity": ["--data", "gaussian:8", "--out", str(out)]}[command]
    out.mkdir() if command != "similarity" else None
    res = CliRunner().invoke(cli, [command, *args, "--channels", "3"])
    _one_line(res, "first layer takes 1 channel(s), but the input spec has 3")
    assert not out.exists() or list(out.iterdir()) == []


def test_evaluate_checks_the_model_spec():
    from cli.evaluate import command

    res = CliRunner().invoke(command, ["--model", "fmnist_resnet14", "--data", "gaussian:4", "--num-classes", "5"])
    _one_line(res, "outputs 10 classes, not 5")


def test_python_synthesize_checks_the_spec_before_output(tmp_path, teacher):
    import dataclasses

    from zeroshot_kd import synthesize

    wrong = dataclasses.replace(teacher, spec=InputSpec(1, 28, (0.3,), (0.4,), 7))
    with pytest.raises(ZkdError, match="outputs 10 classes, not 7"):
        synthesize(tmp_path / "o", teacher=wrong, method="gaussian", num_images=2, device="cpu", progress=False)
    assert not (tmp_path / "o").exists()
