"""Block-wise output reconstruction (BRECQ / QDrop family) with AdaRound weights and learned activation steps.

Blocks are found structurally: walking down from the root, a child that contains quantized layers is a block
if it is a quantized layer itself or a module that is not a plain container (``nn.Sequential``/``ModuleList``/
``ModuleDict``) and holds at most 8 quantized layers; otherwise the walk descends into it. For ResNets this gives
the stem conv, every residual block and the classifier; for MobileNetV2 every ``Conv2dNormActivation`` and
``InvertedResidual``.

For each block, in order, the block's full-precision input/output are taken from the *folded* float model (so the
targets match what the folded student computes) and its quantized input from the student with all previous
blocks already reconstructed. Then, for ``iters`` steps on random minibatches:

* input ``x = where(u < p, x_q, x_fp)`` and, inside the block, every activation quantizer keeps each element's
  full-precision value with probability ``1 - p`` (QDrop, ``p = drop_prob``; ``p = 1`` is BRECQ);
* loss ``||y_hat - y||^2`` (summed over channels, averaged over batch and positions)
  ``+ lambda * sum(1 - |2 h(V) - 1|^beta)`` after a 20% warm-up, beta decaying linearly 20 -> 2;
* Adam on the rounding variables V (lr 1e-3) and on the block's activation step sizes (lr 4e-5, cosine).

Finally rounding is made hard and written into the weights (``round(w / s)`` then reproduces the learned codes).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..capture import Capture, CaptureError
from ..config import Config, require
from ..runtime import batch_generator, batch_seed
from .modules import QUANT_TYPES, quant_layers

__all__ = ["ReconConfig", "find_blocks", "reconstruct"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
MAX_BLOCK_LAYERS = 8


@dataclass
class ReconConfig(Config):
    """Hyper-parameters of :func:`reconstruct` (defaults follow QDrop except the iteration count); recorded in the
    calibration report's settings (``reconstruction``)."""

    config_name: ClassVar[str] = "reconstruction"

    iters: int = 1000
    batch_size: int = 32
    drop_prob: float = 0.5
    reg: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    lr_round: float = 1e-3
    lr_scale: float = 4e-5

    def __post_init__(self) -> None:
        self.beta = tuple(float(b) for b in self.beta)  # type: ignore[assignment]
        require([(self.iters >= 0, f"reconstruction iters must be >= 0, got {self.iters}"),
                 (self.batch_size >= 1, f"reconstruction batch_size must be >= 1, got {self.batch_size}"),
                 (0 < self.drop_prob <= 1, f"--recon-drop must be in (0, 1], got {self.drop_prob}"),
                 (self.reg >= 0, f"--recon-lambda must be >= 0, got {self.reg}"),
                 (len(self.beta) == 2 and all(b > 0 for b in self.beta),
                  f"reconstruction beta needs two positive values (start, end), got {self.beta}"),
                 (0 <= self.warmup < 1, f"reconstruction warmup must be a fraction in [0, 1), got {self.warmup}"),
                 (self.lr_round > 0, f"--recon-lr must be > 0, got {self.lr_round}"),
                 (self.lr_scale > 0, f"reconstruction lr_scale must be > 0, got {self.lr_scale}")])


def find_blocks(model: nn.Module) -> list[str]:
    """Module paths of the reconstruction blocks of a student, in module order."""
    blocks: list[str] = []

    def count(m: nn.Module) -> int:
        return sum(isinstance(x, QUANT_TYPES) for x in m.modules())

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            n = count(child)
            if n == 0:
                continue
            if isinstance(child, QUANT_TYPES) or (type(child) not in _CONTAINERS and n <= MAX_BLOCK_LAYERS):
                blocks.append(path)
            else:
                visit(path, child)

    visit("", model)
    return blocks


