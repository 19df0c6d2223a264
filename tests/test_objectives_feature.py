"""Feature and relation objectives (SP, RKD, PKT, IFM, FSP, OFD) against loop computations in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zeroshot_kd.objectives import KDBatch, get
from zeroshot_kd.objectives.feature import fsp_loss, ofd_loss, ofd_margin
from zeroshot_kd.objectives.relation import ifm_layer_loss, pkt_loss, rkd_angle, rkd_distance, sp_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _flat(x):
    return x.reshape(x.shape[0], -1).tolist()


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _norm(a):
    return math.sqrt(_dot(a, a))


def _huber(d):
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def _batch(objective, s_feats, t_feats, epoch=0):
    objective.s_keys, objective.t_keys = list(s_feats), list(t_feats)
    return KDBatch(student_logits=torch.zeros(2, dtype=torch.float64), student_features=s_feats,
                   teacher_features=t_feats, epoch=epoch)


# --------------------------------------------------------------------------------------------------------------- SP
def _sp_loop(fs, ft):
    b = len(fs)

    def gram(f):
        g = [[_dot(f[i], f[j]) for j in range(b)] for i in range(b)]
        return [[v / max(_norm(row), 1e-12) for v in row] for row in g]     # row-wise L2 after the product

    gs, gt = gram(fs), gram(ft)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b ** 2


def test_sp_formula_and_normalization_order():
    s, t = _rand(4, 3, 2, 2, seed=1).relu(), _rand(4, 5, 2, 2, seed=2).relu()
    expected = _sp_loop(_flat(s), _flat(t))
    assert sp_loss(s, t).item() == pytest.approx(expected, rel=1e-12)
    obj = get("sp")
    assert obj.weight == 3000.0
    assert obj(_batch(obj, {"a": s}, {"b": t})).item() == pytest.approx(expected, rel=1e-12)
    # normalizing the features before the product (RepDistiller issue #45) gives other numbers
    wrong = sp_loss(F.normalize(s.flatten(1), dim=1), F.normalize(t.flatten(1), dim=1)).item()
    assert abs(wrong - expected) > 1e-3


# -------------------------------------------------------------------------------------------------------------- RKD
def _rkd_loop(fs, ft):
    b = len(fs)

    def dist(f):
        d = [[0.0 if i == j else math.sqrt(max(sum((x - y) ** 2 for x, y in zip(f[i], f[j])), 1e-12))
              for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))  # mean over pairs i != j
        return [[v / mu for v in row] for row in d]

    ds, dt = dist(fs), dist(ft)
    l_d = sum(_huber(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b ** 2

    def unit(v):
        n = _norm(v)
        return [x / n for x in v] if n > 1e-12 else [0.0] * len(v)

    def angles(f):
        return [_dot(unit([a - c for a, c in zip(f[j], f[i])]), unit([a - c for a, c in zip(f[k], f[i])]))
                for i in range(b) for j in range(b) for k in range(b)]

    a_s, a_t = angles(fs), angles(ft)
    l_a = sum(_huber(x - y) for x, y in zip(a_s, a_t)) / b ** 3
    return l_d, l_a


@pytest.mark.parametrize("duplicate", [False, True])
def test_rkd_distance_and_angle(duplicate):
    s, t = _rand(5, 4, seed=3), _rand(5, 6, seed=4) * 3
    if duplicate:                       # duplicate rows: zero distance (clamped to 1e-6), degenerate angles
        s[3] = s[1]
        t[4] = t[0]
    l_d, l_a = _rkd_loop(s.tolist(), t.tolist())
    assert rkd_distance(s, t).item() == pytest.approx(l_d, rel=1e-9, abs=1e-12)
    assert rkd_angle(s, t).item() == pytest.approx(l_a, rel=1e-9, abs=1e-12)
    obj = get("rkd")
    got = obj(_batch(obj, {"a": s}, {"b": t}))
    assert got.item() == pytest.approx(25 * l_d + 50 * l_a, rel=1e-9)
    assert obj.extra_terms()["distance"] == pytest.approx(l_d, rel=1e-9)


def test_rkd_is_scale_invariant_and_zero_for_identical_relations():
    s = _rand(6, 4, seed=5)
    assert rkd_distance(s, 7.0 * s).item() == pytest.approx(0.0, abs=1e-12)
    assert rkd_angle(s, 7.0 * s).item() == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------------- PKT and IFM
def _cond_probs(f, kernel, eps):
    b = len(f)
    if kernel == "cosine":
        unit = [[x / (_norm(r) + eps) for x in r] for r in f]
        k = [[(_dot(unit[i], unit[j]) + 1) / 2 for j in range(b)] for i in range(b)]
    else:
        k = [[1 / (1 + math.sqrt(max(sum((x - y) ** 2 for x, y in zip(f[i], f[j])), 0) + 1e-6)) for j in range(b)]
             for i in range(b)]
    return [[v / sum(row) for v in row] for row in k]


def test_pkt_formula_with_zero_rows():
    s, t = _rand(5, 3, seed=6), _rand(5, 7, seed=7).relu()
    s[2] = 0.0                          # zero rows: cosine kernel 1/2 against everything -> uniform row
    t[0] = 0.0
    ps, pt = _cond_probs(s.tolist(), "cosine", 1e-7), _cond_probs(t.tolist(), "cosine", 1e-7)
    assert ps[2] == pytest.approx([0.2] * 5, rel=1e-12)
    eps = 1e-7
    expected = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(5) for j in range(5)) / 25
    assert pkt_loss(s, t).item() == pytest.approx(expected, rel=1e-10)
    nan = s.clone()
    nan[4, 0] = float("nan")            # the reference's NaN -> 0 path keeps the loss finite
    assert math.isfinite(pkt_loss(nan, t).item())
    obj = get("pkt")
    assert obj.weight == 30000.0
    assert obj(_batch(obj, {"a": s}, {"b": t})).item() == pytest.approx(expected, rel=1e-10)


def _jeffreys(pt, ps):
    b = len(pt)
    return sum((pt[i][j] - ps[i][j]) * (math.log(pt[i][j]) - math.log(ps[i][j]))
               for i in range(b) for j in range(b)) / b ** 2


def test_ifm_layer_loss_and_critical_period_weights():
    s1, t1 = _rand(4, 2, 3, 3, seed=8), _rand(4, 5, 3, 3, seed=9)
    s2, t2 = _rand(4, 6, seed=10), _rand(4, 3, seed=11)

    def layer(s, t):
        fs, ft = _flat(s), _flat(t)
        return (_jeffreys(_cond_probs(ft, "cosine", 1e-6), _cond_probs(fs, "cosine", 1e-6))
                + _jeffreys(_cond_probs(ft, "t", 0), _cond_probs(fs, "t", 0)))

    l1, l2 = layer(s1, t1), layer(s2, t2)
    assert ifm_layer_loss(s1, t1).item() == pytest.approx(l1, rel=1e-10)
    obj = get("ifm", alpha_initial=100, gamma=0.7)
    got = obj(_batch(obj, {"a": s1, "b": s2}, {"c": t1, "d": t2}, epoch=2))
    assert obj.layer_weights(2) == pytest.approx([100 * 0.49, 1.0])
    assert got.item() == pytest.approx(100 * 0.7 ** 2 * l1 + l2, rel=1e-10)
    assert ifm_layer_loss(s2, s2.clone()).item() == pytest.approx(0.0, abs=1e-15)


# -------------------------------------------------------------------------------------------------------------- FSP
def _gram_loop(bot, top):
    b, ci, h, w = bot.shape
    cj = top.shape[1]
    return [[[sum(top[n, j, y, x].item() * bot[n, i, y, x].item() for y in range(h) for x in range(w)) / (h * w)
              for i in range(ci)] for j in range(cj)] for n in range(b)]


def test_fsp_matrices_pairs_and_pooling():
    s = [_rand(2, 3, 4, 4, seed=12), _rand(2, 3, 4, 4, seed=13), _rand(2, 2, 2, 2, seed=14)]
    t = [_rand(2, 3, 4, 4, seed=15), _rand(2, 3, 4, 4, seed=16), _rand(2, 2, 2, 2, seed=17)]

    def pool(x):  # 4x4 -> 2x2 by averaging 2x2 blocks
        return x.reshape(*x.shape[:2], 2, 2, 2, 2).mean(dim=(3, 5))

    expected = 0.0
    for i in range(2):
        bot_s, top_s, bot_t, top_t = s[i], s[i + 1], t[i], t[i + 1]
        if bot_s.shape[-1] != top_s.shape[-1]:
            bot_s, bot_t = pool(bot_s), pool(bot_t)
        gs, gt = _gram_loop(bot_s, top_s), _gram_loop(bot_t, top_t)
        flat = [(a - c) ** 2 for n in range(2) for ra, rc in zip(gs[n], gt[n]) for a, c in zip(ra, rc)]
        expected += sum(flat) / len(flat)
    assert fsp_loss(s, t).item() == pytest.approx(expected, rel=1e-12)


def test_fsp_two_stage_schedule_is_exclusive_then_off():
    combo = __import__("zeroshot_kd.objectives", fromlist=["build"]).build(["fsp:init_steps=2", "ce"])
    fsp = combo.items[0]
    s = [_rand(2, 3, 4, 4, seed=20), _rand(2, 3, 4, 4, seed=21)]
    t = [_rand(2, 3, 4, 4, seed=22), _rand(2, 3, 4, 4, seed=23)]
    fsp.s_keys, fsp.t_keys = ["x", "y"], ["u", "v"]
    logits = _rand(2, 3, seed=24)

    def run(step):
        return combo(KDBatch(student_logits=logits, labels=torch.tensor([0, 1]), step=step,
                             student_features={"x": s[0], "y": s[1]}, teacher_features={"u": t[0], "v": t[1]}))

    _, first = run(1)
    _, second = run(2)
    assert first["ce"] == 0.0 and first["fsp"] == pytest.approx(fsp_loss(s, t).item(), rel=1e-12)
    assert second["fsp"] == 0.0 and second["ce"] == pytest.approx(F.cross_entropy(logits, torch.tensor([0, 1])).item())


# -------------------------------------------------------------------------------------------------------------- OFD
def _phi_cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def test_ofd_margin_closed_forms_and_fallback():
    gamma = torch.tensor([1.0, -2.0, 0.5, 1.0], dtype=torch.float64)
    beta = torch.tensor([0.0, -1.0, 0.3, 3.5], dtype=torch.float64)     # last: Phi(-3.5) = 2.3e-4 <= 0.001
    got = ofd_margin(gamma, beta).tolist()
    assert got[0] == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-12)  # E[x | x < 0] for N(0, 1)
    for c in range(3):
        s, m = abs(gamma[c].item()), beta[c].item()
        ref = -s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / _phi_cdf(-m / s) + m   # the OFD code
        assert got[c] == pytest.approx(ref, rel=1e-12)
    assert _phi_cdf(-3.5) <= 0.001
    assert got[3] == pytest.approx(-3.0, rel=1e-12)


def test_ofd_partial_l2_matches_the_loop_and_the_mdistiller_form():
    s, t = _rand(3, 4, 2, 2, seed=30), _rand(3, 4, 2, 2, seed=31)
    margin = torch.tensor([-0.5, -0.1, -1.0, -0.3], dtype=torch.float64)
    expected = 0.0
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in s.shape)).tolist():
        n, c, y, x = idx
        tp = max(t[n, c, y, x].item(), margin[c].item())
        sv = s[n, c, y, x].item()
        if sv > tp or tp > 0:
            expected += (sv - tp) ** 2
    assert ofd_loss(s, t, margin).item() == pytest.approx(expected, rel=1e-12)
    m = margin.view(1, -1, 1, 1)
    mdist = ((s - m) ** 2 * ((s > m) & (t <= m)) + (s - t) ** 2 * ((s > t) & (m < t) & (t <= 0))
             + (s - t) ** 2 * (t > 0)).sum()
    assert ofd_loss(s, t, margin).item() == pytest.approx(mdist.item(), rel=1e-12)


def test_ofd_objective_reduction_layer_weights_and_connector():
    from zeroshot_kd.models import cifar_resnet
    from zeroshot_kd.objectives.runner import ObjectiveRunner
    from zeroshot_kd.objectives import build

    torch.manual_seed(0)
    student, teacher = cifar_resnet(8, 4), cifar_resnet(8, 8).eval().requires_grad_(False)
    combo = build(["ofd"])
    runner = ObjectiveRunner(combo, student, teacher)
    obj = combo.items[0]
    assert obj.s_keys == ["layer1.0.relu2@in", "layer2.0.relu2@in", "layer3.0.relu2@in"]
    x = torch.randn(4, 1, 28, 28)
    runner.setup(x[:2])
    assert [c[0].weight.shape[:2] for c in obj.connectors] == [(8, 4), (16, 8), (32, 16)]
    t = teacher(x)
    s = student(x)
    sf, tf = runner.take_features()
    got = obj(KDBatch(student_logits=s, teacher_logits=t, student_features=sf, teacher_features=tf))
    expected = 0.0
    for i, (a, b) in enumerate(zip(obj.s_keys, obj.t_keys)):
        bn = teacher.get_submodule(f"layer{i + 1}.0.bn2")
        margin = ofd_margin(bn.weight, bn.bias).float()
        expected += ofd_loss(obj.connectors[i](sf[a]), tf[b], margin).item() / 2 ** (2 - i)
    assert got.item() == pytest.approx(expected / 4, rel=1e-5)
    # the pre-ReLU capture really is the block's sum before its final ReLU
    assert torch.allclose(tf["layer3.0.relu2@in"].relu(), teacher.layer3(teacher.layer2(teacher.layer1(
        teacher.relu(teacher.bn1(teacher.conv1(x)))))), atol=1e-6)
    runner.close()


def _tv_block_preact(block, h):
    """torchvision BasicBlock's sum before its final ReLU, computed without in-place operations."""
    out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(h)))))
    return out + (block.downsample(h) if block.downsample is not None else h)


def test_ofd_reads_pre_relu_features_on_torchvision_resnets():
    """torchvision's ReLU(inplace=True) overwrites its input: a capture after the module saw post-ReLU values."""
    import torchvision

    from zeroshot_kd.objectives import build
    from zeroshot_kd.objectives.runner import ObjectiveRunner

    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)
    student = torchvision.models.resnet18(num_classes=10)
    combo = build(["ofd"])
    runner = ObjectiveRunner(combo, student, teacher)
    obj = combo.items[0]
    assert obj.t_keys[0] == "layer1.1.relu@in"
    x = torch.randn(2, 3, 32, 32)
    runner.setup(x)
    teacher(x)
    _, tf = runner.take_features()
    runner.close()
    with torch.no_grad():
        h = teacher.maxpool(F.relu(teacher.bn1(teacher.conv1(x))))
        h = teacher.layer1[0](h)
        pre = _tv_block_preact(teacher.layer1[1], h)
    assert pre.min().item() < -0.5                        # a real pre-activation has negative values
    assert torch.allclose(tf["layer1.1.relu@in"], pre, atol=1e-5)

