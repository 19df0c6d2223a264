"""Recipes: teacher-assistant chains (bookkeeping, resume, teacher of each stage) and Active Mixup (the black-box
teacher, the least-sure mixup selection by brute force, the query count)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from zeroshot_kd import Teacher
from zeroshot_kd.data import FASHION_MNIST_SPEC
from zeroshot_kd.errors import ZkdError
from zeroshot_kd.models import cifar_resnet
from zeroshot_kd.recipes import chain as chain_mod
from zeroshot_kd.recipes.active_mixup import (BlackBoxAccessError, BlackBoxTeacher, active_mixup, mixup_pool,
                                              select_mixup)
from zeroshot_kd.recipes.chain import chain_plan, distill_chain, stage_objectives, wider_spec
from zeroshot_kd.training import TrainConfig, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 12, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.full((n,), -1, dtype=torch.long))


def _teacher() -> Teacher:
    torch.manual_seed(0)
    return Teacher(cifar_resnet(8, 2).eval().requires_grad_(False), FASHION_MNIST_SPEC, {"spec": "tiny"})


# ---------------------------------------------------------------------------------------------------- chains


def test_wider_spec_doubles_every_width_and_refuses_where_undefined():
    assert wider_spec("cifar-resnet:8x8") == "cifar-resnet:8x16"
    assert wider_spec("cifar-resnet:14") == "cifar-resnet:14x32"          # width defaults to 16
    assert wider_spec("cifar-resnet:20x4", 3) == "cifar-resnet:20x12"
    assert wider_spec("noskip:cifar-resnet:8x8") == "noskip:cifar-resnet:8x16"
    assert wider_spec("resnet50") == "wide_resnet50_2"
    for bad in ("resnet18", "mobilenet_v2", "student.pt"):
        with pytest.raises(ZkdError, match="undefined for --student"):
            wider_spec(bad)


def test_plan_orders_stages_and_keeps_ifm_for_the_last():
    plan = chain_plan("cifar-resnet:8x4", ["cifar-resnet:14x8", "wider-of-student"], ["kd:T=4", "ifm"], "o")
    assert [(s.index, s.spec, s.objectives, s.checkpoint.name) for s in plan] == [
        (1, "cifar-resnet:14x8", ("kd:T=4",), "stage-1.pt"), (2, "cifar-resnet:8x8", ("kd:T=4",), "stage-2.pt"),
        (3, "cifar-resnet:8x4", ("kd:T=4", "ifm"), "stage-3.pt")]
    assert stage_objectives(["ifm:kernel=cosine"], last=False) == ["kd"]
    assert stage_objectives(["ifm:kernel=cosine"], last=True) == ["ifm:kernel=cosine"]


def _spy(monkeypatch):
    calls = []
    real = chain_mod._distill.distill

    def spy(teacher, student, *a, **k):
        calls.append({"teacher": {n: v.clone() for n, v in teacher.model.state_dict().items()},
                      "teacher_training": teacher.model.training,
                      "teacher_grad": any(p.requires_grad for p in teacher.model.parameters()),
                      "width": student.conv1.out_channels, "out": k["out"]})
        return real(teacher, student, *a, **k)

    monkeypatch.setattr(chain_mod._distill, "distill", spy)
    return calls


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chain_trains_in_order_each_teacher_is_the_previous_student_and_resume_skips(tmp_path, monkeypatch):
    calls = _spy(monkeypatch)
    teacher, data = _teacher(), _data()
    cfg = TrainConfig(steps=2, batch_size=6, seed=3)
    args = (teacher, "cifar-resnet:8x2", ["cifar-resnet:8x6", "cifar-resnet:8x4"], data, ["kd"], cfg, tmp_path)
    summary = distill_chain(*args, eval_data=_data(8, 1), progress=False)
    assert [c["width"] for c in calls] == [6, 4, 2]                       # assistants first, the student last
    assert [c["out"].name for c in calls] == ["stage-1.pt", "stage-2.pt", "stage-3.pt"]
    assert _same(calls[0]["teacher"], teacher.model.state_dict())
    for k in (1, 2):                                                      # teacher of stage k+1 = student of stage k
        state, meta = read_checkpoint(tmp_path / f"stage-{k}.pt")
        assert meta["step"] == 2 and _same(calls[k]["teacher"], state)
    assert not any(c["teacher_training"] or c["teacher_grad"] for c in calls)
    for k in (1, 2, 3):
        lines = (tmp_path / f"stage-{k}.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [0, 2]          # initial record, then the final one
        assert json.loads(lines[-1])["eval"] == summary["stages"][k - 1]["final"]["eval"]
    assert summary["student"] == str(tmp_path / "stage-3.pt")

    # resume after everything: nothing trains again, files untouched
    mtimes = {k: (tmp_path / f"stage-{k}.pt").stat().st_mtime_ns for k in (1, 2, 3)}
    again = distill_chain(*args, resume=True, progress=False)
    assert len(calls) == 3 and [s["skipped"] for s in again["stages"]] == [True] * 3
    assert {k: (tmp_path / f"stage-{k}.pt").stat().st_mtime_ns for k in (1, 2, 3)} == mtimes

    # interrupted after stage 1: resume trains stages 2 and 3 only, stage 2 from the *saved* stage 1
    doc = json.loads((tmp_path / "chain.json").read_text())
    doc["finished"] = doc["finished"][:1]
    (tmp_path / "chain.json").write_text(json.dumps(doc))
    stage3_before = read_checkpoint(tmp_path / "stage-3.pt")[0]
    distill_chain(*args, resume=True, progress=False)
    assert [c["width"] for c in calls[3:]] == [4, 2]
    assert _same(calls[3]["teacher"], read_checkpoint(tmp_path / "stage-1.pt")[0])
    assert (tmp_path / "stage-1.pt").stat().st_mtime_ns == mtimes[1]
    assert _same(read_checkpoint(tmp_path / "stage-3.pt")[0], stage3_before)   # same seed, same bytes

    with pytest.raises(ZkdError, match="records another chain"):
        distill_chain(teacher, "cifar-resnet:8x2", ["cifar-resnet:8x4"], data, ["kd"], cfg, tmp_path, resume=True)


def test_chain_without_assistants_is_plain_distill(tmp_path):
    from zeroshot_kd.distill import build_student, distill

    teacher, data, cfg = _teacher(), _data(), TrainConfig(steps=2, batch_size=6, seed=1)
    distill_chain(teacher, "cifar-resnet:8x2", [], data, ["kd"], cfg, tmp_path / "c", progress=False)
    model, card = build_student("cifar-resnet:8x2", teacher, seed=1)
    distill(teacher, model, data, ["kd"], cfg, out=tmp_path / "d.pt", student_card=card, progress=False)
    assert (tmp_path / "c" / "stage-1.pt").read_bytes() == (tmp_path / "d.pt").read_bytes()


# ---------------------------------------------------------------------------------------------- active mixup


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2, 3)).train()


@pytest.mark.parametrize("access", [
    lambda b: b.model, lambda b: b.parameters(), lambda b: b.state_dict(), lambda b: b.modules(),
    lambda b: b.named_buffers(), lambda b: b.__dict__, lambda b: b._BlackBoxTeacher__model, lambda b: b.eval(),
    lambda b: b(torch.zeros(1, 1, 4, 4)), lambda b: setattr(b, "x", 1), lambda b: pickle.dumps(b),
    lambda b: b.forward, lambda b: b.train(), lambda b: copy.deepcopy(b), lambda b: copy.copy(b),
])
def test_black_box_refuses_every_access_but_query(access):
    box = BlackBoxTeacher(_bn_net())
    with pytest.raises(BlackBoxAccessError):
        access(box)


def test_black_box_query_counts_and_leaks_nothing():
    net = _bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    box = BlackBoxTeacher(net, budget=7, batch_size=2)
    x = torch.randn(5, 1, 6, 6, requires_grad=True)
    p = box.query(x)
    with torch.no_grad():
        expect = torch.softmax(net.eval()(x), 1)
    assert torch.allclose(p, expect) and not p.requires_grad and p.grad_fn is None
    assert box.queries == 5 and box.remaining == 2
    assert all(q.grad is None for q in net.parameters()) and x.grad is None
    assert _same(before, net.state_dict())                # eval mode: BN running statistics untouched
    with pytest.raises(ZkdError, match="budget is 7 images; 5 used, 3 more asked"):
        box.query(torch.randn(3, 1, 6, 6))
    assert box.queries == 5


def test_select_mixup_is_the_brute_force_least_sure_pair_and_lam():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).train()
    with torch.no_grad():
        student[1].weight.copy_(torch.randn(3, 4) * 3)
    images = torch.randn(6, 1, 2, 2)
    pairs = mixup_pool(6, None, torch.Generator().manual_seed(0))
    assert sorted(pairs) == [(i, j) for i in range(6) for j in range(i + 1, 6)]
    grid = [0.1, 0.25, 0.5, 0.75, 0.9]
    brute = []
    for q, (i, j) in enumerate(pairs):                    # every pair and lam, one image at a time
        with torch.no_grad():
            scores = [(float(torch.softmax(student(lam * images[i:i + 1] + (1 - lam) * images[j:j + 1]), 1).max()),
                       lam) for lam in grid]
        s, lam = min(scores)
        brute.append((s, q, lam))
    brute.sort()
    sel = select_mixup(student, images, pairs, 4, grid, batch_size=7)
    assert sel.positions == [q for _, q, _ in brute[:4]]
    assert sel.pairs == [pairs[q] for _, q, _ in brute[:4]]
    assert sel.lams == [lam for _, _, lam in brute[:4]]
    assert sel.scores == pytest.approx([s for s, _, _ in brute[:4]], abs=1e-6)
    assert student.training                               # mode restored


@pytest.mark.parametrize("budget, rounds, expect_rounds", [(10, 3, 3), (2, 4, 2)])
def test_active_mixup_spends_exactly_the_budget(tmp_path, budget, rounds, expect_rounds):
    torch.manual_seed(0)
    teacher = cifar_resnet(8, 2).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    box = BlackBoxTeacher(teacher, budget=8 + budget)
    torch.manual_seed(1)
    student = cifar_resnet(8, 2)
    images = _data(8).tensors[0]
    res = active_mixup(box, student, images, budget, rounds, TrainConfig(epochs=1, batch_size=8), pool_size=12,
                       eval_data=_data(6, 2), metrics=tmp_path / "m.jsonl", out=tmp_path / "s.pt")
    assert box.queries == res["queries"] == 8 + budget
    assert res["rounds"] == expect_rounds
    recs = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    sizes = [budget // rounds + (1 if r < budget % rounds else 0) for r in range(rounds)]
    expect_q = [8 + sum(sizes[:r]) for r in range(expect_rounds + 1)]
    assert [r["queries"] for r in recs] == expect_q and [r["train_images"] for r in recs] == expect_q
    assert all("top1" in r["eval"] for r in recs)
    assert _same(before, teacher.state_dict()) and all(p.grad is None for p in teacher.parameters())
    assert read_checkpoint(tmp_path / "s.pt")[1]["queries"] == 8 + budget
