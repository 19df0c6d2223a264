"""BatchNorm statistics hooks and the divergences on them, against direct computations and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from zeroshot_kd.bn import BNStats, BNStatsHook, bn_layers, bns_kl_loss, deepinversion_feature_loss, gaussian_kl, require_bn
from zeroshot_kd.errors import ZkdError


@pytest.mark.parametrize("frozen", [True, False], ids=["fused-eval-bn", "forward-hook"])
def test_hook_statistics_equal_direct_computation(small_net, frozen):
    small_net.requires_grad_(not frozen)  # a frozen eval-mode BN is fused; a trainable one gets a forward hook
    x = torch.randn(6, 1, 12, 12)
    # Direct: capture each BN input with a separate mechanism (a forward pre-hook), compute mean/var by hand.
    inputs = {}
    handles = [bn.register_forward_pre_hook(lambda m, args, _n=name: inputs.__setitem__(_n, args[0].detach().clone()))
               for name, bn in bn_layers(small_net)]
    with BNStatsHook(small_net) as hook:
        assert all(("forward" in vars(bn)) == frozen for _, bn in bn_layers(small_net))
        small_net(x)
    for h in handles:
        h.remove()
    assert [s.name for s in hook.stats] == list(inputs)  # execution order
    for s in hook.stats:
        t = inputs[s.name].double()
        c = t.shape[1]
        flat = t.transpose(0, 1).reshape(c, -1)
        mean = flat.sum(1) / flat.shape[1]
        var = ((flat - mean[:, None]) ** 2).sum(1) / flat.shape[1]  # biased, as BN normalizes with
        torch.testing.assert_close(s.mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.var.double(), var, rtol=1e-5, atol=1e-6)
        assert s.mean.dtype == torch.float32


def test_fused_path_same_output_and_input_gradient_as_plain_autograd(small_net):
    """The fused eval BN gives the module's exact output, and the gradient of (stats loss + output loss) that plain
    autograd gives through the module and a float64 computation of the statistics."""
    net = small_net.double().requires_grad_(False)
    x = torch.randn(4, 1, 10, 10, dtype=torch.float64)
    plain = net(x)
    x1 = x.clone().requires_grad_(True)
    with BNStatsHook(net) as hook:
        out = net(x1)
        loss = bns_kl_loss(hook.stats, 3.0) + deepinversion_feature_loss(hook.stats) + out.square().sum()
    assert torch.equal(out.detach(), plain)
    (grad,) = torch.autograd.grad(loss, x1)
    # Reference: capture BN inputs with pre-hooks, statistics by autograd on the textbook formulas.
    x2 = x.clone().requires_grad_(True)
    captured = []
    handles = [bn.register_forward_pre_hook(lambda m, args, _bn=bn: captured.append((_bn, args[0])))
               for _, bn in bn_layers(net)]
    out2 = net(x2)
    for h in handles:
        h.remove()
    from zeroshot_kd.bn import BNStat

    ref_stats = [BNStat(str(i), t.mean((0, 2, 3)), t.var((0, 2, 3), unbiased=False), bn.running_mean, bn.running_var,
                        bn.eps) for i, (bn, t) in enumerate(captured)]
    ref_loss = bns_kl_loss(ref_stats, 3.0) + deepinversion_feature_loss(ref_stats) + out2.square().sum()
    (ref,) = torch.autograd.grad(ref_loss, x2)
    torch.testing.assert_close(loss.detach(), ref_loss.detach())
    # float64 both ways; elements near zero are sums of large terms that cancel, hence atol relative to the scale
    torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-9 * ref.abs().max().item())


def test_fused_eval_batchnorm_gradcheck():
    from zeroshot_kd.bn import _EvalBatchNormWithMoments

    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    scale = w / (rv + 1e-5).sqrt()
    assert torch.autograd.gradcheck(lambda t: _EvalBatchNormWithMoments.apply(t, rm, rv, w, b, 1e-5, scale), (x,))
    unit = 1 / (rv + 1e-5).sqrt()
    assert torch.autograd.gradcheck(lambda t: _EvalBatchNormWithMoments.apply(t, rm, rv, None, None, 1e-5, unit),
                                    (x,))


def test_trainable_or_training_bn_keeps_its_own_forward(small_net):
    small_net.requires_grad_(False)
    bns = [bn for _, bn in bn_layers(small_net)]
    bns[0].train()
    bns[1].weight.requires_grad_(True)
    with BNStatsHook(small_net):
        assert "forward" not in vars(bns[0]) and "forward" not in vars(bns[1])
        assert all("forward" in vars(bn) for bn in bns[2:])
    assert all("forward" not in vars(bn) for bn in bns)  # restored on exit


def test_stacked_statistics_match_the_per_layer_list(small_net):
    small_net.requires_grad_(False)
    with BNStatsHook(small_net) as hook:
        small_net(torch.randn(3, 1, 8, 8))
    stats = hook.stats
    layers = list(stats)
    assert [s.name for s in layers] == stats.names and [s.mean.numel() for s in layers] == stats.sizes
    restacked = BNStats.stack(layers)
    for key in ("mean", "var", "running_mean", "running_var", "eps"):
        assert torch.equal(getattr(restacked, key), getattr(stats, key))
    assert bns_kl_loss(layers).item() == pytest.approx(bns_kl_loss(stats).item(), rel=1e-6)


def test_deepinversion_feature_loss_gradient_finite_at_an_exact_match():
    bn = _bn_with_stats([0.5, -1.0], [4.0, 0.25], eps=TINY_EPS)
    x = (torch.tensor([0.5, -1.0]).view(1, 2, 1, 1) + torch.tensor([2.0, 0.5]).view(1, 2, 1, 1)
         * torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)).requires_grad_(True)  # matches the running stats exactly
    with BNStatsHook(nn.Sequential(bn)) as hook:
        bn(x)
    loss = deepinversion_feature_loss(hook.stats)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_hook_statistics_float32_under_bf16_autocast(small_net):
    x = torch.randn(4, 1, 12, 12)
    with BNStatsHook(small_net) as hook, torch.autocast("cpu", dtype=torch.bfloat16):
        small_net(x)
    assert all(s.mean.dtype == torch.float32 and s.var.dtype == torch.float32 for s in hook.stats)


def test_hooks_removed_on_exit(small_net):
    with BNStatsHook(small_net) as hook:
        small_net(torch.randn(2, 1, 8, 8))
    n = len(hook.stats)
    small_net(torch.randn(2, 1, 8, 8))
    assert len(hook.stats) == n


def test_gaussian_kl_closed_form():
    # KL(N(0,1) || N(1,4)) = 0.5 ln 4 + (1 + 1) / 8 - 0.5
    expected = 0.5 * math.log(4) + 2 / 8 - 0.5
    got = gaussian_kl(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(4.0))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # and against torch.distributions on random values
    mu_p, mu_q = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    var_p, var_q = torch.rand(50, dtype=torch.float64) + 0.1, torch.rand(50, dtype=torch.float64) + 0.1
    ref = kl_divergence(Normal(mu_p, var_p.sqrt()), Normal(mu_q, var_q.sqrt()))
    torch.testing.assert_close(gaussian_kl(mu_p, var_p, mu_q, var_q), ref)
    # the issue's form: log(sigma_b / sigma_r) + (var_r + (mu_r - mu_b)^2) / (2 var_b) - 1/2
    issue_form = torch.log(var_q.sqrt() / var_p.sqrt()) + (var_p + (mu_p - mu_q) ** 2) / (2 * var_q) - 0.5
    torch.testing.assert_close(gaussian_kl(mu_p, var_p, mu_q, var_q), issue_form)


# Closed forms below assume eps = 0; some torch releases refuse eps <= 0 even in eval, so a negligible one.
TINY_EPS = 1e-12


def _bn_with_stats(mean, var, eps=1e-5):
    bn = nn.BatchNorm2d(len(mean), eps=eps).eval()
    bn.running_mean.copy_(torch.tensor(mean))
    bn.running_var.copy_(torch.tensor(var))
    return bn


def test_bns_kl_zero_when_statistics_match_and_known_value_otherwise():
    # A batch whose per-channel mean/biased variance we set exactly: values +-s around m.
    m, s = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.5])
    x = m.view(1, 2, 1, 1) + s.view(1, 2, 1, 1) * torch.tensor([1.0, -1.0]).view(2, 1, 1, 1).repeat(1, 1, 2, 2)
    bn = _bn_with_stats(m.tolist(), (s**2).tolist(), eps=TINY_EPS)
    with BNStatsHook(nn.Sequential(bn)) as hook:
        bn(x)
    assert bns_kl_loss(hook.stats).item() == pytest.approx(0.0, abs=1e-6)
    # running N(0, 1) per channel vs batch N(m, s^2): sum over channels of the closed form, one layer
    bn2 = _bn_with_stats([0.0, 0.0], [1.0, 1.0], eps=TINY_EPS)
    with BNStatsHook(nn.Sequential(bn2)) as hook:
        bn2(x)
    expected = sum(0.5 * math.log(sv**2) + (1 + mv**2) / (2 * sv**2) - 0.5 for mv, sv in zip(m.tolist(), s.tolist()))
    assert bns_kl_loss(hook.stats).item() == pytest.approx(expected, rel=1e-5)


def test_bns_kl_averages_layers_and_weights_first():
    stats_net = nn.Sequential(_bn_with_stats([0.0], [1.0], TINY_EPS), _bn_with_stats([1.0], [1.0], TINY_EPS))
    x = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)  # mean 0, var 1 at the first BN; BN output = x again
    with BNStatsHook(stats_net) as hook:
        stats_net(x)
    # layer 1: KL = 0; layer 2: input is BN1(x) = x (mean 0, var 1), running N(1, 1): KL = 0.5
    assert bns_kl_loss(hook.stats).item() == pytest.approx(0.25, rel=1e-5)
    assert bns_kl_loss(hook.stats, first_bn_multiplier=10).item() == pytest.approx(0.25, rel=1e-5)


def test_deepinversion_feature_loss_formula(small_net):
    x = torch.randn(5, 1, 10, 10)
    with BNStatsHook(small_net) as hook:
        small_net(x)
    expected = 0.0
    for i, s in enumerate(hook.stats):
        r = math.sqrt(((s.mean - s.running_mean) ** 2).sum().item()) + math.sqrt(((s.var - s.running_var) ** 2).sum().item())
        expected += (10.0 if i == 0 else 1.0) * r
    assert deepinversion_feature_loss(hook.stats, 10.0).item() == pytest.approx(expected, rel=1e-5)


def test_bn_loss_gradient_reaches_input(small_net):
    small_net.requires_grad_(False)
    x = torch.randn(4, 1, 10, 10, requires_grad=True)
    with BNStatsHook(small_net) as hook:
        small_net(x)
    bns_kl_loss(hook.stats).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in small_net.parameters())


def test_teacher_without_bn_is_refused():
    with pytest.raises(ZkdError, match="BatchNorm"):
        require_bn(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), "--method bns")


@pytest.mark.parametrize("contiguous", [True, False], ids=["sums", "var_mean"])
def test_channel_moments_match_autograd_on_the_textbook_formulas(contiguous):
    from zeroshot_kd.bn import _ChannelMoments

    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 2 + 0.5
    if not contiguous:  # channels_last memory takes the var_mean path
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _ChannelMoments.apply(t), (x,))
    g1, g2 = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mean, var = _ChannelMoments.apply(x)
    (grad,) = torch.autograd.grad((mean * g1).sum() + (var * g2).sum(), x)
    y = x.detach().clone().requires_grad_(True)
    ref_mean, ref_var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    (ref,) = torch.autograd.grad((ref_mean * g1).sum() + (ref_var * g2).sum(), y)
    torch.testing.assert_close(grad, ref)
