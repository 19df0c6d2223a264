"""Adaptive DeepInversion: rounds of synthesis against the current student, KD steps between them, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import Subset

from cli.main import cli
from zeroshot_kd.distill import build_student
from zeroshot_kd.errors import ZkdError
from zeroshot_kd.shards import ShardDataset
from zeroshot_kd.synthesis import SynthesisConfig, get_method, optimize_batch, synthesize
from zeroshot_kd.synthesis import engine
from zeroshot_kd.training import TrainConfig, read_checkpoint, train_student

STUDENT = "cifar-resnet:8x4"
# 2 rounds of one 8-image batch each, 3 synthesis iterations, 3 KD steps per round
LOOP = dict(method="adi", num_images=16, batch_size=8, iterations=3, device="cpu", progress=False, seed=0,
            student=STUDENT, rounds=2, distill_steps=3, distill_batch_size=8)


class Stop(Exception):
    pass


def _files(out) -> dict[str, bytes]:
    """Every output a later step reads: shards, round checkpoints and the final student."""
    names = sorted(p.name for p in out.glob("shard-*.tar")) + ["student.pt"]
    files = {n: (out / n).read_bytes() for n in names}
    files.update({p.name: p.read_bytes() for p in sorted((out / ".parts").glob("student-round-*.pt"))})
    return files


@pytest.fixture(scope="module")
def full_run(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("adi") / "full"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as the tests that rerun it (CPU reductions depend on it)
    try:
        manifest = synthesize(out, teacher=teacher, **LOOP)
    finally:
        torch.set_num_threads(before)
    return out, manifest


def test_resume_after_round_one_gives_identical_bytes(teacher, full_run, tmp_path, monkeypatch, one_thread):
    full, _ = full_run
    out = tmp_path / "resumed"
    original = engine._train_round
    stops = [0]

    def stop_after_round_one(out_, r, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        rec = original(out_, r, *args, **kw)
        if r == 0 and not stops[0]:
            stops[0] = 1
            raise Stop
        return rec

    monkeypatch.setattr(engine, "_train_round", stop_after_round_one)
    with pytest.raises(Stop):
        synthesize(out, teacher=teacher, **LOOP)
    assert not (out / "manifest.json").exists() and not (out / "student.pt").exists()
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]
    import zeroshot_kd.training as training

    tags: list[str] = []
    train = training.train_student
    monkeypatch.setattr(training, "train_student", lambda *a, **kw: tags.append(kw["tag"]) or train(*a, **kw))
    synthesize(out, teacher=teacher, resume=True, **LOOP)
    assert tags == ["adi-round1"]  # round 0's student was restored from its checkpoint, not trained again
    a, b = _files(full), _files(out)
    assert list(a) == ["shard-000000.tar", "shard-000001.tar", "student.pt", "student-round-000.pt",
                       "student-round-001.pt"]
    assert a == b


def test_round_two_competes_against_the_student_after_round_one(teacher, full_run, one_thread):
    out, manifest = full_run
    initial, _ = build_student(STUDENT, teacher, seed=0)
    after_one, meta = read_checkpoint(out / ".parts" / "student-round-000.pt")
    assert meta["round"] == 0
    assert any(not torch.equal(v, after_one[k]) for k, v in initial.state_dict().items() if v.is_floating_point())
    # the same training done directly: TrainConfig from the options, round 0's tag, on batch 0 as stored
    direct = copy.deepcopy(initial)
    data = Subset(ShardDataset(out), range(8))
    train_student(direct, teacher.model, data, ["kd"], TrainConfig(steps=3, batch_size=8, lr=0.05, seed=0),
                  spec=teacher.spec, initial_record=False, progress=False, tag="adi-round0")
    assert all(torch.equal(v, after_one[k]) for k, v in direct.state_dict().items())
    # round 2's batch (batch 1) is exactly what optimize_batch makes against that student, not the initial one
    m = get_method("adi")
    cfg = SynthesisConfig("adi", 16, 8, 0, "balanced", m.hyperparameters({"iterations": 3}))
    stored = torch.stack([ShardDataset(out)[i][0] for i in range(8, 16)])
    vs_trained = optimize_batch(teacher.model, teacher.spec, m, cfg, 1, torch.device("cpu"), direct.eval())
    vs_initial = optimize_batch(teacher.model, teacher.spec, m, cfg, 1, torch.device("cpu"), initial.eval())
    assert torch.equal(vs_trained.images.half().float(), stored)
    assert not torch.equal(vs_initial.images.half().float(), stored)
    # the final student is round 1's, loadable as a teacher spec (card beside it)
    from zeroshot_kd import load_teacher

    final, _ = read_checkpoint(out / "student.pt")
    last, _ = read_checkpoint(out / ".parts" / "student-round-001.pt")
    assert all(torch.equal(v, last[k]) for k, v in final.items())
    loaded = load_teacher(str(out / "student.pt"))
    assert all(torch.equal(v, last[k]) for k, v in loaded.model.state_dict().items())
    assert [r["images"] for r in manifest["adaptive"]["rounds_log"]] == [8, 16]


def test_one_round_equals_the_fixed_snapshot(teacher, tmp_path, one_thread):
    student, _ = build_student(STUDENT, teacher, seed=0)
    student.eval()
    common = dict(method="adi", num_images=8, batch_size=8, iterations=3, device="cpu", progress=False)
    synthesize(tmp_path / "fixed", teacher=teacher, student=copy.deepcopy(student), **common)
    synthesize(tmp_path / "one", teacher=teacher, student=student, rounds=1, distill_steps=2, distill_batch_size=4,
               **common)
    shard = "shard-000000.tar"
    assert (tmp_path / "fixed" / shard).read_bytes() == (tmp_path / "one" / shard).read_bytes()
    assert not (tmp_path / "fixed" / "student.pt").exists() and (tmp_path / "one" / "student.pt").is_file()
    # --overwrite with a fixed snapshot leaves no stale student of the previous adaptive run behind
    synthesize(tmp_path / "one", teacher=teacher, student=copy.deepcopy(student), overwrite=True, **common)
    assert not (tmp_path / "one" / "student.pt").exists() and not (tmp_path / "one" / "student.json").exists()
    # a module student is copied, never trained in place
    fresh, _ = build_student(STUDENT, teacher, seed=0)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    (dict(rounds=0, distill_steps=1), "--rounds must be at least 1"),
    (dict(rounds=2, distill_steps=0), "--rounds 2 needs --distill-steps"),
    (dict(rounds=3, distill_steps=1), "--rounds 3 needs at least 3 batches"),
    (dict(distill_steps=-1), "--distill-steps must be >= 0"),
    (dict(method="deepinversion", distill_steps=2), "only apply to --method adi"),
    (dict(distill_steps=2, student=None), "--distill-steps needs --student"),
    (dict(distill_steps=2, distill_objectives=["nope"]), "unknown objective"),
])
def test_bad_options_are_one_line_errors(teacher, tmp_path, kwargs, message):
    args = {**LOOP, "num_images": 16, **kwargs}
    with pytest.raises(ZkdError, match=message) as e:
        synthesize(tmp_path / "x", teacher=teacher, **args)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["--method", "deepinversion", "--distill-steps", "2"], "--distill-steps only apply to --method adi"),
    (["--method", "adi", "--student", STUDENT, "--rounds", "0"], "--rounds must be at least 1"),
])
def test_cli_bad_options(tmp_path, args, message):
    r = CliRunner().invoke(cli, ["synthesize", "--out", str(tmp_path / "x"), "--num-images", "8", "--batch-size",
                                 "4", "--iterations", "1", "--device", "cpu", "-q", *args])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.output
    assert not (tmp_path / "x").exists()


def test_cli_adaptive_run_writes_the_student(teacher, tmp_path, one_thread):
    """The CLI and the Python API make the same bytes (shards and student) for the same adaptive options."""
    import json

    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["synthesize", "--out", str(out), "--method", "adi", "--student", STUDENT,
                                 "--num-images", "8", "--batch-size", "4", "--iterations", "2", "--device", "cpu",
                                 "--rounds", "2", "--distill-steps", "2", "--distill-batch-size", "4",
                                 "--distill-objective", "kd:T=2", "-q", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert [rec["images"] for rec in summary["adaptive"]["rounds_log"]] == [4, 8]
    assert summary["adaptive"]["objectives"] == ["kd:T=2"]
    synthesize(tmp_path / "api", teacher=teacher, method="adi", student=STUDENT, num_images=8, batch_size=4,
               iterations=2, device="cpu", progress=False, rounds=2, distill_steps=2, distill_batch_size=4,
               distill_objectives=["kd:T=2"])
    for name in ["shard-000000.tar", "shard-000001.tar", "student.pt"]:
        assert (out / name).read_bytes() == (tmp_path / "api" / name).read_bytes(), name
