"""The one KD training loop (``zeroshot_kd.training``): budgets, records, epochs, one SGD step by hand, sharding,
checkpoint format; and calibrate's fine-tuning through it (epochs advance, the held-out label)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

from cli.main import cli
from zeroshot_kd.augment import mixup_batch, shift_flip_batch
from zeroshot_kd.errors import ZkdError
from zeroshot_kd.runtime import batch_generator
from zeroshot_kd.objectives import Objective, ObjectiveSet, build
from zeroshot_kd.training import (CHECKPOINT_FORMAT, TrainConfig, read_checkpoint, shard_batch, shuffled_batches,
                                  train_student, write_checkpoint)

pytestmark = pytest.mark.usefixtures("one_thread")


class EpochSpy(Objective):
    """Records the epoch/step of every batch and every set_epoch call; loss = mean squared logit gap."""

    name = "spy"
    needs_teacher = True

    def check(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.set_epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.set_epochs.append(epoch)

    def forward(self, batch):
        self.seen.append((batch.epoch, batch.step))
        return (batch.student_logits - batch.teacher_logits.detach()).pow(2).mean()


def _linear_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval().requires_grad_(False)
    return student, teacher


def test_shard_batch_splits_contiguously_and_pairs_alike():
    assert [shard_batch(list(range(5)), r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [shard_batch(list(range(7)), r, 3) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    batch = [10, 11, 12, 20, 21, 22]             # anchors 10..12, their partners 20..22
    assert [shard_batch(batch, r, 2, pairs=True) for r in range(2)] == [[10, 11, 20, 21], [12, 22]]
    assert sum((shard_batch(list(range(9)), r, 4) for r in range(4)), []) == list(range(9))


def test_shuffled_batches_drop_rules():
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    assert shuffled_batches(10, 4, g) == [order[0:4], order[4:8], order[8:10]]
    g = torch.Generator().manual_seed(0)
    assert shuffled_batches(10, 4, g, drop_last=True) == [order[0:4], order[4:8]]
    assert shuffled_batches(9, 4, torch.Generator().manual_seed(0)) == [b for b in [
        torch.randperm(9, generator=torch.Generator().manual_seed(0)).tolist()[i:i + 4] for i in (0, 4, 8)]
        if len(b) >= 2]
    assert len(shuffled_batches(3, 8, torch.Generator().manual_seed(0), drop_last=True)[0]) == 3


def test_mixup_batch_is_the_convex_mix_with_a_permutation():
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 3).clone()
    y = torch.tensor([0, 1, 2, 3, -1, 5])
    for seed in range(20):
        out, out_y = mixup_batch(x, y, torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)   # the documented draws: a permutation, then one lam per image
        perm, lam = torch.randperm(6, generator=g), torch.rand(6, generator=g)
        for i in range(6):
            j = int(perm[i])
            value = float(i) if j == i else float(lam[i]) * i + (1 - float(lam[i])) * j
            assert torch.allclose(out[i], torch.full((1, 2, 3), value), atol=1e-6)
            assert int(out_y[i]) == (int(y[i]) if j == i else -1)
    assert torch.equal(mixup_batch(x, y, torch.Generator().manual_seed(3))[0],
                       mixup_batch(x, y, torch.Generator().manual_seed(3))[0])


def test_shift_flip_batch_moves_each_image_by_its_drawn_offsets_with_edges_repeated():
    x = torch.randn(6, 2, 5, 7, generator=torch.Generator().manual_seed(4))
    for seed in range(10):
        out = shift_flip_batch(x, torch.Generator().manual_seed(seed), shift=2, flip=True)
        g = torch.Generator().manual_seed(seed)  # the documented draws: B flips, then B row and B column offsets
        flips, dy, dx = torch.rand(6, generator=g) < 0.5, torch.randint(0, 5, (6,), generator=g), \
            torch.randint(0, 5, (6,), generator=g)
        for b in range(6):
            src = x[b].flip(-1) if flips[b] else x[b]
            for i in range(5):
                for j in range(7):   # pixel (i, j) reads (i + dy - 2, j + dx - 2), clamped into the image
                    ii, jj = min(max(i + int(dy[b]) - 2, 0), 4), min(max(j + int(dx[b]) - 2, 0), 6)
                    assert torch.equal(out[b, :, i, j], src[:, ii, jj])
    # a rank's slice (torchrun) gets its positions' moves of the global batch: the slices make up the 1-process batch
    whole = shift_flip_batch(x, torch.Generator().manual_seed(7), shift=2, flip=True)
    for pairs in (False, True):
        parts = [shard_batch(range(6), r, 2 if pairs else 4, pairs) for r in range(2 if pairs else 4)]
        for pos in parts:
            torch.testing.assert_close(shift_flip_batch(x[pos], torch.Generator().manual_seed(7), 2, True, 6, pos),
                                       whole[pos], rtol=0, atol=0)
    # off, it is the identity and draws nothing; shift alone draws only the offsets
    g = torch.Generator().manual_seed(1)
    assert torch.equal(shift_flip_batch(x, g), x) and torch.equal(g.get_state(), torch.Generator().manual_seed(1)
                                                                 .get_state())
    g = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (6,), generator=g)
    out = shift_flip_batch(x, torch.Generator().manual_seed(1), shift=1)
    assert all(torch.equal(out[b, :, 1:-1, 1:-1], x[b, :, int(dy[b]):int(dy[b]) + 3, int(dx[b]):int(dx[b]) + 5])
               for b in range(6))


def test_shift_flip_moves_cskd_anchors_and_partners_independently():
    student, teacher = _linear_pair()
    x = torch.randn(8, 1, 3, 4, generator=torch.Generator().manual_seed(2))
    data = TensorDataset(x, torch.zeros(8, dtype=torch.long))
    seen = []

    class Record(Objective):
        name = "record"
        needs_pairs = True

        def forward(self, batch):
            seen.append((batch.inputs.detach().clone(), batch.pair_logits.clone()))
            return batch.student_logits.pow(2).mean()

    plan = [[0, 1, 2, 4, 5, 6]]  # anchors 0..2, partners 4..6
    cfg = TrainConfig(steps=1, batch_size=3, lr=1e-9, shift=1, flip=True, seed=3)
    train_student(student, teacher, data, ObjectiveSet([Record()]), cfg, pairs=True, batches=lambda e: plan,
                  initial_record=False, progress=False)
    # the six images are moved as one batch by batch_generator(seed, 0, "train-shift"), then split
    moved = shift_flip_batch(x[plan[0]], batch_generator(3, 0, "train-shift"), 1, True)
    torch.testing.assert_close(seen[0][0], moved[:3], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(seen[0][1], student(moved[3:]), rtol=1e-6, atol=1e-6)


def test_mixup_refuses_cskd_pairs():
    student, teacher = _linear_pair()
    data = TensorDataset(torch.randn(8, 1, 3, 4), torch.zeros(8, dtype=torch.long))
    cfg = TrainConfig(steps=1, batch_size=4, mixup=True)
    with pytest.raises(ZkdError, match="mixup does not combine"):
        train_student(student, teacher, data, ["kd"], cfg, pairs=True, progress=False)


def test_config_validates_and_round_trips():
    cfg = TrainConfig(steps=7, lr=0.1, optimizer="adam", log_every=3, freeze_bn=True, objective_lr=1e-3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig.from_dict({"epochs": 2}) == TrainConfig(epochs=2)      # older records: defaults
    for bad, needle in [({"optimizer": "lion"}, "unknown optimizer"), ({"schedule": "step"}, "unknown schedule"),
                        ({"epochs": 0}, "--epochs"), ({"steps": 0}, "--steps"), ({"lr": 0}, "--lr"),
                        ({"shift": -1}, "--shift must be >= 0, got -1")]:
        with pytest.raises(ZkdError, match=needle):
            TrainConfig(**bad)
    with pytest.raises(ZkdError, match="unknown training option"):
        TrainConfig.from_dict({"epochz": 1})


def test_step_budget_records_and_epochs_advance():
    student, teacher = _linear_pair()
    spy = EpochSpy()
    data = TensorDataset(torch.randn(8, 1, 3, 4), torch.full((8,), -1))
    cfg = TrainConfig(steps=5, batch_size=4, lr=0.01, schedule="constant", log_every=2)
    result = train_student(student, teacher, data, ObjectiveSet([spy]), cfg, progress=False, initial_record=False)
    # 2 batches per pass: steps 0,1 in epoch 0; 2,3 in epoch 1; 4 in epoch 2
    assert spy.seen == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4)]
    assert spy.set_epochs == [0, 1, 2]
    assert [(r["epoch"], r["step"]) for r in result.records] == [(1, 2), (2, 4), (3, 5)]
    assert all(r["lr"] == 0.01 for r in result.records) and result.steps == 5 and student.training


def test_one_step_equals_nesterov_sgd_by_hand():
    student, teacher = _linear_pair(1)
    start = [p.detach().clone() for p in student.parameters()]
    x = torch.randn(6, 1, 3, 4, generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(steps=1, batch_size=6, lr=0.5, weight_decay=0.01, schedule="constant")
    train_student(student, teacher, TensorDataset(x, torch.full((6,), -1)), ["kd:T=2"], cfg, progress=False)
    ref, _ = _linear_pair(1)
    s, t = ref(x), teacher(x)
    loss = 4 * F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for p0, g, p in zip(start, grads, student.parameters()):
        d = g + 0.01 * p0                      # L2 weight decay; first step: buffer = d, nesterov: d + 0.9 d
        torch.testing.assert_close(p.detach(), p0 - 0.5 * 1.9 * d, rtol=1e-5, atol=1e-6)


def test_cosine_schedule_reaches_zero_and_param_groups_keep_their_lr():
    student, teacher = _linear_pair()
    data = TensorDataset(torch.randn(8, 1, 3, 4), torch.full((8,), -1))
    w, b = student[1].weight, student[1].bias
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.2, schedule="cosine", log_every=1)
    result = train_student(student, teacher, data, ["kd"], cfg, progress=False, initial_record=False,
                           param_groups=[{"params": [w]}, {"params": [b], "lr": 7.0}])
    lrs = [r["lr"] for r in result.records]
    expected = [0.2 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / 4)).item()) for s in range(1, 5)]
    assert lrs == pytest.approx(expected, abs=1e-6) and lrs[-1] == pytest.approx(0.0, abs=1e-9)


def test_checkpoint_format_and_old_checkpoints(tmp_path):
    model = nn.Linear(3, 2)
    write_checkpoint(tmp_path / "new.pt", model, {"epoch": 2})
    state, meta = read_checkpoint(tmp_path / "new.pt")
    assert meta == {"format": CHECKPOINT_FORMAT, "format_version": 1, "epoch": 2}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.save({"model": model.state_dict(), "zkd": {"kind": "distilled-student", "epoch": 1}}, tmp_path / "old.pt")
    state, meta = read_checkpoint(tmp_path / "old.pt")
    assert meta["format_version"] == 0 and meta["epoch"] == 1 and set(state) == {"weight", "bias"}
    obj = torch.load(tmp_path / "new.pt", weights_only=True)
    obj["zkd"]["format_version"] = 2
    torch.save(obj, tmp_path / "future.pt")
    with pytest.raises(ZkdError, match="unknown distill checkpoint format version 2"):
        read_checkpoint(tmp_path / "future.pt")


def test_old_and_new_distill_checkpoints_load_as_teachers(tmp_path):
    from zeroshot_kd import load_teacher
    from zeroshot_kd.models import cifar_resnet

    card = {"architecture": {"builder": "zeroshot_kd.models:cifar_resnet", "depth": 8, "width": 2,
                             "in_channels": 1, "num_classes": 10},
            "input_spec": {"channels": 1, "image_size": 8, "mean": [0.5], "std": [0.5], "num_classes": 10}}
    torch.manual_seed(0)
    net = cifar_resnet(8, 2, in_channels=1, num_classes=10)
    torch.save({"model": net.state_dict(), "zkd": {"kind": "distilled-student"}}, tmp_path / "old.pt")
    write_checkpoint(tmp_path / "new.pt", net, {"kind": "distilled-student"})
    x = torch.randn(2, 1, 8, 8)
    for name in ("old", "new"):
        (tmp_path / f"{name}.json").write_text(json.dumps(card))
        loaded = load_teacher(str(tmp_path / f"{name}.pt"))
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x), net.eval()(x))


def test_calibrate_fine_tuning_advances_the_objectives_epoch(small_net):
    """Defect: calibrate's fine-tuning never advanced the epoch, so IFM's critical-period weights never decayed."""
    from zeroshot_kd.data import FASHION_MNIST_SPEC
    from zeroshot_kd.quant.modules import QuantConfig
    from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student
    from zeroshot_kd.teachers import Teacher, state_sha256

    teacher = Teacher(small_net.requires_grad_(False), FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(small_net))
    spy = EpochSpy()
    # 42 images: the guard holds out 10, fine-tuning runs on the 32 others = 2 batches of 16 per epoch
    opts = CalibrationOptions("gaussian:42", num_images=42, holdout=0, batch_size=16, candidates=5,
                              finetune_steps=5, progress=False)
    res = calibrate_student(teacher, QuantConfig(8, 8), opts, torch.device("cpu"),
                            objectives=ObjectiveSet([spy, *build(["ifm"]).items]))
    assert [e for e, _ in spy.seen] == [0, 0, 1, 1, 2] and spy.set_epochs == [0, 1, 2]
    ifm = res.report["finetune"]
    assert [r["epoch"] for r in ifm] == [3] and "ifm" in ifm[-1]


def _calibrate(tmp_path, data):
    out = tmp_path / "s.pt"
    r = CliRunner().invoke(cli, ["calibrate", "--data", data, "--bits", "8", "--num-images", "32", "--holdout", "16",
                                 "--batch-size", "16", "--candidates", "5", "--probe-iterations", "20", "--device",
                                 "cpu", "-q", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return r.output, json.loads((tmp_path / "report.json").read_text()), (tmp_path / "report.md").read_text()


def test_calibrate_says_calibration_set_agreement_without_held_out_images(tmp_path):
    """Defect: with --data no larger than --num-images the agreement was computed on calibration images but
    printed as held-out."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out, report, md = _calibrate(tmp_path / "a", "gaussian:32")
    assert not report["heldout_is_separate"] and report["settings"]["heldout_images"] == 0
    line = [ln for ln in out.splitlines() if ln.startswith("W8A8:")][0]
    assert "calibration-set agreement (no held-out images)" in line and "held-out agreement" not in line
    assert report["agreement_label"] == "calibration-set agreement (no held-out images)"
    assert "calibration-set agreement (no held-out images) on 16 calibration images" in md
    out, report, md = _calibrate(tmp_path / "b", "gaussian:48")
    line = [ln for ln in out.splitlines() if ln.startswith("W8A8:")][0]
    assert report["heldout_is_separate"] and "held-out agreement" in line and "calibration-set" not in line
    assert "held-out agreement on 16 held-out images" in md
