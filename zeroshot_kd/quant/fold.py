"""Folding BatchNorm into the preceding convolution (the student only; the teacher keeps its BN layers).

``W' = W * gamma / sqrt(var + eps)`` per output channel and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``,
computed in float64 and stored in the conv's dtype. The BN module is replaced by ``nn.Identity`` so that every
module path of the folded model still names the same place as in the teacher.

Conv -> BN pairs are found from the data flow (``torch.fx``): a BN whose only input is a Conv2d whose only
consumer is that BN, each called once. Models that fx cannot trace fall back to registration order (a Conv2d
immediately followed by a BN in the same parent), and the fold is then checked numerically.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import ZkdError

__all__ = ["find_conv_bn_pairs", "fold_bn", "fold_pair", "set_module"]


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted ``path``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _foldable_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None


def module_call_counts(gm: "torch.fx.GraphModule") -> dict[str, int]:
    """How often each submodule is called in a traced graph (a module called twice cannot be folded or scaled)."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    import torch.fx

    gm = torch.fx.symbolic_trace(model)
    modules = dict(model.named_modules())
    calls = module_call_counts(gm)
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _foldable_bn(modules.get(node.target)):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1
                and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs_order(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if isinstance(a, nn.Conv2d) and _foldable_bn(b) and b.num_features == a.out_channels:
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str]:
    """Conv2d -> BatchNorm2d pairs that can be folded, and how they were found (``"fx"`` or ``"order"``)."""
    try:
        return _pairs_fx(model), "fx"
    except Exception:  # untraceable control flow: fall back to module order, verified by fold_bn
        return _pairs_order(model), "order"


@torch.no_grad()
def fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` in place (``conv`` gains a bias if it had none)."""
    f64 = lambda t: t.detach().cpu().double()  # noqa: E731  (on CPU: MPS has no float64)
    w = f64(conv.weight)
    mean, var = f64(bn.running_mean), f64(bn.running_var)
    gamma = f64(bn.weight) if bn.affine else torch.ones_like(mean)
    beta = f64(bn.bias) if bn.affine else torch.zeros_like(mean)
    b = f64(conv.bias) if conv.bias is not None else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(var + bn.eps)
    new_w = w * factor.view(-1, *([1] * (w.dim() - 1)))
    new_b = (b - mean) * factor + beta
    conv.weight.copy_(new_w.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_b.to(conv.weight.device, conv.weight.dtype),
                                 requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_b.to(conv.bias.dtype))


def fold_bn(model: nn.Module, example: torch.Tensor | None = None) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm of ``model`` into its conv, in place; return the folded (conv, bn) paths.

    Args:
        model: the student copy (never the teacher), in eval mode.
        example: an input batch used to verify the fold when pairs had to be guessed from module order.

    Raises:
        ZkdError: when the order-based fallback changes the model's output (the guessed pairs were wrong).
    """
    pairs, how = find_conv_bn_pairs(model)
    reference = None
    if how == "order" and example is not None:
        was_training = model.training
        model.eval()
        reference = model(example)
        model.train(was_training)
    for conv_name, bn_name in pairs:
        fold_pair(model.get_submodule(conv_name), model.get_submodule(bn_name))
        set_module(model, bn_name, nn.Identity())
    if reference is not None:
        out = model(example)
        err = (out - reference).abs().max().item() / max(reference.abs().max().item(), 1e-12)
        if err > 1e-4:
            raise ZkdError("BatchNorm folding changed the outputs of this model (it could not be traced with "
                           "torch.fx); pass --no-fold")
    elif how == "order":
        warnings.warn("conv/BN pairs found by module order (torch.fx could not trace the model)", stacklevel=2)
    return pairs
