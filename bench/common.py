"""Helpers shared by the benchmark scripts: the shard cache every benchmark reuses, and table output."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
CACHE = Path(os.environ.get("ZKD_BENCH_CACHE", ROOT / "cache"))
# Benchmarks time each calibration as a standalone run, BN probe included: no probe read back from an earlier run.
os.environ["ZKD_CACHE_DIR"] = "off"
RESULTS = ROOT / "results"

# The synthetic calibration sets every benchmark uses: 1024 images per method from the shipped teacher.
# Iterations are cut from the 2000 of the authors' ImageNet script to 200 to fit a CPU run; deepinversion uses
# r_feature (bn_weight) 0.1 instead of the ImageNet 0.01 ("might need adjustment for other networks", their README):
# at 200 iterations it brings the BNS-KL of a 64-image batch from 0.23 to 0.08 (real training data: 0.09).
SHARD_SETTINGS = {
    "gaussian": {},
    "inception": {"iterations": 200},
    "bns": {"iterations": 200},
    "deepinversion": {"iterations": 200, "bn_weight": 0.1},
}
NUM_IMAGES = int(os.environ.get("ZKD_BENCH_IMAGES", 1024))


def shard_dir(method: str, teacher: str | None = None, n: int = NUM_IMAGES) -> Path:
    """Where the cached ``n``-image set of ``method`` from ``teacher`` (default the shipped one) lives."""
    return CACHE / (f"{method}-{n}" if teacher is None else f"{teacher}-{method}-{n}")


def shards(method: str, teacher: str | None = None) -> Path:
    """Path of the cached shard folder for ``method`` (from ``teacher``, default the shipped one), synthesizing it
    first if needed (resumable)."""
    from zeroshot_kd import synthesize

    out = shard_dir(method, teacher)
    if not (out / "manifest.json").is_file():
        print(f"[bench] synthesizing {NUM_IMAGES} {method} images into {out}", file=sys.stderr)
        synthesize(out, teacher=teacher, method=method, num_images=NUM_IMAGES, batch_size=64, device="auto", seed=0,
                   resume=out.exists(), progress=True, **SHARD_SETTINGS[method])
    return out


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """:func:`zeroshot_kd.charts.markdown_table` plus the newline that ends the block in a result file."""
    from zeroshot_kd.charts import markdown_table as table

    return table(header, rows) + "\n"


_MACHINE_PATH = re.compile(r"(?:/work|/tmp|/home|/private/var|/var/folders)/[^\s\"'`|,;)\]]*")


def machine_free(text: str, repo: Path = REPO, cache: Path = CACHE) -> str:
    """``text`` without this machine's absolute paths, so results read the same wherever they were measured.

    Paths under the repository become relative to its root (``bench/cache/bns-1024``); a cache outside it
    (``ZKD_BENCH_CACHE``) is written ``$ZKD_BENCH_CACHE``; any other absolute path under /work, /tmp, /home (or macOS
    temp folders) is cut to ``<path>/NAME`` and reported on stderr.
    """
    repo_s, cache_s = str(repo), str(cache)
    if not cache_s.startswith(repo_s + os.sep):
        text = text.replace(cache_s, "$ZKD_BENCH_CACHE")
    text = text.replace(repo_s + os.sep, "").replace(repo_s, ".")

    def cut(m: re.Match) -> str:
        print(f"[bench] machine path in a result replaced: {m.group(0)}", file=sys.stderr)
        return "<path>/" + (m.group(0).rstrip("/").rsplit("/", 1)[-1] or "")

    return _MACHINE_PATH.sub(cut, text)


def rel(path: str | os.PathLike) -> str:
    """``path`` as a result should name it: relative to the repository root where it lies below it."""
    return machine_free(str(Path(path).resolve()))


def write_result(name: str, text: str) -> Path:
    """Write ``bench/results/NAME.md`` atomically (through :mod:`zeroshot_kd.io`), machine paths removed."""
    from zeroshot_kd.io import atomic_write_bytes

    text = machine_free(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    atomic_write_bytes(path, text.encode())
    print(text)
    return path


def write_json(name: str, obj: Any) -> Path:
    """Write ``bench/results/NAME.json`` atomically, machine paths removed (data sources name cache folders)."""
    from zeroshot_kd.io import atomic_write_bytes

    text = machine_free(json.dumps(obj, indent=2, default=str))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_bytes(path, (text + "\n").encode())
    return path
