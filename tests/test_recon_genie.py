"""GENIE-M reconstruction and the fused LSQ/QDrop node: gradients against closed forms and finite differences,
QDrop masks drawn on the input's device from seeded generators, learned weight steps exported bit-exactly."""

from __future__ import annotations

import math

import pytest
import torch

from zeroshot_kd.data import FASHION_MNIST_SPEC
from zeroshot_kd.errors import ZkdError
from zeroshot_kd.quant.fakequant import FakeQuantizer, bernoulli_mask, rectified_sigmoid
from zeroshot_kd.quant.modules import QuantConfig, quant_layers
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student
from zeroshot_kd.quant.recon import ReconConfig, reconstruct
from zeroshot_kd.quant.student import load_student, read_student_file, save_student
from zeroshot_kd.runtime import batch_seed
from zeroshot_kd.teachers import Teacher, state_sha256

ARCH = {"builder": "zeroshot_kd.models:cifar_resnet", "kwargs": {"depth": 8, "width": 4}}


def genie_weight_quantizer(w: torch.Tensor, asym: bool) -> FakeQuantizer:
    qmin, qmax = (0, 15) if asym else (-7, 7)
    fq = FakeQuantizer(4, qmin, qmax, symmetric=not asym, axis=0, channels=w.shape[0], kind="weight")
    if asym:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        s = (hi - lo) / 15
        fq.set_qparams(s * 0.8, torch.round(-lo / s))  # a clipped grid: some codes hit the bounds
    else:
        fq.set_qparams(w.abs().amax(1) / 7 * 0.7)
    fq.start_adaround(w, learn_scale=True)
    return fq


@pytest.mark.parametrize("asym", [False, True])
def test_genie_weight_step_gradient_is_the_soft_code(asym):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 7, generator=g)
    fq = genie_weight_quantizer(w, asym)
    assert fq.scale.requires_grad and fq.adaround_base is not None
    s0 = fq.scale.detach().clone()
    base = torch.floor(w * (1.0 / s0.view(-1, 1)))
    assert torch.equal(fq.adaround_base, base)  # fixed at the calibrated step
    upstream = torch.randn(3, 7, generator=g)
    (fq(w) * upstream).sum().backward()
    z = fq.zero_point.view(-1, 1)
    with torch.no_grad():
        soft = torch.clamp(base + rectified_sigmoid(fq.adaround) + z, fq.qmin, fq.qmax)
        assert bool(((soft == fq.qmin) | (soft == fq.qmax)).any())  # clipping is exercised
        closed = (upstream * (soft - z)).sum(1)  # d w_hat / d s = (soft code - z); no LSQ gradient scale
    torch.testing.assert_close(fq.scale.grad, closed, rtol=1e-5, atol=1e-6)
    # finite differences: w_hat is linear in s once the base is fixed, so central differences are exact up to fp32
    eps = 1e-3
    for c in range(3):
        with torch.no_grad():
            fq.scale[c] += eps
            up = (fq(w) * upstream).sum()
            fq.scale[c] -= 2 * eps
            down = (fq(w) * upstream).sum()
            fq.scale[c] += eps
        assert ((up - down) / (2 * eps)).item() == pytest.approx(closed[c].item(), rel=1e-3, abs=1e-4)


def test_lsq_step_gradient_with_qdrop_mask_matches_closed_form():
    x = (torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1)) * 1.3).requires_grad_(True)
    fq = FakeQuantizer(4, 0, 15, symmetric=False)
    s, z = 0.12, 4.0
    fq.set_qparams(torch.tensor([s]), torch.tensor([z]))
    fq.scale.requires_grad_(True)
    fq.drop_prob = 0.5
    fq.drop_generator = torch.Generator(device=x.device).manual_seed(batch_seed(5, 2, "qdrop:blk"))
    upstream = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(2))
    out = fq(x)
    (out * upstream).sum().backward()
    keep = bernoulli_mask(x.shape, 0.5, torch.Generator().manual_seed(batch_seed(5, 2, "qdrop:blk")), "cpu")
    with torch.no_grad():
        y = x * (1.0 / torch.tensor(s))
        code = torch.round(y) + z
        inside = (code >= 0) & (code <= 15)
        xhat = (torch.clamp(code, 0, 15) - z) * s
        assert bool(keep.any() and (~keep).any() and (~inside).any())
        assert torch.equal(out, torch.where(keep, xhat, x))  # forward bit-identical to the definition
        # x: clipped STE where the quantized value is kept, identity where QDrop kept the float value
        torch.testing.assert_close(x.grad, torch.where(keep & ~inside, torch.zeros(()), upstream), rtol=0, atol=0)
        local = torch.where(inside, torch.round(y) - y, torch.clamp(code, 0, 15) - z)
        expected = (upstream * local * keep).sum() / math.sqrt(x.numel() * 15)
    assert fq.scale.grad.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_qdrop_mask_on_the_input_device_same_seed_same_mask():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    fq = FakeQuantizer(4, 0, 15, symmetric=True)
    fq.set_qparams(torch.tensor([0.05]))
    fq.scale.requires_grad_(True)
    fq.drop_prob = 0.5
    outs = []
    for seed in (11, 11, 12):
        fq.drop_generator = torch.Generator(device=x.device).manual_seed(batch_seed(seed, 0, "qdrop:b"))
        outs.append(fq(x))
    kept_float = [o == x for o in outs]  # where QDrop kept the float value (codes differ from x almost surely)
    assert outs[0].device == x.device
    assert torch.equal(outs[0], outs[1]) and torch.equal(kept_float[0], kept_float[1])
    assert not torch.equal(kept_float[0], kept_float[2])
    frac = kept_float[0].float().mean().item()
    assert 0.4 < frac < 0.6  # about 1 - p of the elements keep their float value


