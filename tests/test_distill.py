"""zkd distill: pair sampler, student building, CLI errors, and a short end-to-end run on the shipped teacher."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from zeroshot_kd.distill import build_student, pair_batches
from zeroshot_kd.errors import ZkdError
from zeroshot_kd.teachers import builtin_teachers, load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


SHIPPED = "fmnist_resnet14" in builtin_teachers()
needs_teacher = pytest.mark.skipif(not SHIPPED, reason="the shipped teacher assets/fmnist_resnet14.pt is not built")


def test_pair_batches_pair_each_anchor_with_its_class():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3, 0, 1])
    batches = pair_batches(labels, 4, torch.Generator().manual_seed(0))
    anchors = []
    for b in batches:
        half = len(b) // 2
        assert len(b) == 2 * half
        for a, p in zip(b[:half], b[half:]):
            assert labels[a] == labels[p]
        anchors += b[:half]
    assert sorted(anchors) == list(range(len(labels)))          # every item is an anchor exactly once
    again = pair_batches(labels, 4, torch.Generator().manual_seed(0))
    assert again == batches


def test_build_student_shorthand_and_card():
    from zeroshot_kd import Teacher
    from zeroshot_kd.data import FASHION_MNIST_SPEC
    from zeroshot_kd.models import cifar_resnet

    t = Teacher(cifar_resnet(8, 4), FASHION_MNIST_SPEC)
    model, card = build_student("cifar-resnet:8x2", t, seed=1)
    # one record schema (zeroshot_kd.modelspec.ModelRecord): builder, kwargs, first/last layer names
    assert card == {"builder": "zeroshot_kd.models:cifar_resnet", "first_layer": "conv1", "last_layer": "fc",
                    "kwargs": {"depth": 8, "width": 2, "in_channels": 1, "num_classes": 10}}
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert model.conv1.out_channels == 2
    same, _ = build_student("cifar-resnet:8x2", t, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    with pytest.raises(ZkdError, match="6n\\+2"):
        build_student("cifar-resnet:9x2", t)


@pytest.mark.parametrize("args, needle", [
    (["--objective", "kdd"], "unknown objective 'kdd'; valid: kd, ce"),
    (["--objective", "rkd:foo=1"], "unknown parameter 'foo'; valid: weight, layers"),
    (["--objective", "sp:layers=layer7"], "layer 'layer7' does not exist in the student"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    base = ["distill", "--teacher", "zeroshot_kd.models:cifar_resnet", "--num-classes", "10", "--channels", "1",
            "--image-size", "8", "--student", "cifar-resnet:8x2", "--data", "gaussian:4", "--epochs", "1",
            "--batch-size", "2", "--out", str(tmp_path / "s.pt"), "--no-progress"]
    result = CliRunner().invoke(cli, base + args)
    assert result.exit_code == 2
    err = result.output.strip().splitlines()
    assert err[-1].startswith("zkd: error: ") and needle in err[-1]
    assert "Traceback" not in result.output


def _distill(out, *extra):
    args = ["distill", "--student", "cifar-resnet:8x4", "--data", "fashion-mnist:train", "--out", str(out),
            "--no-progress", "--seed", "3", "--json", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@needs_teacher
def test_distill_on_the_shipped_teacher_lowers_the_objective_and_raises_agreement(tmp_path):
    summary = _distill(tmp_path / "a.pt", "--num-images", "512", "--objective", "kd:T=4", "--objective",
                       "rkd:weight=0.5", "--epochs", "4", "--batch-size", "32", "--lr", "0.1", "--eval-data",
                       "fashion-mnist:test", "--eval-images", "300")
    lines = [json.loads(s) for s in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3, 4]
    assert summary["final"] == lines[-1] and summary["steps"] == 64
    assert lines[-1]["loss"] < lines[1]["loss"]
    assert lines[-1]["kd"] < lines[1]["kd"]
    assert lines[-1]["eval"]["agreement"] > lines[0]["eval"]["agreement"] + 20      # percent
    # the checkpoint and its card load back as a model that gives the recorded agreement
    from zeroshot_kd import load_teacher
    from zeroshot_kd.data import make_dataset
    from zeroshot_kd.evaluate import evaluate_model

    student, teacher = load_teacher(str(tmp_path / "a.pt")), load_teacher()
    test = make_dataset("fashion-mnist:test", teacher.spec, 300, seed=3)  # the CLI's --seed picks the eval sample
    assert evaluate_model(student.model, test, "cpu", 512, teacher.model, progress=False) == lines[-1]["eval"]
    assert json.loads((tmp_path / "a.json").read_text())["test_accuracy"] == lines[-1]["eval"]["top1"]
    meta = torch.load(tmp_path / "a.pt", weights_only=True)["zkd"]
    assert meta["format"] == "zkd-distill-checkpoint" and meta["format_version"] == 1 and meta["epoch"] == 4


@needs_teacher
def test_distill_same_seed_same_bytes(tmp_path):
    args = ("--num-images", "64", "--objective", "kd", "--objective", "ofd", "--objective", "bss:steps=2",
            "--epochs", "1", "--batch-size", "16", "--mixup")
    summary = _distill(tmp_path / "a.pt", *args)
    _distill(tmp_path / "b.pt", *args)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert summary["config"]["mixup"] is True and json.loads((tmp_path / "a.json").read_text())["config"]["mixup"]


@needs_teacher
@pytest.mark.slow
def test_two_process_ddp_distill_equals_one_process(tmp_path):
    """``zkd distill`` under torchrun (2 CPU processes, gloo, DDP) gives the 1-process weights to float tolerance.

    The global batch of 5 is split 3 + 2 (uneven on purpose: the loss scaling must make DDP's gradient average the
    global batch mean). The student is a CIFAR ResNet with BatchNorm, trained with ``--freeze-bn`` (eval mode, BN
    uses its running statistics), because PyTorch has no SyncBatchNorm on CPU: with per-rank batch statistics the
    runs would differ by construction. OFD's connectors (objective-owned parameters) are all-reduced too. ``--shift``
    and ``--flip`` move each rank's slice with its positions' draws of the global batch.
    """
    import os
    import subprocess
    import sys

    args = ["--student", "cifar-resnet:8x2", "--data", "gaussian:10", "--objective", "kd:T=4", "--objective", "ofd",
            "--epochs", "2", "--batch-size", "5", "--lr", "0.05", "--freeze-bn", "--eval-data", "gaussian:6",
            "--shift", "2", "--flip", "--device", "cpu", "--seed", "5", "--no-progress"]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    r = CliRunner().invoke(cli, ["distill", "--out", str(one), *args])
    assert r.exit_code == 0, r.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "zeroshot_kd",
           "distill", "--out", str(two), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(p, weights_only=True) for p in (one, two))
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    start, _ = build_student("cifar-resnet:8x2", load_teacher(), seed=5)
    moved = sum(not torch.allclose(start.state_dict()[k], v) for k, v in a["model"].items() if v.is_floating_point())
    assert moved > 10                                           # the runs trained (and agree)
    m1, m2 = ([json.loads(s) for s in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in ("one", "two"))
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [0, 2, 4]
    for r1, r2 in zip(m1[1:], m2[1:]):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4) and r2["ofd"] == pytest.approx(r1["ofd"], rel=1e-4)
        assert r2["eval"]["agreement"] == r1["eval"]["agreement"]
        assert r2["eval"]["kl"] == pytest.approx(r1["eval"]["kl"], rel=1e-4)
    assert b["zkd"]["format"] == "zkd-distill-checkpoint" and proc.stderr.count("wrote ") == 1   # rank 0 writes
