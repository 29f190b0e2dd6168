"""Peak memory of `latentdiff sample` against --n-samples: streaming (this tree) against main's write-at-the-end.

    python benchmarks/sample_memory.py [--ns 16 1000 10000] [--peer /path/to/other/src]

Trains a `digits-tiny` model for a few steps (the weights do not matter for memory), then runs
`latentdiff sample RUN --batch-size 16 --steps 2 --sampler ddim --n-samples N` in a fresh child process per
N and reads that child's peak resident set size (os.wait4's ru_maxrss). With --peer (a `src` folder of
another checkout, e.g. `git archive main src | tar -x -C /tmp/main`), the same command runs on that
code in the same session, alternating with ours, as the comparison. Writes
benchmarks/results/sample_memory.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

SAMPLE_ARGS = ["--batch-size", "16", "--steps", "2", "--sampler", "ddim", "--seed", "0"]


def peak_rss_mb(src: Path, run_dir: Path, n: int, out: Path) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one `latentdiff sample` child running the code in ``src``."""
    env = os.environ | {"PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "latentdiff", "sample", str(run_dir), "--n-samples", str(n), *SAMPLE_ARGS,
           "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def train(run_dir: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "latentdiff", "train", "digits-tiny", "train.steps=4", "data.limit=32",
                    "train.grid_samples=4", "train.grid_steps=2", "--out", str(run_dir)], env=env, check=True,
                   capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[16, 1000, 10000])
    ap.add_argument("--peer", type=Path, default=None, help="src folder of the checkout to compare against")
    args = ap.parse_args()
    command = "python benchmarks/sample_memory.py " + " ".join(sys.argv[1:])
    machine = f"{cpu_name()} ({os.cpu_count()} cores), Python {platform.python_version()}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        train(run_dir)
        for n in args.ns:
            for name, src in [("streaming (this tree)", ROOT / "src")] + ([("peer", args.peer)] if args.peer else []):
                out = Path(tmp) / "out"
                rss, sec = peak_rss_mb(src, run_dir, n, out)
                files = len(list(out.iterdir()))
                shutil.rmtree(out)
                rows.append({"code": name, "n_samples": n, "peak_rss_mb": round(rss, 1), "seconds": round(sec, 1),
                             "files": files})
                print(rows[-1], flush=True)
    ours = {r["n_samples"]: r["peak_rss_mb"] for r in rows if r["code"].startswith("streaming")}
    base = ours[min(ours)]
    lines = ["# Peak memory of `latentdiff sample` against --n-samples", "",
             f"machine: {machine}; shared with other jobs while it ran (timings are noisy, memory is not)  ",
             f"command: `{command}`  ",
             f"each run: `latentdiff sample RUN --n-samples N {' '.join(SAMPLE_ARGS)}` on a `digits-tiny` model "
             "(16x16 grey), a fresh process per run; peak RSS from os.wait4. peer: "
             f"{args.peer or 'none'}", "",
             "| code | n_samples | peak RSS (MB) | vs n = " f"{min(ours)} | seconds | files written |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{100 * (r['peak_rss_mb'] / base - 1):+.1f} %" if r["code"].startswith("streaming") else ""
        lines.append(f"| {r['code']} | {r['n_samples']} | {r['peak_rss_mb']} | {rel} | {r['seconds']} | {r['files']} |")
    out_md = ROOT / "benchmarks" / "results" / "sample_memory.md"
    out_md.write_text("\n".join(lines) + "\n")
    out_md.with_suffix(".json").write_text(json.dumps({"machine": machine, "command": command, "rows": rows},
                                                      indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
