"""``make bench``: run every benchmark script in order; each writes bench/results/<name>.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ORDER = ["bench_synthesis.py", "bench_similarity.py", "bench_quant.py", "bench_objectives.py"]

here = Path(__file__).resolve().parent
failed = []
for name in ORDER:
    script = here / name
    if not script.is_file():
        continue
    print(f"== {name}", flush=True)
    if subprocess.run([sys.executable, str(script)]).returncode != 0:
        failed.append(name)
if failed:
    sys.exit(f"benchmarks failed: {', '.join(failed)}")
