"""Train the shipped teachers on real Fashion-MNIST (1x28x28): the default CIFAR-style ResNet, and a small
MobileNetV2 (depthwise convolutions) for the quantization benchmark.

Writes ``<out>.pt`` (a bare float32 state_dict) and ``<out>.json`` (the card: architecture, input spec,
test accuracy, recipe, sha256). Reproduce the shipped files with::

    OMP_NUM_THREADS=1 python assets/train_teacher.py --out assets/fmnist_resnet14
    OMP_NUM_THREADS=2 python assets/train_teacher.py --arch mobilenet_v2_small --out assets/fmnist_mobilenetv2

Recipe: SGD (momentum 0.9, Nesterov), weight decay 5e-4, one-cycle LR (peak 0.1), batch 128, random crop
(pad 2) + horizontal flip, plain cross-entropy (no label smoothing, so the BN statistics describe clean
data). Seeded; on CPU the result is reproducible for a given torch build and thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from zeroshot_kd.data import FASHION_MNIST_CLASSES, FASHION_MNIST_SPEC, load_fashion_mnist
from zeroshot_kd.models import cifar_resnet, mobilenet_v2_small


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with 2-pixel zero padding (in pixel space) and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=g)
    dy = torch.randint(0, 5, (n,), generator=g)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
    out = padded[torch.arange(n).view(n, 1, 1), :, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    out = out.permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum().item() for i in range(0, len(x), bs))
    return 100.0 * correct / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/fmnist_resnet14")
    p.add_argument("--arch", default="cifar_resnet", choices=["cifar_resnet", "mobilenet_v2_small"])
    p.add_argument("--width-mult", type=float, default=0.5, help="mobilenet_v2_small only")
    p.add_argument("--depth", type=int, default=14)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    spec = FASHION_MNIST_SPEC
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xtr = xtr.float().div(255).unsqueeze(1)
    xte = spec.normalize(xte.float().div(255).unsqueeze(1))
    if args.arch == "cifar_resnet":
        arch = {"builder": "zeroshot_kd.models:cifar_resnet", "depth": args.depth, "width": args.width}
        model = cifar_resnet(args.depth, args.width, spec.channels, spec.num_classes)
    else:
        arch = {"builder": "zeroshot_kd.models:mobilenet_v2_small", "width_mult": args.width_mult}
        model = mobilenet_v2_small(args.width_mult, spec.channels, spec.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = args.epochs * (len(xtr) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        total = 0.0
        for i in range(len(xtr) // args.batch_size):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            xb = spec.normalize(augment(xtr[idx], g))
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = evaluate(model, xte, yte)
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / (i + 1):.4f} test acc {acc:.2f}% "
              f"({time.time() - t0:.0f}s)", flush=True)

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tmp = args.out + ".pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, args.out + ".pt")
    sha = hashlib.sha256(open(args.out + ".pt", "rb").read()).hexdigest()
    card = {
        "name": os.path.basename(args.out),
        "architecture": {**arch, "in_channels": spec.channels, "num_classes": spec.num_classes},
        "input_spec": spec.to_dict(),
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist IDX files)",
        "test_accuracy": round(acc, 2),
        "classes": list(FASHION_MNIST_CLASSES),
        "num_params": sum(p.numel() for p in model.parameters()),
        "recipe": {"optimizer": "SGD momentum 0.9 nesterov", "weight_decay": 5e-4, "schedule": "one-cycle",
                   "peak_lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size,
                   "augmentation": "random crop (pad 2) + horizontal flip", "loss": "cross-entropy",
                   "seed": args.seed, "script": "assets/train_teacher.py", "torch": torch.__version__,
                   "threads": torch.get_num_threads(),
                   "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python {' '.join(sys.argv)}",
                   "train_seconds": round(time.time() - t0)},
        "sha256": sha,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    print(json.dumps({"test_accuracy": card["test_accuracy"], "sha256": sha}))


if __name__ == "__main__":
    main()
