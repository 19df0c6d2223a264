"""Registry, spec parsing, error messages, layer addressing, weighting, gradients, and the runner + training loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zeroshot_kd.errors import ZkdError
from zeroshot_kd.models import cifar_resnet
from zeroshot_kd.objectives import KDBatch, ObjectiveRunner, build, describe, get, names, parse_spec
from zeroshot_kd.objectives.capture import FeatureCapture, resolve_layers


pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ["kd", "ce", "ls", "tfkd-reg", "tfkd-self", "cskd", "kdcl", "bss", "sp", "rkd", "fsp", "ofd", "ifm", "pkt"]


def test_registry_names_and_descriptions():
    assert names() == ALL
    for n in ALL:
        d = describe(n)
        assert d["summary"] and "weight" in d["params"]


def test_cli_help_lists_every_objective():
    from cli.distill import OBJECTIVE_HELP

    assert all(n in OBJECTIVE_HELP for n in ALL)


def test_parse_spec():
    assert parse_spec("rkd:weight=1.0,distance_weight=25") == ("rkd", {"weight": "1.0", "distance_weight": "25"})
    assert parse_spec("kd") == ("kd", {})
    assert parse_spec(" sp : layers=layer2+layer3 ") == ("sp", {"layers": "layer2+layer3"})
    for bad in ("", ":T=4", "kd:T", "kd:T=1,T=2", "kd:=3"):
        with pytest.raises(ZkdError):
            parse_spec(bad)


def test_errors_are_one_line_and_list_what_is_valid():
    with pytest.raises(ZkdError) as e:
        get("kdd")
    assert "kdd" in str(e.value) and "rkd" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ZkdError) as e:
        get("rkd", temperature=4)
    assert "temperature" in str(e.value) and "distance_weight" in str(e.value)
    with pytest.raises(ZkdError, match="not a float"):
        build(["kd:T=hot"])
    with pytest.raises(ZkdError, match="use one of: naive, linear, minlogit"):
        get("kdcl", ensemble="mean")
    with pytest.raises(ZkdError, match="T must be > 0"):
        get("kd", T=0)
    student, teacher = cifar_resnet(8, 4), cifar_resnet(8, 8)
    with pytest.raises(ZkdError) as e:
        get("sp", layers="layer9").bind(student, teacher)
    msg = str(e.value)
    assert "layer9" in msg and "layer3.0.relu2" in msg and "\n" not in msg
    with pytest.raises(ZkdError, match="2 student layers"):
        get("sp", student_layers="layer2+layer3", teacher_layers="layer3").bind(student, teacher)


def test_keywords_resolve_on_cifar_and_torchvision_resnets():
    import torchvision

    net = cifar_resnet(14, 4)
    assert resolve_layers(net, ["stages"]) == ["layer1", "layer2", "layer3"]
    assert resolve_layers(net, ["stem", "last-stage", "penultimate"]) == ["layer1@in", "layer3", "fc@in"]
    assert resolve_layers(net, ["preact"]) == ["layer1.1.relu2@in", "layer2.1.relu2@in", "layer3.1.relu2@in"]
    tv = torchvision.models.resnet18(num_classes=10).eval()
    assert resolve_layers(tv, ["preact"])[-1] == "layer4.1.relu@in"
    cap = FeatureCapture(tv, ["layer4.1.relu@in", "layer4", "fc@in"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tv(x)
    f = cap.features
    # torchvision's block calls one ReLU twice: the last call's input is the pre-activation sum, read before the
    # in-place ReLU overwrites it (relu(captured) == output would hold for a post-ReLU capture too)
    with torch.no_grad():
        blk, h = tv.layer4[1], tv.layer4[0](tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.bn1(tv.conv1(x)).relu())))))
        pre = blk.bn2(blk.conv2(blk.bn1(blk.conv1(h)).relu())) + h
    assert pre.min().item() < 0
    assert torch.allclose(f["layer4.1.relu@in"], pre, atol=1e-5)
    assert torch.allclose(f["layer4.1.relu@in"].relu(), f["layer4"])
    assert torch.allclose(f["fc@in"], f["layer4"].mean((2, 3)), atol=1e-6)
    cap.close()
    assert not tv.layer4[1].relu._forward_hooks and not tv.layer4[1].relu._forward_pre_hooks


def test_weights_combine_and_duplicate_names_get_suffixes():
    s = torch.randn(4, 5, dtype=torch.float64)
    t = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    combo = build(["kd:T=2,weight=0.9", "ce:weight=0.1", "kd:T=1,weight=2"])
    loss, terms = combo(KDBatch(student_logits=s, teacher_logits=t, labels=y))
    kd2 = 4 * F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")
    kd1 = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    expected = 0.9 * kd2 + 0.1 * F.cross_entropy(s, y) + 2 * kd1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert set(terms) == {"kd", "ce", "kd#2", "loss"}
    assert terms["kd#2"] == pytest.approx(2 * kd1.item(), rel=1e-12)


CALIBRATE_SPECS = ["kd", "ce", "ls", "tfkd-reg", "tfkd-self:teacher=main", "bss", "sp", "rkd", "fsp", "ofd", "ifm",
                   "pkt"]


def test_gradients_reach_the_student_only():
    torch.manual_seed(0)
    student = cifar_resnet(8, 4)
    teacher = cifar_resnet(8, 8)          # deliberately NOT frozen: the objectives must detach its outputs
    teacher.eval()
    x = torch.randn(8, 1, 28, 28)
    objset = build(CALIBRATE_SPECS)
    runner = ObjectiveRunner(objset, student, teacher)
    runner.setup(x)
    t = teacher(x)                        # with grad, as a careless caller might
    s = student(x)
    loss, terms = objset(runner.make_batch(s, t, x, torch.full((8,), -1)))
    assert set(CALIBRATE_SPECS[i].split(":")[0] for i in range(len(CALIBRATE_SPECS))) <= set(terms)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    extra = list(runner.extra_parameters())
    assert extra and all(p.grad is not None for p in extra)   # connectors train too
    runner.close()
    assert not any(m._forward_hooks for m in student.modules())
    assert not any(m._forward_hooks for m in teacher.modules())


def test_runner_reruns_the_teacher_when_its_features_are_stale():
    torch.manual_seed(0)
    student, teacher = cifar_resnet(8, 4), cifar_resnet(8, 8).eval().requires_grad_(False)
    x1, x2 = torch.randn(6, 1, 28, 28), torch.randn(6, 1, 28, 28)
    objset = build(["sp:weight=1"])
    runner = ObjectiveRunner(objset, student, teacher)
    t2 = teacher(x2)
    teacher(x1)                           # a cached-logits caller: the last teacher forward was another batch
    s2 = student(x2)
    loss, _ = objset(runner.make_batch(s2, t2, x2))
    feats = {}
    with torch.no_grad():
        h1 = student.layer3.register_forward_hook(lambda m, a, o: feats.__setitem__("s", o))
        h2 = teacher.layer3.register_forward_hook(lambda m, a, o: feats.__setitem__("t", o))
        student(x2)
        teacher(x2)
        h1.remove()
        h2.remove()
    from zeroshot_kd.objectives.relation import sp_loss

    assert loss.item() == pytest.approx(sp_loss(feats["s"], feats["t"]).item(), rel=1e-5)
    runner.close()


def test_calibrate_fine_tuning_rejects_loop_only_objectives():
    from zeroshot_kd.quant.finetuning import finetune_objectives

    for spec in ("cskd", "kdcl"):
        with pytest.raises(ZkdError, match="zkd distill"):
            finetune_objectives([spec])
    assert [o.name for o in finetune_objectives(None, 3.0).items] == ["kd"]
    assert finetune_objectives(None, 3.0).items[0].params["T"] == 3.0


def test_runner_builds_connectors_from_the_dry_run():
    student, teacher = cifar_resnet(8, 4), cifar_resnet(8, 8).eval().requires_grad_(False)
    runner = ObjectiveRunner(build(["kd", "ofd"]), student, teacher)
    assert not runner.ready and list(runner.extra_parameters()) == []
    runner.setup(torch.randn(2, 1, 16, 16))
    assert len(list(runner.extra_parameters())) == 9   # three connectors: conv weight + BN weight and bias each
    x = torch.randn(4, 1, 16, 16)
    loss, terms = runner.objectives(runner.make_batch(student(x), teacher(x), x))
    assert terms["ofd"] > 0
    runner.close()


def test_training_loop_trains_the_connectors_in_the_same_optimizer():
    from torch.utils.data import TensorDataset

    from zeroshot_kd.training import TrainConfig, train_student

    torch.manual_seed(0)
    student, teacher = cifar_resnet(8, 4), cifar_resnet(8, 8).eval().requires_grad_(False)
    objset = build(["ofd"])
    data = TensorDataset(torch.randn(8, 1, 16, 16), torch.full((8,), -1))
    cfg = TrainConfig(steps=2, batch_size=4, lr=0.1, optimizer="adam", weight_decay=0.0, schedule="constant")
    seen: list = []
    orig = torch.optim.AdamW.__init__

    def spy(self, params, *a, **k):
        seen.append(params)
        orig(self, params, *a, **k)

    torch.optim.AdamW.__init__ = spy
    snapshots: list = []
    try:
        result = train_student(student, teacher, data, objset, cfg, progress=False, after_step=lambda: snapshots.append(
            [p.detach().clone() for p in objset.parameters() if p.requires_grad]))
    finally:
        torch.optim.AdamW.__init__ = orig
    connectors = [p for p in objset.parameters() if p.requires_grad]   # built by the loop's dry run
    assert result.steps == 2 and len(connectors) == 9 and len(seen) == 1
    ids = {id(p) for g in seen[0] for p in g["params"]}
    assert {id(p) for p in connectors} <= ids and {id(p) for p in student.parameters()} <= ids   # one optimizer
    assert all(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))   # the 2nd step moved them