@torch.no_grad()
def _capture(model: nn.Module, block: str, inputs: Sequence[torch.Tensor], device: torch.device,
             want_output: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Inputs (and outputs) of ``block`` for every batch of ``inputs``, on CPU in float32; None if it is not a
    one-tensor-input module reached by every forward. The rest of each forward is skipped (``stop_after``)."""
    sites = [f"{block}@in", block] if want_output else [f"{block}@in"]
    kept: dict[str, list[torch.Tensor]] = {a: [] for a in sites}

    def keep(addr: str, t: torch.Tensor) -> None:
        kept[addr].append(t.to("cpu", torch.float32, copy=True))

    with Capture(model, sites, detach=True, reduce=keep, stop_after=sites[-1], single_input=True) as cap:
        for x in inputs:
            before = cap.calls[sites[-1]]
            try:
                cap.run(x.to(device))
            except CaptureError:
                return None
            if cap.calls[sites[-1]] != before + 1:
                return None
    xs = torch.cat(kept[sites[0]])
    return xs, (torch.cat(kept[block]) if want_output else None)


def _device_generator(seed: int, index: int, salt: str, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded like :func:`~zeroshot_kd.runtime.batch_generator` (per block), so QDrop's
    masks are drawn where the tensors live instead of on the CPU and copied at every step."""
    return torch.Generator(device=torch.device(device)).manual_seed(batch_seed(seed, index, salt))


def _recon_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    d = (out.float() - target).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def reconstruct(student: nn.Module, fp_model: nn.Module, inputs: Sequence[torch.Tensor], device: torch.device,
                config: ReconConfig | None = None, seed: int = 0, progress: bool = True) -> list[dict]:
    """Reconstruct every block of ``student`` against ``fp_model`` (the folded float model), in place.

    Args:
        student: calibrated fake-quantized student (eval mode).
        fp_model: the float model with the same module paths (the folded, unquantized copy).
        inputs: calibration batches (normalized, CPU tensors).
        device: where to run.
        config: hyper-parameters.
        seed: seed of minibatch sampling and of the QDrop masks.
        progress: tqdm bar over blocks and steps.

    Returns:
        Per block: name, number of layers, reconstruction loss (output MSE term) before and after.
    """
    cfg = config or ReconConfig()
    student.eval()
    fp_model.eval()
    history = []
    blocks = find_blocks(student)
    bar = tqdm(total=len(blocks) * cfg.iters, desc="reconstruct", disable=not progress, leave=False)
    for bi, name in enumerate(blocks):
        fp = _capture(fp_model, name, inputs, device, want_output=True)
        q = _capture(student, name, inputs, device, want_output=False)
        if fp is None or q is None:
            warnings.warn(f"block {name} is not a single-input module called once per forward; not reconstructed",
                          stacklevel=2)
            bar.update(cfg.iters)
            continue
        x_fp, y_fp = fp
        x_q = q[0]
        block = student.get_submodule(name)
        layers = [m for _, m in quant_layers(block)] if not isinstance(block, QUANT_TYPES) else [block]
        gen = batch_generator(seed, bi, f"recon:{name}")
        drop_gen = _device_generator(seed, bi, f"qdrop:{name}", device)
        mix_gen = _device_generator(seed, bi, f"qdrop-input:{name}", device)
        n = x_fp.shape[0]
        y_dev = None

        def eval_loss() -> float:
            with torch.no_grad():
                saved = [(l.aq.drop_prob if l.aq is not None else 0.0) for l in layers]
                for l in layers:
                    if l.aq is not None:
                        l.aq.drop_prob = 0.0
                tot, m = 0.0, min(n, 256)
                for i in range(0, m, 128):
                    tot += _recon_loss(block(x_q[i:i + 128].to(device)), y_fp[i:i + 128].to(device)).item() * \
                        min(128, m - i)
                for l, d in zip(layers, saved):
                    if l.aq is not None:
                        l.aq.drop_prob = d
                return tot / m

        before = eval_loss()  # nearest rounding, learned nothing yet
        for layer in layers:
            layer.wq.start_adaround(layer.weight)
            if layer.aq is not None:
                layer.aq.scale.requires_grad_(True)
                layer.aq.drop_prob = 1.0 - cfg.drop_prob if 0 < cfg.drop_prob < 1 else 0.0
                layer.aq.drop_generator = drop_gen
        v_params = [layer.wq.adaround for layer in layers]
        s_params = [layer.aq.scale for layer in layers if layer.aq is not None]
        opt_v = torch.optim.Adam(v_params, lr=cfg.lr_round)
        opt_s = torch.optim.Adam(s_params, lr=cfg.lr_scale) if s_params else None
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=max(cfg.iters, 1), eta_min=0.0)
                 if opt_s else None)
        warm = int(cfg.warmup * cfg.iters)
        for t in range(cfg.iters):
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
            xq, xf, y = x_q[idx], x_fp[idx], y_fp[idx]
            if 0 < cfg.drop_prob < 1:
                xq, xf = xq.to(device), xf.to(device)
                use_q = torch.rand(xq.shape, generator=mix_gen, device=xq.device) < cfg.drop_prob
                xin = torch.where(use_q, xq, xf)
            else:
                xin = xq
            y_dev = y.to(device)
            out = block(xin.to(device))
            loss = _recon_loss(out, y_dev)
            if t >= warm:
                rel = (t - warm) / max(cfg.iters - warm, 1)
                beta = cfg.beta[1] + (cfg.beta[0] - cfg.beta[1]) * (1 - rel)
                loss = loss + cfg.reg * sum(layer.wq.adaround_reg(beta) for layer in layers)
            opt_v.zero_grad(set_to_none=True)
            if opt_s is not None:
                opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_v.step()
            if opt_s is not None:
                opt_s.step()
                sched.step()
                for layer in layers:
                    if layer.aq is not None:
                        layer.aq.clamp_scale_()
            bar.update(1)
        for layer in layers:
            layer.wq.adaround_soft = False
        for layer in layers:
            if layer.aq is not None:
                layer.aq.drop_prob = 0.0
                layer.aq.drop_generator = None
                layer.aq.scale.requires_grad_(False)
        after_soft = eval_loss()  # hard rounding via adaround_soft=False
        for layer in layers:
            layer.wq.finish_adaround(layer.weight)
        history.append({"block": name, "layers": len(layers), "loss_before": before, "loss_after": after_soft,
                        "samples": n})
        del x_fp, y_fp, x_q
        if not math.isfinite(after_soft):
            warnings.warn(f"reconstruction of block {name} diverged (loss {after_soft})", stacklevel=2)
    bar.close()
    return history
