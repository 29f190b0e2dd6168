"""Load test of `latentdiff serve`: N concurrent clients on loopback against one bounded queue.

    nice -n 10 python benchmarks/server_load.py --clients 12 --jobs-per-client 4 --queue 4

Starts the real server (uvicorn, 127.0.0.1, a free port) with a tiny freshly trained model (or
``--model``). Every client submits its jobs one after the other; an accepted job is followed over its
server-sent events to the end and its PNGs are fetched and checked (the seed in the metadata); a 429
answer counts as rejected and the client moves on. At the end the server's job list must hold exactly
the accepted jobs, each done once, with as many result folders: nothing lost, nothing duplicated.
Writes benchmarks/results/server_load.md and .json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port nothing listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(folder: Path) -> Path:
    """digits-tiny trained for 4 steps: enough to exercise the whole path quickly."""
    subprocess.run([sys.executable, "-m", "latentdiff", "train", "digits-tiny", "train.grid_samples=4",
                    "train.grid_steps=2", "data.limit=32", "--steps", "4", "--out", str(folder)],
                   check=True, capture_output=True)
    return folder


def client(base: str, model: str, jobs: int, steps: int, seed0: int, record: list, lock: threading.Lock) -> None:
    """Submit ``jobs`` jobs in turn; follow each accepted one to its end and check its PNG."""
    from PIL import Image

    with httpx.Client(base_url=base, timeout=300) as c:
        for k in range(jobs):
            seed = seed0 + k
            t0 = time.perf_counter()
            r = c.post("/api/jobs", json={"model": model, "sampler": "DDIM", "steps": steps, "seed": seed})
            entry = {"seed": seed, "status_code": r.status_code}
            if r.status_code == 202:
                job_id, last = r.json()["id"], None
                with c.stream("GET", f"/api/jobs/{job_id}/events") as ev:
                    for line in ev.iter_lines():
                        if line.startswith("data: "):
                            last = json.loads(line[6:])
                entry |= {"id": job_id, "final": last["event"], "latency_s": time.perf_counter() - t0}
                if last["event"] == "done":
                    png = Image.open(io.BytesIO(c.get(last["images"][0]).content))
                    entry["png_seed_ok"] = json.loads(png.info["latentdiff"])["seed"] == seed
            with lock:
                record.append(entry)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile by linear interpolation between order statistics."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def main() -> None:
    """Run the load test and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--jobs-per-client", type=int, default=4)
    ap.add_argument("--queue", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model", type=Path, default=None, help="a model folder (default: train a tiny one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/server_load")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import cpu_name  # benchmarks/machine.py, beside this script

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "model") if args.model is None else args.model
        port, outputs = free_port(), Path(tmp) / "outputs"
        server = subprocess.Popen([sys.executable, "-m", "latentdiff", "serve", "--model", str(model), "--port",
                                   str(port), "--queue", str(args.queue), "--out", str(outputs)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    model_id = httpx.get(base + "/api/models", timeout=1).json()[0]["id"]
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            record: list[dict] = []
            lock = threading.Lock()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(base, model_id, args.jobs_per_client, args.steps, 1000 * i,
                                                              record, lock)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            server_jobs = httpx.get(base + "/api/jobs").json()
        finally:
            server.terminate()
            server.wait(30)
        folders = sorted(p.name for p in outputs.iterdir()) if outputs.exists() else []

    accepted = [r for r in record if r["status_code"] == 202]
    rejected = [r for r in record if r["status_code"] == 429]
    other = [r for r in record if r["status_code"] not in (202, 429)]
    ids = [r["id"] for r in accepted]
    done = [r for r in accepted if r["final"] == "done"]
    lat = [r["latency_s"] for r in done]
    checks = {
        "every request answered 202 or 429": not other,
        "accepted ids unique": len(set(ids)) == len(ids),
        "server lists exactly the accepted jobs": sorted(j["id"] for j in server_jobs) == sorted(ids),
        "every accepted job done": len(done) == len(accepted) and all(j["status"] == "done" for j in server_jobs),
        "one result folder per accepted job": folders == sorted(ids),
        "every PNG carries its seed": all(r["png_seed_ok"] for r in done),
        "server-side progress complete": all(j["done"] == j["total"] == args.steps for j in server_jobs),
    }
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores",
              "command": "nice -n 10 python benchmarks/server_load.py " + " ".join(sys.argv[1:]),
              "settings": vars(args) | {"model": str(args.model or "digits-tiny, 4 training steps"),
                                        "out": str(args.out)},
              "requests": len(record), "completed": len(done), "rejected_429": len(rejected), "other": len(other),
              "wall_seconds": round(wall, 2), "jobs_per_second": round(len(done) / wall, 3),
              "latency_s": {f"p{q}": round(percentile(lat, q), 3) for q in (50, 90, 99)} | {"max": round(max(lat), 3)},
              "checks": checks}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    sys.exit(0 if all(checks.values()) else 1)


def markdown(r: dict) -> str:
    """The results page."""
    s, lat = r["settings"], r["latency_s"]
    checks = "\n".join(f"| {k} | {'yes' if v else '**NO**'} |" for k, v in r["checks"].items())
    return (f"# Web app under load\n\nMachine: {r['machine']}. Command: `{r['command']}` ({r['wall_seconds']} s of "
            f"load).\n\n`latentdiff serve` on 127.0.0.1 (uvicorn) with {s['model']}, queue bound {s['queue']}; "
            f"{s['clients']} concurrent clients each submit {s['jobs_per_client']} jobs in turn (DDIM, "
            f"{s['steps']} steps, 16x16), follow each accepted job over server-sent events and fetch its PNG; "
            f"a 429 (busy) answer is counted and the client moves on.\n\n"
            f"| | value |\n|---|---:|\n| requests | {r['requests']} |\n| completed | {r['completed']} |\n"
            f"| rejected (429 busy) | {r['rejected_429']} |\n| other answers | {r['other']} |\n"
            f"| completed jobs / s | {r['jobs_per_second']} |\n"
            f"| latency submit → done, p50 / p90 / p99 / max (s) | {lat['p50']} / {lat['p90']} / {lat['p99']} / "
            f"{lat['max']} |\n\nChecks (nothing lost, nothing duplicated):\n\n"
            f"| check | passed |\n|---|---|\n{checks}\n")


if __name__ == "__main__":
    main()
