"""Logit-level objectives against independent float64 computations of their formulas (explicit loops)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zeroshot_kd.errors import ZkdError
from zeroshot_kd.objectives import KDBatch, get
from zeroshot_kd.objectives.collaborative import ensemble_linear, ensemble_minlogit, ensemble_naive
from zeroshot_kd.objectives.logit import kd_loss, tfkd_reg_loss


pytestmark = pytest.mark.usefixtures("one_thread")

B, K = 5, 4


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def _softmax(row, T=1.0):
    m = max(v / T for v in row)
    e = [math.exp(v / T - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _ce(row, y):
    return -math.log(_softmax(row)[y])


def _rows(x):
    return x.tolist()


def test_kd_batchmean_times_T2_and_mean_is_C_times_smaller():
    s, t, T = _rand(B, K, seed=1), _rand(B, K, seed=2), 3.0
    expected = T * T * sum(_kl(_softmax(tr, T), _softmax(sr, T)) for sr, tr in zip(_rows(s), _rows(t))) / B
    got = get("kd", T=T)(KDBatch(student_logits=s, teacher_logits=t))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)
    mean = kd_loss(s, t, T, "mean")
    assert (got / mean).item() == pytest.approx(K, rel=1e-12)   # the KLDivLoss() pitfall: 'mean' divides by B*K
    assert kd_loss(s, s, T).item() == pytest.approx(0.0, abs=1e-12)


def test_ce_uses_labels_and_teacher_top1_for_unknown():
    s, t = _rand(B, K, seed=3), _rand(B, K, seed=4)
    labels = torch.tensor([2, -1, 0, -1, 3])
    y = [2, int(t[1].argmax()), 0, int(t[3].argmax()), 3]
    expected = sum(_ce(r, yi) for r, yi in zip(_rows(s), y)) / B
    got = get("ce")(KDBatch(student_logits=s, teacher_logits=t, labels=labels))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ZkdError, match="labels"):
        get("ce")(KDBatch(student_logits=s, labels=labels))


def test_label_smoothing_both_modes():
    s, y, eps = _rand(B, K, seed=5), torch.tensor([0, 1, 2, 3, 1]), 0.2
    expected = 0.0
    for r, yi in zip(_rows(s), y.tolist()):
        p = _softmax(r)
        q = [1 - eps if k == yi else eps / (K - 1) for k in range(K)]
        expected -= sum(qk * math.log(pk) for qk, pk in zip(q, p))
    got = get("ls", eps=eps)(KDBatch(student_logits=s, labels=y))
    assert got.item() == pytest.approx(expected / B, rel=1e-12)
    torch_ls = F.cross_entropy(s, y, label_smoothing=eps)
    assert get("ls", eps=eps, mode="pytorch")(KDBatch(student_logits=s, labels=y)).item() == pytest.approx(
        torch_ls.item(), rel=1e-12)
    assert abs(got.item() - torch_ls.item()) > 1e-4   # the two smoothings really differ


def test_tfkd_reg_code_form_is_near_uniform_and_matches_formula():
    # the reference notes: a=0.99, T=20, K=100 -> target-class probability 0.0105 against uniform 0.0100
    z = torch.zeros(1, 100, dtype=torch.float64)
    y = torch.tensor([7])
    p_target = math.exp(0.99 / 20) / (math.exp(0.99 / 20) + 99 * math.exp(0.01 / 99 / 20))
    assert p_target == pytest.approx(0.0105, abs=5e-5)
    # with a uniform student the code-form KL is KL(target || uniform); check it through the loss
    tgt = [p_target if k == 7 else (1 - p_target) / 99 for k in range(100)]
    assert tfkd_reg_loss(z, y, 0.99, 20.0, "code").item() == pytest.approx(_kl(tgt, [0.01] * 100), rel=1e-9)

    s, y = _rand(B, K, seed=6), torch.tensor([1, 0, 3, 2, 2])
    a, T, alpha, mult = 0.9, 4.0, 0.3, 100.0
    ce = reg_code = reg_direct = 0.0
    for r, yi in zip(_rows(s), y.tolist()):
        p_d = [a if k == yi else (1 - a) / (K - 1) for k in range(K)]
        ce += _ce(r, yi)
        reg_code += _kl(_softmax(p_d, T), _softmax(r))          # softmax of PROBABILITIES / T, student at T=1
        reg_direct += _kl(p_d, _softmax(r, T))
    batch = KDBatch(student_logits=s, labels=y)
    got = get("tfkd-reg", a=a, T=T, alpha=alpha, multiplier=mult, reduction="mean")(batch)
    assert got.item() == pytest.approx((1 - alpha) * ce / B + alpha * mult * reg_code / (B * K), rel=1e-12)
    got = get("tfkd-reg", a=a, T=T, alpha=alpha, form="direct")(batch)
    assert got.item() == pytest.approx((1 - alpha) * ce / B + alpha * reg_direct / B, rel=1e-12)


def test_tfkd_self_uses_a_frozen_copy_of_the_starting_student():
    torch.manual_seed(0)
    student = torch.nn.Linear(3, K).double()
    x, y = _rand(B, 3, seed=7), torch.tensor([0, 1, 2, 3, 0])
    start = student(x).detach()
    obj = get("tfkd-self", alpha=0.6, T=2.0)
    obj.bind(student, None)
    with torch.no_grad():
        student.weight.add_(0.5)                      # the student moves on; the self-teacher must not
    s = student(x)
    expected = 0.0
    for sr, tr, yi in zip(_rows(s.detach()), _rows(start), y.tolist()):
        expected += 0.4 * _ce(sr, yi) + 0.6 * 4.0 * _kl(_softmax(tr, 2.0), _softmax(sr, 2.0))
    got = obj(KDBatch(student_logits=s, inputs=x, labels=y))
    assert got.item() == pytest.approx(expected / B, rel=1e-12)
    got.backward()
    assert student.weight.grad is not None
    main = get("tfkd-self", teacher="main", alpha=0.6, T=2.0)
    got_main = main(KDBatch(student_logits=s.detach(), teacher_logits=start, labels=y))
    assert got_main.item() == pytest.approx(expected / B, rel=1e-12)


def test_tfkd_self_default_never_reads_the_runs_teacher_logits():
    torch.manual_seed(0)
    student = torch.nn.Linear(3, K).double()
    x, y = _rand(B, 3, seed=7), torch.tensor([0, 1, 2, 3, 0])
    start = student(x).detach()
    other = _rand(B, K, seed=11)                      # the run's teacher logits: not the self-teacher
    obj = get("tfkd-self", alpha=0.6, T=2.0)          # unbound, default teacher=copy
    with pytest.raises(ZkdError, match="teacher=main") as e:
        obj(KDBatch(student_logits=start, teacher_logits=other, inputs=x, labels=y))
    assert "\n" not in str(e.value)
    # given the student, the first forward copies it (its starting weights) and keeps that copy
    s = student(x)
    got = obj(KDBatch(student_logits=s, teacher_logits=other, inputs=x, labels=y, student=student))
    with torch.no_grad():
        student.weight.add_(0.5)
    s2 = student(x)
    got2 = obj(KDBatch(student_logits=s2, teacher_logits=other, inputs=x, labels=y, student=student))
    for logits, value in ((s, got), (s2, got2)):
        expected = sum(0.4 * _ce(sr, yi) + 0.6 * 4.0 * _kl(_softmax(tr, 2.0), _softmax(sr, 2.0))
                       for sr, tr, yi in zip(_rows(logits.detach()), _rows(start), y.tolist())) / B
        assert value.item() == pytest.approx(expected, rel=1e-12)


def test_cskd_value_and_no_gradient_through_the_pair():
    s, p = _rand(B, K, seed=8).requires_grad_(True), _rand(B, K, seed=9).requires_grad_(True)
    y, T, lam = torch.tensor([3, 2, 1, 0, 0]), 4.0, 3.0
    expected = sum(_ce(sr, yi) + lam * T * T * _kl(_softmax(pr, T), _softmax(sr, T))
                   for sr, pr, yi in zip(_rows(s.detach()), _rows(p.detach()), y.tolist())) / B
    got = get("cskd", T=T, lamda=lam)(KDBatch(student_logits=s, pair_logits=p, labels=y))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got.backward()
    assert s.grad is not None and p.grad is None
    with pytest.raises(ZkdError, match="pair"):
        get("cskd")(KDBatch(student_logits=s, labels=y))


def test_kdcl_ensembles_by_hand():
    z1 = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[1.0, 4.0, 0.0], [1.0, 1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    # minlogit: z_i - z_i[y], elementwise min
    expect = torch.tensor([[min(2 - 2, 1 - 1), min(1 - 2, 4 - 1), min(0 - 2, 0 - 1)],
                           [min(0 - 1, 1 - 2), min(3 - 1, 1 - 2), min(1 - 1, 2 - 2)]], dtype=torch.float64)
    m = ensemble_minlogit([z1, z2], y)
    assert torch.equal(m, expect)
    ce = lambda z: [_ce(r, yi) for r, yi in zip(_rows(z), y.tolist())]  # noqa: E731
    assert all(a <= min(b, c) + 1e-12 for a, b, c in zip(ce(m), ce(z1), ce(z2)))
    # naive: per sample the lowest-CE member
    n = ensemble_naive([z1, z2], y)
    c1, c2 = ce(z1), ce(z2)
    assert torch.equal(n[0], z1[0] if c1[0] <= c2[0] else z2[0])
    assert torch.equal(n[1], z1[1] if c1[1] <= c2[1] else z2[1])
    # linear: simplex weights; never worse than the best member, strictly better when members err differently
    w, lin = ensemble_linear([z1, z2], y)
    assert w.min() >= 0 and w.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(lin, w[0] * z1 + w[1] * z2)
    ce_lin = F.cross_entropy(lin, y).item()
    assert ce_lin < min(F.cross_entropy(z1, y).item(), F.cross_entropy(z2, y).item()) - 1e-3


def _grid_ce(zs, y, weights):
    """CE of sum_i w_i z_i for each row of ``weights`` (G, M), in float64."""
    stack = torch.stack([z.double() for z in zs])
    ens = torch.einsum("gm,mbk->gbk", weights.double(), stack)
    return -torch.log_softmax(ens, 2).gather(2, y.view(1, -1, 1).expand(len(weights), -1, 1)).squeeze(2).mean(1)


@pytest.mark.parametrize("seed", [0, 2, 3, 4])
def test_kdcl_linear_ensemble_reaches_the_grid_optimum(seed):
    # B=8, K=10, logits randn*3: exponentiated gradient with a fixed step of 1 oscillated and ended on a vertex
    # (seed 3: w=[1, 0], CE 5.14, where the optimum w1=0.551 gives 3.35 and the uniform average 3.38)
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    w, lin = ensemble_linear([z1, z2], y)
    a = torch.linspace(0, 1, 10001, dtype=torch.float64)
    grid = _grid_ce([z1, z2], y, torch.stack([a, 1 - a], 1))
    got = F.cross_entropy(lin.double(), y).item()
    assert got <= grid.min().item() + 1e-5
    assert w[0].item() == pytest.approx(a[grid.argmin()].item(), abs=2e-3)
    assert torch.allclose(lin, w[0] * z1 + w[1] * z2)


def test_kdcl_linear_ensemble_three_members_against_a_simplex_grid():
    g = torch.Generator().manual_seed(5)
    zs = [torch.randn(8, 10, generator=g, dtype=torch.float64) * 3 for _ in range(3)]
    y = torch.randint(0, 10, (8,), generator=g)
    w, lin = ensemble_linear(zs, y)
    n = 100
    pts = torch.tensor([(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)])
    grid = _grid_ce(zs, y, pts)
    assert w.min() >= 0 and w.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert F.cross_entropy(lin, y).item() <= grid.min().item() + 1e-9


def test_kdcl_member_losses_and_peers():
    obj = get("kdcl", members=2, ensemble="minlogit", T=2.0, lamda=0.5, augment="none")
    student = torch.nn.Linear(3, K).double()
    obj.bind(student, None)
    peer = obj.peers[0]
    assert not torch.equal(peer.weight, student.weight)          # a fresh initialization, not a copy
    x, y = _rand(B, 3, seed=10), torch.tensor([0, 1, 2, 3, 1])
    zs, zp = student(x), peer(x)
    zt = ensemble_minlogit([zs, zp], y)
    expected = 0.0
    for z in (zs, zp):
        for r, tr, yi in zip(_rows(z.detach()), _rows(zt), y.tolist()):
            expected += (_ce(r, yi) + 0.5 * 4.0 * _kl(_softmax(tr, 2.0), _softmax(r, 2.0))) / B
    got = obj(KDBatch(student_logits=zs, inputs=x, labels=y))
    assert got.item() == pytest.approx(expected, rel=1e-10)
    got.backward()
    assert student.weight.grad is not None and peer.weight.grad is not None
