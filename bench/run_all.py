"""``make bench``: run every benchmark script in order; each writes bench/results/<name>.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ORDER = [
    ["bench_synthesis.py"],
    ["bench_similarity.py"],
    # issue 14: does the similarity score predict calibration quality? (~25 min on one core)
    ["bench_calibration_quality.py"],
    ["bench_quant.py"],
    # the depthwise teacher: its own 3 x 1024 synthetic sets (about 15 min), PTQ-only extras
    ["bench_quant.py", "--teacher", "fmnist_mobilenetv2", "--name", "quant-mobilenetv2", "--recon-iters", "300",
     "--extras-ptq-only"],
    ["bench_objectives.py"],
    # issue 11: W4A4 / W3A3 / all-layers W4A4 for both teachers, new ranges, CLE/BC, recon, mixed precision
    ["bench_lowbit.py", "--before", "bench/results/lowbit-before-validation.json"],
    # issue 11: how the guard should pool its two validation sources (held-out quarter, BN probe), per teacher
    ["bench_guard.py", "--teachers", "fmnist_resnet14", "--name", "guard-r"],
    ["bench_guard.py", "--teachers", "fmnist_mobilenetv2", "--name", "guard-m"],
    # issue 11: reconstruction cost per step against its floor, accuracy vs iterations, qdrop vs genie
    ["bench_recon.py"],
    # issue 13: packed student sizes, ONNX QDQ latency and top-1 in ONNX Runtime
    ["bench_export.py"],
    # issue 12: TAKD chains, Active Mixup with a black-box teacher, no-skip students (about 20 min)
    ["bench_recipes.py"],
    # issue 12: fixed-snapshot adi vs adaptive adi vs deepinversion at the same compute (about 15 min)
    ["bench_adi.py"],
]

here = Path(__file__).resolve().parent
failed = []
for name, *args in ORDER:
    script = here / name
    if not script.is_file():
        continue
    print(f"== {name} {' '.join(args)}", flush=True)
    if subprocess.run([sys.executable, str(script), *args]).returncode != 0:
        failed.append(" ".join([name, *args]))
if failed:
    sys.exit(f"benchmarks failed: {', '.join(failed)}")
