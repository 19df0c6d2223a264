"""The same contracts on a CUDA device: skipped without one (CI has none; run on a GPU machine with ``make test``).

Convolutions run with TF32 off here so that CPU and GPU can be compared at float32 tolerances.
"""

from __future__ import annotations

import json

import pytest
import torch

from zeroshot_kd import load_teacher, synthesize
from zeroshot_kd.bn import BNStatsHook, bns_kl_loss, deepinversion_feature_loss
from zeroshot_kd.quant.modules import QuantConfig
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _loss_and_grad(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    with BNStatsHook(net) as hook:
        out = net(x)
        loss = bns_kl_loss(hook.stats) + deepinversion_feature_loss(hook.stats) + out.square().mean()
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def test_fused_bn_statistics_and_gradient_match_cpu(small_net):
    net = small_net.double().requires_grad_(False)
    x = torch.randn(8, 1, 16, 16, dtype=torch.float64)
    loss_cpu, grad_cpu = _loss_and_grad(net, x)
    loss_gpu, grad_gpu = _loss_and_grad(net.to(CUDA), x.to(CUDA))
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu)
    torch.testing.assert_close(grad_gpu.cpu(), grad_cpu, rtol=1e-7, atol=1e-9 * grad_cpu.abs().max().item())


def test_bn_statistics_float32_under_bf16_autocast(small_net):
    net = small_net.to(CUDA).requires_grad_(False)
    with BNStatsHook(net) as hook, torch.autocast("cuda", dtype=torch.bfloat16):
        net(torch.randn(4, 1, 16, 16, device=CUDA))
        loss = bns_kl_loss(hook.stats)
    assert hook.stats.mean.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_synthesis_on_cuda_repeats_byte_for_byte(tmp_path, precision):
    kw = dict(method="deepinversion", num_images=48, batch_size=24, iterations=20, device="cuda", seed=3,
              precision=precision, progress=False)
    synthesize(tmp_path / "a", **kw)
    synthesize(tmp_path / "b", **kw)
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert all(v == v for v in a["final_loss"].values())  # no NaN


def test_synthesis_cuda_close_to_cpu(tmp_path):
    """Same command on CPU and CUDA: not the same bytes (different kernels), but the same optimization."""
    kw = dict(method="bns", num_images=32, batch_size=32, iterations=30, seed=1, progress=False)
    synthesize(tmp_path / "cpu", device="cpu", **kw)
    synthesize(tmp_path / "gpu", device="cuda", **kw)
    cpu = json.loads((tmp_path / "cpu" / "manifest.json").read_text())["final_loss"]["bn"]
    gpu = json.loads((tmp_path / "gpu" / "manifest.json").read_text())["final_loss"]["bn"]
    assert gpu == pytest.approx(cpu, rel=0.05)


def test_w8a8_calibration_on_cuda_matches_cpu(teacher):
    opts = CalibrationOptions("gaussian:128", num_images=128, holdout=0, candidates=20,
                              eval_data="gaussian:256", eval_images=256, progress=False)
    cpu = calibrate_student(teacher, QuantConfig(8, 8), opts, torch.device("cpu")).report["eval"]["student"]
    gpu_teacher = load_teacher(device=CUDA)  # as the CLI does: the teacher lives on the run's device
    gpu = calibrate_student(gpu_teacher, QuantConfig(8, 8), opts, CUDA).report["eval"]["student"]
    assert abs(gpu["agreement"] - cpu["agreement"]) <= 1.0, (cpu, gpu)
