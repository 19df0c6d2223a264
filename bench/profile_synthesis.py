"""Where a synthesis iteration spends its time: torch.profiler tables for one method, next to the bare floor.

Usage: python bench/profile_synthesis.py [--method deepinversion] [--teacher resnet50 --weights none] [--device cuda]
Prints the operators sorted by self time (device time on CUDA) for 20 iterations of the method and 20 bare
forward+backward passes of the teacher; kernel counts per iteration show launch-bound overheads on small nets.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from zeroshot_kd import load_teacher
from zeroshot_kd.runtime import resolve_device
from zeroshot_kd.synthesis import SynthesisConfig, get_method, optimize_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="deepinversion")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    device = resolve_device(args.device)
    teacher = load_teacher(args.teacher, weights=args.weights, device=device)
    m = get_method(args.method)
    cfg = SynthesisConfig(args.method, args.batch_size, args.batch_size, 0, "balanced",
                          m.hyperparameters({"iterations": 20}))
    x = torch.randn(args.batch_size, *teacher.spec.shape, device=device, requires_grad=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    optimize_batch(teacher.model, teacher.spec, m, cfg, 0, device)  # warm-up
    for name, work in [("floor", lambda: [teacher.model(x).sum().backward() for _ in range(20)]),
                       (args.method, lambda: optimize_batch(teacher.model, teacher.spec, m, cfg, 0, device))]:
        with profile(activities=activities) as prof:
            work()
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"== {name}: 20 iterations")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
