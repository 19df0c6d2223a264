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
* Adam on the rounding variables V (lr :func:`round_lr`: 1e-3 at the papers' 20k steps, larger for shorter
  schedules) and on the block's activation step sizes (lr 4e-5, cosine);
* ``mode="genie"`` (GENIE-M, Jeon et al. 2023): the per-channel weight step sizes are learned too (lr 1e-4,
  cosine), with the integer base ``floor(w / s0)`` fixed at the calibrated step (see
  :mod:`~zeroshot_kd.quant.fakequant`); the learned steps are the layers' ``wq.scale`` and go into the student file.

Finally rounding is made hard and written into the weights (``round(w / s)`` then reproduces the learned codes).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..capture import Capture, CaptureError
from ..config import Config, require
from ..runtime import device_generator
from .fakequant import SCALE_EPS, bernoulli_mask
from .modules import QUANT_TYPES, quant_layers

__all__ = ["PAPER_ITERS", "PAPER_LR_ROUND", "RECON_MODES", "ReconConfig", "find_blocks", "reconstruct", "round_lr"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
MAX_BLOCK_LAYERS = 8


RECON_MODES = ("qdrop", "genie")

#: The schedule of BRECQ / QDrop / Genie's code: 20k Adam steps per block with the rounding variables at lr 1e-3.
PAPER_ITERS, PAPER_LR_ROUND = 20000, 1e-3


def round_lr(iters: int) -> float:
    """Default Adam learning rate of the rounding variables for ``iters`` steps per block:
    ``1e-3 * sqrt(20000 / iters)``, the papers' 1e-3 at their 20k steps (0.014 at 100 steps, 0.0082 at 300).

    Why: a rounding decision flips when its variable ``V`` crosses 0, and ``V`` starts within about +-2.4 of it
    (``h(V) = frac(w / s)``). Adam moves a variable by about ``lr`` per step, so at 1e-3 a 100-step schedule moves
    it by at most 0.1 and learned rounding stays nearest rounding, where the papers' 20k steps can move it by 20;
    keeping ``lr * sqrt(iters)`` at the papers' value keeps the reach of a noisy (random-walk) trajectory.
    Measured at 100 steps/block (``bench/results/recon*.md``, ``lowbit.md``): real images ResNet14 W3A3 90.4 ->
    91.5, W2A4 87.8 -> 91.1, MobileNetV2 W3A3 84.1 -> 85.6, every-layer 81.2 -> 87.7; 1000-step synthetic shards
    MobileNetV2 W3A3 84.2 -> 86.5 (DeepInversion); weak 50-step shards, every-layer MobileNetV2 55.0 -> 82.3 (BNS).
    The known failure: MobileNetV2 W3A3 on weak 50-step BNS / Inception shards falls 78.1 -> 58.1 (it fits their
    artifacts, and the validation images, being synthetic too, cannot tell); ``--recon-lr 1e-3`` there.
    """
    return PAPER_LR_ROUND * math.sqrt(PAPER_ITERS / max(int(iters), 1))


@dataclass
class ReconConfig(Config):
    """Hyper-parameters of :func:`reconstruct` (defaults follow QDrop except the iteration count); recorded in the
    calibration report's settings (``reconstruction``).

    Args:
        iters: optimizer steps per block.
        batch_size: minibatch of cached block inputs per step.
        drop_prob: QDrop's probability of using the quantized value (1 = BRECQ, no drop).
        reg: weight of AdaRound's rounding regularizer.
        beta: start and end of the regularizer's annealed exponent.
        warmup: fraction of the steps without the regularizer.
        lr_round: Adam learning rate of the rounding variables; None: :func:`round_lr` of ``iters`` (resolved when
            the config is made, so the recorded config holds the rate used).
        lr_scale: Adam learning rate (cosine-decayed) of the activation steps.
        mode: ``"qdrop"`` (AdaRound at the calibrated weight steps + LSQ activations) or ``"genie"`` (GENIE-M:
            the per-channel weight steps are learned too, jointly with the rounding).
        lr_w_scale: Adam learning rate (cosine-decayed) of the weight steps in ``genie`` mode (Genie's 1e-4).
        time_floor: if > 0, also time this many bare forward+backward passes of each block (the floor of one
            step) and report the per-step cost against it (``step_s``, ``floor_s``, ``float_floor_s``); off by
            default, as it costs those passes and two host syncs per block.
    """

    config_name: ClassVar[str] = "reconstruction"

    iters: int = 1000
    batch_size: int = 32
    drop_prob: float = 0.5
    reg: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    lr_round: float | None = None
    lr_scale: float = 4e-5
    mode: str = "qdrop"
    lr_w_scale: float = 1e-4
    time_floor: int = 0

    def __post_init__(self) -> None:
        self.beta = tuple(float(b) for b in self.beta)  # type: ignore[assignment]
        if self.lr_round is None:
            self.lr_round = round_lr(self.iters)
        require([(self.iters >= 0, f"reconstruction iters must be >= 0, got {self.iters}"),
                 (self.batch_size >= 1, f"reconstruction batch_size must be >= 1, got {self.batch_size}"),
                 (0 < self.drop_prob <= 1, f"--recon-drop must be in (0, 1], got {self.drop_prob}"),
                 (self.reg >= 0, f"--recon-lambda must be >= 0, got {self.reg}"),
                 (len(self.beta) == 2 and all(b > 0 for b in self.beta),
                  f"reconstruction beta needs two positive values (start, end), got {self.beta}"),
                 (0 <= self.warmup < 1, f"reconstruction warmup must be a fraction in [0, 1), got {self.warmup}"),
                 (self.lr_round > 0, f"--recon-lr must be > 0, got {self.lr_round}"),
                 (self.lr_scale > 0, f"reconstruction lr_scale must be > 0, got {self.lr_scale}"),
                 (self.mode in RECON_MODES,
                  f"unknown reconstruction mode {self.mode!r}; use one of {', '.join(RECON_MODES)}"),
                 (self.lr_w_scale > 0, f"reconstruction lr_w_scale must be > 0, got {self.lr_w_scale}"),
                 (self.time_floor >= 0, f"reconstruction time_floor must be >= 0, got {self.time_floor}")])


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
def _capture(model: nn.Module, blocks: Sequence[str], inputs: Sequence[torch.Tensor], device: torch.device,
             want_output: bool) -> dict[str, torch.Tensor] | None:
    """Inputs (``<block>@in``) and, with ``want_output``, outputs of ``blocks`` for every batch of ``inputs``, in
    float32 on ``device``, from one pass per batch (the forward stops after the last site). None if a block is not
    a one-tensor-input module called exactly once per forward."""
    sites = [a for b in blocks for a in ((f"{b}@in", b) if want_output else (f"{b}@in",))]
    kept: dict[str, list[torch.Tensor]] = {a: [] for a in sites}

    def keep(addr: str, t: torch.Tensor) -> None:
        kept[addr].append(t.to(device, torch.float32, copy=True))

    with Capture(model, sites, detach=True, reduce=keep, stop_after=sites[-1], single_input=True) as cap:
        for x in inputs:
            before = dict(cap.calls)
            try:
                cap.run(x.to(device))
            except CaptureError:
                return None
            if any(cap.calls[a] != before.get(a, 0) + 1 for a in sites):
                return None
    return {a: torch.cat(v) for a, v in kept.items()}


def _adam_impl(device: torch.device) -> dict[str, bool]:
    """``fused=True`` where this torch has a fused Adam for the device (one kernel for every parameter: measured
    2.4x faster than ``foreach`` on CPU for a block's three parameter groups, which is most of a small block's
    fixed per-step cost), else ``foreach``."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a private helper: absent in some torch versions
        return {"foreach": True}
    return {"fused": True} if device.type in _get_fused_kernels_supported_devices() else {"foreach": True}


def _recon_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    d = (out.float() - target).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _run_batched(block: nn.Module, x: torch.Tensor, size: int = 128) -> torch.Tensor:
    return torch.cat([block(x[i:i + size]).float() for i in range(0, x.shape[0], size)])


def _time_floor(block: nn.Module, fp_block: nn.Module, xin: torch.Tensor, y: torch.Tensor, reps: int,
                device: torch.device, drop_gen: torch.Generator, layers: list) -> tuple[float, float]:
    """Seconds of one bare forward+backward of ``block`` in its training state (soft rounding, QDrop masks) and of
    the float ``fp_block`` (weights trainable) on the same minibatch: the floors one reconstruction step is
    compared with. Gradients are discarded; the masks come from a throw-away generator, so the run's own random
    streams are untouched."""
    saved = [l.aq.drop_generator if l.aq is not None else None for l in layers]
    for l in layers:
        if l.aq is not None:
            l.aq.drop_generator = drop_gen
    params = [p for p in block.parameters() if p.requires_grad]

    def step(m: nn.Module) -> None:
        _recon_loss(m(xin), y).backward()

    out = []
    fp_params = list(fp_block.parameters())
    flags = [p.requires_grad for p in fp_params]
    for m, ps in ((block, params), (fp_block, fp_params)):
        if m is fp_block:
            for p in fp_params:
                p.requires_grad_(True)
        step(m)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            step(m)
        _sync(device)
        out.append((time.perf_counter() - t0) / reps)
        for p in ps:
            p.grad = None
    for p, f in zip(fp_params, flags):
        p.requires_grad_(f)
    for l, g in zip(layers, saved):
        if l.aq is not None:
            l.aq.drop_generator = g
    return out[0], out[1]


def reconstruct(student: nn.Module, fp_model: nn.Module, inputs: Sequence[torch.Tensor], device: torch.device,
                config: ReconConfig | None = None, seed: int = 0, progress: bool = True) -> list[dict]:
    """Reconstruct every block of ``student`` against ``fp_model`` (the folded float model), in place.

    The float model's block inputs and outputs are captured once, in one pass, and kept on ``device``; a block's
    quantized input is the previous reconstructed block's output on the kept quantized inputs when the float
    model shows the two blocks are chained (``input(i + 1) == output(i)``), and is captured from the student
    otherwise. The step loop has no host synchronization: minibatch indices and QDrop masks are drawn on
    ``device`` by per-block generators seeded from ``seed``.

    Args:
        student: calibrated fake-quantized student (eval mode).
        fp_model: the float model with the same module paths (the folded, unquantized copy).
        inputs: calibration batches (normalized, CPU tensors).
        device: where to run.
        config: hyper-parameters (``mode`` selects QDrop or GENIE-M).
        seed: seed of minibatch sampling and of the QDrop masks.
        progress: tqdm bar over blocks and steps.

    Returns:
        Per block: name, number of layers, reconstruction loss (output MSE term) before and after, samples,
        ``seconds`` of the step loop, and with ``time_floor`` the per-step cost and its floors.
    """
    cfg = config or ReconConfig()
    device = torch.device(device)
    student.eval()
    fp_model.eval()
    history = []
    blocks = find_blocks(student)
    bar = tqdm(total=len(blocks) * cfg.iters, desc="reconstruct", disable=not progress, leave=False)
    fp_all = _capture(fp_model, blocks, inputs, device, want_output=True)
    x_q_next: torch.Tensor | None = None  # quantized input of the next block, when it is chained to this one
    for bi, name in enumerate(blocks):
        fp = (fp_all[f"{name}@in"], fp_all[name]) if fp_all is not None else None
        if fp is None:  # some block is not capturable in one pass: capture this one alone
            one = _capture(fp_model, [name], inputs, device, want_output=True)
            fp = (one[f"{name}@in"], one[name]) if one is not None else None
        if x_q_next is not None:
            x_q = x_q_next
        else:
            q = _capture(student, [name], inputs, device, want_output=False)
            x_q = q[f"{name}@in"] if q is not None else None
        x_q_next = None
        if fp is None or x_q is None:
            warnings.warn(f"block {name} is not a single-input module called once per forward; not reconstructed",
                          stacklevel=2)
            bar.update(cfg.iters)
            continue
        x_fp, y_fp = fp
        block = student.get_submodule(name)
        layers = [m for _, m in quant_layers(block)] if not isinstance(block, QUANT_TYPES) else [block]
        idx_gen = device_generator(seed, bi, f"recon:{name}", device)
        drop_gen = device_generator(seed, bi, f"qdrop:{name}", device)
        mix_gen = device_generator(seed, bi, f"qdrop-input:{name}", device)
        n = x_fp.shape[0]
        m_eval = min(n, 256)

        def eval_loss() -> float:
            with torch.no_grad():
                saved = [(l.aq.drop_prob if l.aq is not None else 0.0) for l in layers]
                for l in layers:
                    if l.aq is not None:
                        l.aq.drop_prob = 0.0
                tot = torch.zeros((), device=device)
                for i in range(0, m_eval, 128):
                    tot += _recon_loss(block(x_q[i:i + 128]), y_fp[i:i + 128]) * min(128, m_eval - i)
                for l, d in zip(layers, saved):
                    if l.aq is not None:
                        l.aq.drop_prob = d
                return float(tot) / m_eval  # one host sync

        before = eval_loss()  # nearest rounding, learned nothing yet
        genie = cfg.mode == "genie"
        for layer in layers:
            layer.wq.start_adaround(layer.weight, learn_scale=genie)
            if layer.aq is not None:
                layer.aq.scale.requires_grad_(True)
                layer.aq.drop_prob = 1.0 - cfg.drop_prob if 0 < cfg.drop_prob < 1 else 0.0
                layer.aq.drop_generator = drop_gen
        # One Adam (fused where available) over three groups: rounding variables at a constant rate, activation
        # and (genie) weight steps cosine-decayed; one optimizer step and one scheduler step per iteration.
        groups = [{"params": [layer.wq.adaround for layer in layers], "lr": cfg.lr_round}]
        decayed = [{"params": [l.aq.scale for l in layers if l.aq is not None], "lr": cfg.lr_scale}]
        if genie:
            decayed.append({"params": [l.wq.scale for l in layers], "lr": cfg.lr_w_scale})
        groups += [g for g in decayed if g["params"]]
        opt = torch.optim.Adam(groups, **_adam_impl(device))
        total = max(cfg.iters, 1)

        def cosine(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda _: 1.0] + [cosine] * (len(groups) - 1))
        scales = [p for g in groups[1:] for p in g["params"]]
        bs = min(cfg.batch_size, n)
        # QDrop's input mixing; skipped where the quantized input is the float one (the first block's images)
        mix = 0 < cfg.drop_prob < 1 and not (x_q.shape == x_fp.shape and torch.equal(x_q, x_fp))
        timing: dict = {}
        if cfg.time_floor > 0:
            probe = device_generator(seed, bi, f"floor:{name}", device)
            idx = torch.randint(0, n, (bs,), generator=probe, device=device)
            xin = torch.where(bernoulli_mask(x_q[idx].shape, cfg.drop_prob, probe, device),
                              x_q[idx], x_fp[idx]) if mix else x_q[idx]
            floor_s, float_floor_s = _time_floor(block, fp_model.get_submodule(name), xin, y_fp[idx],
                                                 cfg.time_floor, device, probe, layers)
            timing = {"floor_s": floor_s, "float_floor_s": float_floor_s}
        warm = int(cfg.warmup * cfg.iters)
        _sync(device)
        t0 = time.perf_counter()
        for t in range(cfg.iters):
            idx = torch.randint(0, n, (bs,), generator=idx_gen, device=device)
            xq, y = x_q[idx], y_fp[idx]
            if mix:
                use_q = bernoulli_mask(xq.shape, cfg.drop_prob, mix_gen, device)
                xin = torch.where(use_q, xq, x_fp[idx])
            else:
                xin = xq
            loss = _recon_loss(block(xin), y)
            if t >= warm:
                rel = (t - warm) / max(cfg.iters - warm, 1)
                beta = cfg.beta[1] + (cfg.beta[0] - cfg.beta[1]) * (1 - rel)
                loss = loss + cfg.reg * sum(layer.wq.adaround_reg(beta) for layer in layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if scales:
                with torch.no_grad():
                    torch._foreach_clamp_min_(scales, SCALE_EPS)  # keep step sizes positive, one call
            bar.update(1)
        _sync(device)
        seconds = time.perf_counter() - t0
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
        rec = {"block": name, "layers": len(layers), "loss_before": before, "loss_after": after_soft,
               "samples": n, "seconds": seconds}
        if timing:
            step_s = seconds / max(cfg.iters, 1)
            rec.update(step_s=step_s, **timing, ratio=step_s / timing["floor_s"],
                       ratio_float=step_s / timing["float_floor_s"])
        history.append(rec)
        nxt = blocks[bi + 1] if bi + 1 < len(blocks) else None
        if (nxt is not None and fp_all is not None and fp_all[f"{nxt}@in"].shape == y_fp.shape
                and torch.equal(fp_all[f"{nxt}@in"], y_fp)):
            x_q_next = _run_batched(block, x_q)  # the next block's quantized input, no recapture
            fp_all[f"{nxt}@in"] = y_fp  # the same tensor: keep one copy
        del x_fp, y_fp, x_q
        if fp_all is not None:
            fp_all.pop(f"{name}@in", None)
            fp_all.pop(name, None)
        if not math.isfinite(after_soft):
            warnings.warn(f"reconstruction of block {name} diverged (loss {after_soft})", stacklevel=2)
    bar.close()
    return history