def test_recon_mode_is_checked():
    with pytest.raises(ZkdError, match="reconstruction mode"):
        ReconConfig(mode="brecq")
    with pytest.raises(ZkdError, match="--recon-mode"):
        CalibrationOptions(data="gaussian:8", recon_mode="adaround")


@pytest.fixture()
def small_teacher(small_net) -> Teacher:
    small_net.requires_grad_(False)
    return Teacher(small_net, FASHION_MNIST_SPEC, {"kind": "test"}, state_sha256(small_net))


def test_genie_learned_weight_steps_are_exported_and_reload_bit_exactly(tmp_path, small_teacher, one_thread):
    config = QuantConfig(3, 3, w_asym=True)
    opts = dict(data="gaussian:48", num_images=32, holdout=16, batch_size=16, candidates=20, progress=False)
    ptq = calibrate_student(small_teacher, config, CalibrationOptions(**opts, recon=False), torch.device("cpu"))
    # no reconstruction check: this run must keep the reconstructed student whatever the validation KL says
    res = calibrate_student(small_teacher, config, CalibrationOptions(**opts, recon=True, recon_iters=8,
                                                                      recon_mode="genie", recon_check=False),
                            torch.device("cpu"))
    learned = {n: l.wq.scale.detach().clone() for n, l in quant_layers(res.student)}
    before = {n: l.wq.scale.detach() for n, l in quant_layers(ptq.student)}
    # the steps were learned (the PTQ run is the same calibration without reconstruction)
    assert sum(not torch.equal(learned[n], before[n]) for n in learned) >= len(learned) - 1
    assert all(not l.wq.scale.requires_grad and l.wq.adaround is None for _, l in quant_layers(res.student))
    path = tmp_path / "genie.pt"
    save_student(path, res.student, config, res.layers, small_teacher, res.folded, ARCH)
    loaded = load_student(path)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(x), res.student(x))
    obj = read_student_file(path)
    for name, layer in quant_layers(loaded):
        assert torch.equal(obj["state"][f"{name}.wq.scale"], learned[name])
        assert torch.equal(layer.wq.scale.detach(), learned[name])
        # the stored codes are the learned rounding at the learned step: w = (q - z) * s exactly
        s = learned[name].view(-1, *[1] * (layer.weight.dim() - 1))
        z = layer.wq.zero_point.view_as(s)
        assert torch.equal(layer.weight, (obj["codes"][name].float() - z) * s)


def test_genie_reconstruction_reduces_block_loss(small_teacher, one_thread):
    # the MSE ranges, not the default guard: the guard's pick depends on the other candidates, and this checks
    # reconstruction from a fixed starting point
    opts = CalibrationOptions(data="gaussian:64", num_images=64, holdout=0, batch_size=16, candidates=20,
                              a_method="mse", recon=False, progress=False)
    res = calibrate_student(small_teacher, QuantConfig(3, 3), opts, torch.device("cpu"))
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    hist = reconstruct(res.student, res.fp_model, [x[:32], x[32:]], torch.device("cpu"),
                       ReconConfig(iters=40, batch_size=16, lr_round=1e-2, mode="genie", time_floor=2),
                       seed=0, progress=False)
    assert [h["block"] for h in hist] == ["conv1", "layer1.0", "layer2.0", "layer3.0", "fc"]
    assert all(h["loss_after"] <= h["loss_before"] * 1.01 for h in hist), hist
    assert sum(h["loss_after"] < 0.95 * h["loss_before"] for h in hist) >= 3, hist
    for h in hist:  # the reported ratios are the measured step cost over the measured floors
        assert h["ratio"] == pytest.approx(h["seconds"] / 40 / h["floor_s"])
        assert h["ratio_float"] == pytest.approx(h["seconds"] / 40 / h["float_floor_s"])
