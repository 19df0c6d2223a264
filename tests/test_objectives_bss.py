"""BSS: schedules, target sampling, base selection and the attack step against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zeroshot_kd.objectives import KDBatch, get
from zeroshot_kd.objectives.adversarial import bss_attack, bss_select, bss_targets


pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedules_match_the_code():
    obj = get("bss")
    # alpha(n) = max(3 (1 - n/N), 0) + 1 ; beta(n) = max(2 (1 - 4n / 3N), 0)
    for p in (0.0, 0.1, 0.375, 0.5, 0.75, 0.9, 1.0):
        a, b = obj.schedule(p)
        assert a == pytest.approx(max(3 * (1 - p), 0) + 1)
        assert b == pytest.approx(max(2 * (1 - 4 * p / 3), 0))


def test_target_sampling_frequencies():
    q = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64).repeat(20000, 1)
    k = bss_targets(q, torch.Generator().manual_seed(0))
    assert not bool((k == 0).any())                                   # never the top-1 class
    freq = torch.bincount(k, minlength=4).double() / len(k)
    expected = torch.tensor([0.0, 0.3 / 0.5, 0.15 / 0.5, 0.05 / 0.5], dtype=torch.float64)  # q / (1 - max q)
    assert torch.allclose(freq, expected, atol=0.015)


def test_base_selection_keeps_both_correct_and_largest_disagreement():
    t = torch.tensor([[5.0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]], dtype=torch.float64)
    s = torch.tensor([[1.0, 0.9, 0], [3, 0, 0], [0, 1, 0], [5, 0, 0], [0, 5, 0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 0])
    # rows 3 (student wrong) and 4 (student wrong) are excluded
    assert bss_select(s, t, y, 10).tolist() == [0, 1, 2]
    diff = (F.softmax(t, 1) - F.softmax(s, 1)) ** 2
    score = [sum(diff[i, c].item() for c in range(3) if c != y[i]) for i in range(3)]
    top2 = sorted(sorted(range(3), key=lambda i: -score[i])[:2])
    assert bss_select(s, t, y, 2).tolist() == top2


def test_attack_step_on_a_linear_teacher():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 2.0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]]))
    x0 = torch.tensor([[3.0, 1.0, 0.5, 0.0, 0, 0], [0.2, 0.0, 2.0, 0, 0, 0]], dtype=torch.float64)
    b, k = torch.tensor([0, 2]), torch.tensor([1, 0])
    x1 = bss_attack(lin, x0, b, k, steps=1, step_alpha=0.3)
    W = lin.weight.detach()
    for i in range(2):
        f = W @ x0[i]
        loss_k = (f[b[i]] - f[k[i]]).item()                         # L_k = f_b - f_k
        grad = W[b[i]] - W[k[i]]                                      # its gradient for a linear model
        expected = x0[i] - 0.3 * (loss_k + 1e-4) * grad / grad.norm()
        assert torch.allclose(x1[i], expected, atol=1e-12)
    # a sample already pushed off its class b stops moving (eta = 0); the range clamp applies
    flipped = bss_attack(lin, x0, torch.tensor([1, 2]), k, steps=3, step_alpha=0.3)
    assert torch.equal(flipped[0], x0[0])                             # argmax(x0[0]) = 0 != b = 1
    assert not torch.equal(flipped[1], x0[1])
    clamped = bss_attack(lin, x0, torch.tensor([1, 2]), k, steps=3, step_alpha=0.3, lo=-1.0, hi=1.0)
    assert torch.equal(clamped[0], x0[0].clamp(-1, 1))                # the clamp applies every step, as in the code
    assert float(clamped[1].abs().max()) <= 1.0


def test_bss_value_after_the_boundary_term_ends():
    s = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    T, p = 3.0, 0.8                                                   # beta = 0 past 75 %
    alpha = 1 + 3 * (1 - p)
    kl = 0.0
    for i in range(4):
        pt = F.softmax(t[i] / T, 0).tolist()
        ps = F.softmax(s[i] / T, 0).tolist()
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    expected = F.cross_entropy(s, y).item() + alpha * kl / 4       # no T^2 in BSS
    got = get("bss")(KDBatch(student_logits=s, teacher_logits=t, labels=y, progress=p))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_bss_runs_the_attack_and_trains_on_it():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3)).double().eval().requires_grad_(False)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3)).double()
    with torch.no_grad():
        student[1].weight.copy_(teacher[1].weight + 0.05 * torch.randn(3, 8, dtype=torch.float64))
        student[1].bias.copy_(teacher[1].bias)
    x = torch.randn(16, 1, 2, 4, dtype=torch.float64)
    t = teacher(x)
    obj = get("bss", steps=3)
    loss = obj(KDBatch(student_logits=student(x), teacher_logits=t, inputs=x, student=student, teacher=teacher,
                       progress=0.0, seed=3))
    terms = obj.extra_terms()
    assert terms["adv"] > 0                                           # boundary samples were found and used
    loss.backward()
    assert student[1].weight.grad is not None and teacher[1].weight.grad is None
