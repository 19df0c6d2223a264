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
    ["bench_lowbit.py"],
    # issue 11: the reconstruction check's tolerance (paired standard errors) on the low-bit grid
    ["bench_check.py"],
    # issue 11: how the guard should pool its two validation sources (held-out quarter, BN probe), per teacher
    ["bench_guard.py", "--teachers", "fmnist_resnet14", "--name", "guard-r"],
    ["bench_guard.py", "--teachers", "fmnist_mobilenetv2", "--name", "guard-m"],
    # issue 11: reconstruction accuracy vs iterations at the default and the papers' rounding rate; cost per step
    ["bench_recon.py", "--modes", "genie", "--eval-images", "10000", "--no-speed"],
    ["bench_recon.py", "--no-acc", "--name", "recon-speed"],
    # issue 11: the rounding rate on harder settings and on weak (50-step) and full (1000-step) synthetic shards
    ["bench_recon.py", "--teachers", "fmnist_mobilenetv2", "--bits", "3", "3", "--sources", "real", "bns@50",
     "inception@50", "deepinversion@50", "bns@1000", "deepinversion@1000", "--iters", "100", "--modes", "genie",
     "--eval-images", "10000", "--no-speed", "--name", "recon-lr-w3"],
    ["bench_recon.py", "--teachers", "fmnist_mobilenetv2", "--bits", "4", "4", "--keep-8bit", "none", "--sources",
     "real", "bns@1000", "deepinversion@1000", "--iters", "100", "--modes", "genie", "--eval-images", "10000",
     "--no-speed", "--name", "recon-lr-all"],
    ["bench_recon.py", "--teachers", "fmnist_mobilenetv2", "--bits", "4", "4", "--sources", "real", "bns@1000",
     "deepinversion@1000", "--iters", "100", "--modes", "genie", "--eval-images", "10000", "--no-speed", "--name",
     "recon-lr-w4"],
    ["bench_recon.py", "--teachers", "fmnist_resnet14", "--bits", "2", "4", "--sources", "real", "gaussian",
     "bns@50", "deepinversion@50", "--iters", "100", "--modes", "genie", "--eval-images", "10000", "--no-speed",
     "--name", "recon-lr-w2"],
    # issue 11's targets at zkd calibrate's defaults (+ 1000 steps/block, + KD fine-tuning), 10000 test images
    ["bench_targets.py", "--seeds", "0", "1", "2"],
    ["bench_targets.py", "--cases", "m-w4a4", "m-w3a3", "m-all", "--sources", "real", "deepinversion@1000",
     "--settings", "+ KD 4000 @3e-4, --w-asym", "--seeds", "0", "1", "2", "--name", "targets-asym"],
    ["bench_targets.py", "--cases", "m-w4a4", "m-w3a3", "--sources", "deepinversion@2000", "--settings",
     "+ KD 4000 @3e-4", "--seeds", "0", "1", "2", "--name", "targets-di2000"],
    ["bench_targets.py", "--cases", "m-w4a4", "m-w3a3", "m-all", "r-w3a3", "--sources", "real",
     "deepinversion@1000", "--settings", "+ KD 4000 @3e-4, QDrop 0.5", "--seeds", "0", "1", "2", "--name",
     "targets-qdrop"],
    # issue 11: shift / flip in fine-tuning (stop 26)
    ["bench_targets.py", "--cases", "m-w4a4", "m-w3a3", "m-all", "--sources", "real", "deepinversion@1000",
     "--settings", "+ KD 4000 @3e-4, --w-asym, shift 2, flip", "+ KD 4000 @3e-4, --w-asym, shift 2",
     "+ KD 4000 @3e-4, --w-asym, flip", "+ KD 4000 @3e-4, QDrop 0.5, shift 2, flip", "--seeds", "0", "1", "2",
     "--name", "targets-aug"],
    # issue 11: twice the synthetic images for the W4A4 data-free target (stop 30)
    ["bench_targets.py", "--cases", "m-w4a4", "--sources", "deepinversion@1000", "--images", "2048", "--settings",
     "+ KD 4000 @3e-4, --w-asym, shift 2, flip", "--seeds", "0", "1", "2", "--name", "targets-2048"],
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
