"""Registry, spec parsing, error messages, layer addressing, weighting, gradients and the calibrate loss_fn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zeroshot_kd.errors import ZkdError
from zeroshot_kd.models import cifar_resnet
from zeroshot_kd.objectives import KDBatch, build, describe, get, make_loss_fn, names, parse_spec
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
    fn = make_loss_fn(CALIBRATE_SPECS, student, teacher, example_inputs=x)
    t = teacher(x)                        # with grad, as a careless caller might
    s = student(x)
    loss, terms = fn(s, t, x, torch.full((8,), -1))
    assert set(CALIBRATE_SPECS[i].split(":")[0] for i in range(len(CALIBRATE_SPECS))) <= set(terms)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert fn.parameters() and all(p.grad is not None for p in fn.parameters())   # connectors train too
    fn.close()
    assert not any(m._forward_hooks for m in student.modules())
    assert not any(m._forward_hooks for m in teacher.modules())


def test_loss_fn_reruns_the_teacher_when_its_features_are_stale():
    torch.manual_seed(0)
    student, teacher = cifar_resnet(8, 4), cifar_resnet(8, 8).eval().requires_grad_(False)
    x1, x2 = torch.randn(6, 1, 28, 28), torch.randn(6, 1, 28, 28)
    fn = make_loss_fn(["sp:weight=1"], student, teacher)
    t2 = teacher(x2)
    teacher(x1)                           # a cached-logits caller: the last teacher forward was another batch
    s2 = student(x2)
    loss, _ = fn(s2, t2, x2, None)
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
    fn.close()


def test_make_loss_fn_rejects_loop_only_objectives():
    student, teacher = cifar_resnet(8, 4), cifar_resnet(8, 8)
    for spec in ("cskd", "kdcl"):
        with pytest.raises(ZkdError, match="zkd distill"):
            make_loss_fn([spec], student, teacher)


def test_loss_fn_unbound_logit_objectives_and_late_binding():
    s = torch.randn(4, 10, dtype=torch.float64)
    t = torch.randn(4, 10, dtype=torch.float64)
    fn = make_loss_fn(["kd:T=2", "ce:weight=0.5"])
    loss, terms = fn(s, t, torch.zeros(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]))
    expected = 4 * F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") + \
        0.5 * F.cross_entropy(s, torch.tensor([1, 2, 3, 4]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    late = make_loss_fn(["kd", "ofd"])
    with pytest.raises(ZkdError, match="bind"):
        late(s, t, torch.zeros(4, 1, 8, 8), None)
    student, teacher = cifar_resnet(8, 4), cifar_resnet(8, 8).eval().requires_grad_(False)
    late.bind(student, teacher, torch.randn(2, 1, 16, 16))
    assert len(late.parameters()) == 9          # three connectors: conv weight + BN weight and bias each
    x = torch.randn(4, 1, 16, 16)
    loss, terms = late(student(x), teacher(x), x, None)
    assert terms["ofd"] > 0
    late.close()


def test_loss_fn_own_lr_trains_the_connectors():
    torch.manual_seed(0)
    student, teacher = cifar_resnet(8, 4), cifar_resnet(8, 8).eval().requires_grad_(False)
    x = torch.randn(4, 1, 16, 16)
    fn = make_loss_fn(["ofd"], student, teacher, example_inputs=x, own_lr=0.1)
    before = [p.detach().clone() for p in fn.parameters()]
    for _ in range(2):
        loss, _ = fn(student(x), teacher(x), x, None)
        loss.backward()
    assert all(not torch.equal(a, p) for a, p in zip(before, fn.parameters()))
    fn.close()
