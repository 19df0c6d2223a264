"""Helpers shared by the benchmark scripts: the shard cache every benchmark reuses, and table output."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("ZKD_BENCH_CACHE", ROOT / "cache"))
RESULTS = ROOT / "results"

# The synthetic calibration sets every benchmark uses: 1024 images per method from the shipped teacher.
# Settings per method (iterations are reduced from the 2000 of the authors' ImageNet script to fit a CPU run).
SHARD_SETTINGS = {
    "gaussian": {},
    "inception": {"iterations": 200},
    "bns": {"iterations": 200},
    "deepinversion": {"iterations": 200},
}
NUM_IMAGES = int(os.environ.get("ZKD_BENCH_IMAGES", 1024))


def shards(method: str) -> Path:
    """Path of the cached shard folder for ``method``, synthesizing it first if needed (resumable)."""
    from zeroshot_kd import synthesize

    out = CACHE / f"{method}-{NUM_IMAGES}"
    if not (out / "manifest.json").is_file():
        print(f"[bench] synthesizing {NUM_IMAGES} {method} images into {out}", file=sys.stderr)
        synthesize(out, method=method, num_images=NUM_IMAGES, batch_size=64, device="auto", seed=0,
                   resume=out.exists(), progress=True, **SHARD_SETTINGS[method])
    return out


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(text)
    return path
