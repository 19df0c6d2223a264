"""Fake-quant math: equality with torch's kernels, clipped STE / LSQ gradients, range searches, AdaRound."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import spy_rand

from zeroshot_kd.quant.calibrate import qparams_from_range, search_act_qparams, search_weight_qparams
from zeroshot_kd.quant.fakequant import FakeQuantizer, bernoulli_mask, int_range, rectified_sigmoid, sqnr_db
from zeroshot_kd.quant.modules import QuantConv2d


def weight_quantizer(channels: int, bits: int, asym: bool) -> FakeQuantizer:
    qmin, qmax = int_range(bits, signed=not asym)
    return FakeQuantizer(bits, qmin, qmax, symmetric=not asym, axis=0, channels=channels, kind="weight")


def test_int_ranges():
    assert int_range(4, signed=True) == (-7, 7)
    assert int_range(4, signed=True, narrow=False) == (-8, 7)
    assert int_range(4, signed=False) == (0, 15)
    assert int_range(8, signed=True) == (-127, 127)
    assert int_range(2, signed=False) == (0, 3)
    with pytest.raises(ValueError):
        FakeQuantizer(9, 0, 511, True)


@pytest.mark.parametrize("bits, asym", [(4, False), (4, True), (3, False), (8, True)])
def test_per_channel_matches_torch(bits, asym):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 3, 3, 3, generator=g)
    fq = weight_quantizer(6, bits, asym)
    scale = torch.rand(6, generator=g) * 0.2 + 0.01
    zp = torch.randint(fq.qmin, fq.qmax + 1, (6,), generator=g).float() if asym else None
    fq.set_qparams(scale, zp)
    # exact ties: values on half-steps must round half-to-even like torch's nearbyint
    w[0, 0, 0, :] = torch.tensor([0.5, 1.5, 2.5]) * fq.scale[0]
    ref = torch.fake_quantize_per_channel_affine(w, fq.scale.detach(), fq.zero_point.int(), 0, fq.qmin, fq.qmax)
    assert torch.equal(fq(w), ref)
    w.requires_grad_(True)  # the STE path must give the same forward values
    assert torch.equal(fq(w).detach(), ref)


@pytest.mark.parametrize("zp", [0, 5])
def test_per_tensor_matches_torch(zp):
    g = torch.Generator().manual_seed(zp)
    x = torch.randn(4, 8, 5, 5, generator=g) * 2
    fq = FakeQuantizer(4, 0, 15, symmetric=(zp == 0))
    fq.set_qparams(torch.tensor([0.13]), torch.tensor([float(zp)]))
    ref = torch.fake_quantize_per_tensor_affine(x, 0.13, zp, 0, 15)
    assert torch.equal(fq(x), ref)
    # 0.0 maps exactly to 0.0
    assert fq(torch.zeros(3)).abs().max().item() == 0.0


def test_clipped_ste_and_lsq_scale_gradient():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200, generator=g) * 1.5).requires_grad_(True)
    fq = FakeQuantizer(4, 0, 15, symmetric=False)
    fq.set_qparams(torch.tensor([0.1]), torch.tensor([3.0]))
    fq.scale.requires_grad_(True)
    upstream = torch.randn(200, generator=g)
    (fq(x) * upstream).sum().backward()
    s, z = 0.1, 3.0
    with torch.no_grad():
        y = x * (1.0 / torch.tensor(s))
        code = torch.round(y) + z
        inside = (code >= 0) & (code <= 15)
        # clipped STE for x: 1 inside the grid (bounds included, as torch's fake-quant mask), 0 where clamped
        assert torch.equal(x.grad == 0, ~inside | (upstream == 0))
        torch.testing.assert_close(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
        assert bool(((code == 0) | (code == 15)).any())  # the bounds are exercised
        # LSQ: d/ds = round(x/s) - x/s inside, q_min - z / q_max - z outside, times g = 1/sqrt(N * q_max)
        clipped = torch.where(code < 0, torch.tensor(0 - z), torch.tensor(15 - z))
        local = torch.where(inside, torch.round(y) - y, clipped)
        expected = (upstream * local).sum() / math.sqrt(200 * 15)
    assert fq.scale.grad.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_per_channel_scale_gradient_uses_per_channel_count():
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    fq = weight_quantizer(4, 4, asym=False)
    fq.set_qparams(torch.full((4,), 0.2))
    fq.scale.requires_grad_(True)
    fq(w).sum().backward()
    with torch.no_grad():
        y = w / 0.2
        code = torch.round(y)
        local = torch.where(code.abs() <= 7, code - y, torch.sign(code) * 7)
        expected = local.sum(1) / math.sqrt(10 * 7)
    torch.testing.assert_close(fq.scale.grad, expected, rtol=1e-4, atol=1e-6)


def test_qparams_represent_zero_exactly():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        lo, hi = -torch.rand(1, generator=g) * 3, torch.rand(1, generator=g) * 5
        s, z = qparams_from_range(lo, hi, 0, 15, symmetric=False)
        assert z.item() == round(z.item()) and 0 <= z.item() <= 15
        assert ((torch.clamp(torch.round(torch.zeros(1) / s) + z, 0, 15) - z) * s).item() == 0.0


def test_asymmetric_3bit_grid_misses_both_ends_of_a_zero_centred_channel():
    # docs/quantization.md (--w-asym): [0, 7] with 0.0 exact on [-1, 1] has step 2/7, so its levels are multiples of
    # 2/7 and +-1 (odd multiples of 1/7) land 1/7 off; the symmetric narrow grid [-3, 3] (step 1/3) keeps both.
    s, z = qparams_from_range(torch.tensor([-1.0]), torch.tensor([1.0]), 0, 7, symmetric=False)
    assert s.item() == pytest.approx(2 / 7) and z.item() in (3, 4)
    ends = torch.tensor([[1.0, -1.0]])
    asym = weight_quantizer(1, 3, asym=True)
    asym.set_qparams(s, z)
    assert (asym(ends) - ends).abs()[0].tolist() == pytest.approx([1 / 7, 1 / 7])
    sym = weight_quantizer(1, 3, asym=False)
    sym.set_qparams(qparams_from_range(torch.tensor([-1.0]), torch.tensor([1.0]), -3, 3, symmetric=True)[0])
    assert sym(ends)[0].tolist() == pytest.approx([1.0, -1.0])


def _brute_force_weight(w, qmin, qmax, p, n):
    """Independent per-channel search: loop over channels and candidate ratios one by one."""
    scales = []
    for c in range(w.shape[0]):
        row = w[c].flatten().double()
        amax = row.abs().max().item()
        best = (math.inf, None)
        for k in range(1, n + 1):
            s = amax * k / n / qmax
            err = sum(abs(v - max(qmin, min(qmax, round(v / s))) * s) ** p for v in row.tolist())
            if err < best[0] - 1e-12:
                best = (err, s)
        scales.append(best[1])
    return torch.tensor(scales)


def test_weight_lp_search_matches_brute_force_and_beats_minmax():
    w = torch.randn(3, 12, generator=torch.Generator().manual_seed(5))
    w[0, 0] = 4.0  # an outlier: clipping pays off
    s, z = search_weight_qparams(w, -7, 7, symmetric=True, method="lp", p=2.4, candidates=20)
    assert torch.equal(z, torch.zeros(3))
    torch.testing.assert_close(s, _brute_force_weight(w, -7, 7, 2.4, 20).float(), rtol=1e-5, atol=1e-7)
    s_mm, _ = search_weight_qparams(w, -7, 7, symmetric=True, method="minmax")
    torch.testing.assert_close(s_mm, w.abs().amax(1) / 7)
    assert s[0] < s_mm[0]  # the outlier channel is clipped


def test_activation_search_unsigned_and_signed():
    g = torch.Generator().manual_seed(2)
    relu = torch.randn(5000, generator=g).clamp_min(0)
    s, z, signed = search_act_qparams(relu, 0.0, relu.max().item(), 0, 15, "mse", candidates=50)
    assert not signed and z.item() == 0
    # brute force over the same candidates
    errs = []
    for k in range(1, 51):
        sc = relu.max().item() * k / 50 / 15
        errs.append((((relu / sc).round().clamp(0, 15) * sc - relu) ** 2).sum().item())
    best_k = min(range(50), key=lambda i: (errs[i], -i)) + 1
    assert s.item() == pytest.approx(relu.max().item() * best_k / 50 / 15, rel=1e-5)
    x = torch.randn(5000, generator=g)
    s2, z2, signed2 = search_act_qparams(x, x.min().item(), x.max().item(), 0, 15, "minmax")
    assert signed2 and s2.item() == pytest.approx((x.max() - x.min()).item() / 15, rel=1e-6)
    assert z2.item() == round(-x.min().item() / s2.item())
    s3, _, _ = search_act_qparams(relu, 0.0, relu.max().item(), 0, 15, "percentile", percentile=99.0)
    assert s3.item() == pytest.approx(torch.quantile(relu, 0.99).item() / 15, rel=1e-5)


def test_depthwise_conv_matches_torch_kernels():
    g = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(8, 1, 3, 3, generator=g))
    q = QuantConv2d.from_float(conv, 4, 4, w_asym=False)
    q.wq.set_qparams(q.weight.detach().abs().amax((1, 2, 3)) / 7)
    q.set_act_signed(True)
    q.aq.set_qparams(torch.tensor([0.3]), torch.tensor([7.0]))
    x = torch.randn(2, 8, 6, 6, generator=g)
    w_ref = torch.fake_quantize_per_channel_affine(conv.weight, q.wq.scale.detach(), torch.zeros(8, dtype=torch.int32),
                                                   0, -7, 7)
    x_ref = torch.fake_quantize_per_tensor_affine(x, 0.3, 7, 0, 15)
    with torch.no_grad():
        ref = F.conv2d(x_ref, w_ref, conv.bias, padding=1, groups=8)
        assert torch.equal(q(x), ref)


def test_adaround_init_and_hard_rounding():
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(6))
    fq = weight_quantizer(4, 4, asym=False)
    fq.set_qparams(w.abs().amax(1) / 7)
    fq.start_adaround(w)
    y = w * (1.0 / fq.scale.detach().view(-1, 1))  # the kernel's x * (1 / s)
    frac = y - torch.floor(y)
    torch.testing.assert_close(rectified_sigmoid(fq.adaround), frac.clamp(1e-4, 1 - 1e-4), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        fq.adaround.copy_(torch.where(torch.arange(9) % 2 == 0, 1.0, -1.0).expand(4, 9))
    weight = torch.nn.Parameter(w.clone())
    fq.finish_adaround(weight)
    expected_codes = torch.clamp(torch.floor(y) + (torch.arange(9) % 2 == 0).float(), -7, 7)
    assert fq.adaround is None
    assert torch.equal(fq.quantize(weight), expected_codes)
    # plain fake quantization of the finished weight gives back those codes' values
    torch.testing.assert_close(fq(weight), expected_codes * fq.scale.detach().view(-1, 1))


def test_sqnr():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == math.inf


def test_qdrop_masks_are_drawn_on_the_tensors_device_and_seeded(monkeypatch):
    q = FakeQuantizer(4, 0, 15, symmetric=True)
    q.set_qparams(torch.tensor([0.1]))
    x = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(0))
    q.drop_prob = 0.5
    calls = spy_rand(monkeypatch)
    q.drop_generator = torch.Generator(device=x.device).manual_seed(7)
    out = q(x)
    assert calls == [(x.device, x.device)]         # drawn where x lives, not on the CPU and copied
    # the mask is the generator's stream: the same seed gives the same output; each element is x or its code
    q.drop_generator = torch.Generator(device=x.device).manual_seed(7)
    assert torch.equal(q(x), out)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, (8,), generator=torch.Generator().manual_seed(7))
    keep_q = words.view(torch.uint8)[:60].view(x.shape) < 128  # the mask's rule, written out: byte < 256 (1 - p)
    q.drop_prob = 0.0
    torch.testing.assert_close(out, torch.where(keep_q, q(x), x), rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.5, 0.1, 0.9, 0.3])
def test_bernoulli_mask_frequency(p):
    g = torch.Generator().manual_seed(int(p * 100))
    m = bernoulli_mask((1000, 1000), p, g, "cpu")
    # True with probability round(256 p) / 256; binomial sd of the mean is < 5e-4 at 1e6 draws
    assert m.float().mean().item() == pytest.approx(round(256 * p) / 256, abs=2.5e-3)
    assert bernoulli_mask((3, 7), 0.0, g, "cpu").sum() == 0 and bernoulli_mask((3, 7), 1.0, g, "cpu").all()
    # odd sizes: the last partial word is cut, not reused
    assert bernoulli_mask((5, 3), p, torch.Generator().manual_seed(1), "cpu").shape == (5, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qdrop_masks_with_a_cuda_generator():
    q = FakeQuantizer(4, 0, 15, symmetric=True).cuda()
    x = torch.rand(64, 8, device="cuda")
    q.drop_prob = 0.5
    q.drop_generator = torch.Generator(device="cuda").manual_seed(1)
    a = q(x)
    q.drop_generator = torch.Generator(device="cuda").manual_seed(1)
    assert torch.equal(a, q(x))
