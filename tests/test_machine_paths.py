"""Results and docs carry no absolute path of the machine that built them (issue 9), and the bench writer strips
them."""

from __future__ import annotations

import re
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
MARKERS = ("/work/", "/tmp/", "/home/")


def _texts() -> list[Path]:
    files = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "bench" / "results").glob("*")),
             *sorted((REPO / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file() and f.suffix in (".md", ".json", ".txt", ".csv")]


def test_readme_and_results_hold_no_machine_paths():
    hits = []
    for f in _texts():
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if any(m in line for m in MARKERS):
                hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert not hits, "absolute machine paths (write them relative to the repo root):\n" + "\n".join(hits)


def test_bench_writer_makes_paths_relative(capsys):
    sys.path.insert(0, str(REPO))
    try:
        from bench.common import machine_free
    finally:
        sys.path.remove(str(REPO))
    repo = Path("/work/x/zkd")
    text = "data shards:/work/x/zkd/bench/cache/bns-1024 in /work/x/zkd; out /tmp/abc/def/run-1, `/home/u/a.pt`"
    assert machine_free(text, repo, repo / "bench" / "cache") == \
        "data shards:bench/cache/bns-1024 in .; out <path>/run-1, `<path>/a.pt`"
    assert machine_free("cache /scratch/c/bns-1024", repo, Path("/scratch/c")) == "cache $ZKD_BENCH_CACHE/bns-1024"
    assert "/tmp/abc" in capsys.readouterr().err  # what was cut is reported
    assert not any(re.search(re.escape(m), machine_free(text, repo, repo)) for m in MARKERS)
