"""``zkd synthesize`` end to end: CLI output, --json, clear errors, and 2 processes under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cli.main import cli

ARGS = ["--method", "bns", "--num-images", "12", "--batch-size", "4", "--iterations", "3", "--device", "cpu",
        "--seed", "7", "-q"]


def run(args):
    return CliRunner().invoke(cli, args)


def test_help_shows_defaults():
    r = run(["synthesize", "--help"])
    assert r.exit_code == 0
    flat = " ".join(r.output.split())
    for text in ["--num-images", "default: 256", "deepinversion/adi: 0.01", "--resume", "torchrun"]:
        assert text in flat


def test_json_summary_and_files(tmp_path):
    out = tmp_path / "o"
    r = run(["synthesize", "--out", str(out), "--json", *ARGS])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["num_images"] == 12 and summary["shards"] == 3 and summary["method"] == "bns"
    assert summary["teacher"]["kind"] == "builtin"
    assert {p.name for p in out.iterdir()} >= {"manifest.json", "preview.png", "shard-000000.tar"}


@pytest.mark.parametrize("args, message", [
    (["--teacher", "nope_model"], "unknown teacher"),
    (["--device", "cuda:3"], "--device"),
    (["--targets", "0,99"], "--targets class ids"),
    (["--teacher", "resnet18", "--weights", "BOGUS"], "unknown --weights"),
])
def test_errors_are_one_line_without_traceback(tmp_path, args, message):
    r = run(["synthesize", "--out", str(tmp_path / "o"), *ARGS, *args])
    assert r.exit_code == 2
    errors = [ln for ln in r.output.splitlines() if ln.startswith("zkd: error:")]
    assert len(errors) == 1 and message in errors[0] and r.output.rstrip().endswith(errors[0]), r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_non_empty_output_refused(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run(["synthesize", "--out", str(out), *ARGS])
    assert r.exit_code == 2 and "not empty" in r.output and "--resume" in r.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(["synthesize", "--out", str(one), *ARGS]).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "zeroshot_kd",
           "synthesize", "--out", str(two), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(p.name for p in one.glob("shard-*.tar"))
    assert shards == sorted(p.name for p in two.glob("shard-*.tar")) and len(shards) == 3
    for name in shards:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m1["shards"] == m2["shards"] and m2["world_size"] == 2
