"""Kill-anywhere resume: SIGKILL real `latentdiff train` runs at random moments, resume, compare.

    nice -n 10 python benchmarks/kill_resume.py --trials 20

Each trial trains the `digits-tiny` preset (CPU, one thread, deterministic) in a child process that is
SIGKILLed several times, half of the kills aimed at a checkpoint write, and resumed with `--resume` (or
started again when no checkpoint exists yet) until it finishes. After every kill: the checkpoint
`latest.json` points at loads completely and its step never goes back; each resumed child starts at that
step. At the end: the weights, EMA, optimiser and RNG state equal an uninterrupted run's bit for bit, no
temporary file is left in the run folder, and metrics.csv equals the uninterrupted run's row for row (but
for the timing column, images_per_s), also when checkpoint_every is not a multiple of log_every. The tests run a trial
through the same functions (tests/test_kill_resume.py).

The child is the real CLI with slower writes (``--child``): every safetensors file is written in two
halves with a pause between, and every rename and folder removal pauses first, so a random kill often
lands inside a checkpoint write. The pauses change no computed value. Writes
benchmarks/results/kill_resume.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER_ENV = "KILL_RESUME_MARKER"  # the child writes its save phase here ("checkpoint", "export")
DELAY_ENV = "KILL_RESUME_DELAY"  # seconds of each widening pause in the child
TRAIN_ARGS = ["digits-tiny", "train.threads=1", "data.limit=64", "train.batch_size=16", "train.warmup_steps=2",
              "train.grid_samples=4", "train.grid_steps=2", "train.keep_checkpoints=2"]
TIMING_COLUMNS = ("images_per_s",)  # metrics.csv columns that measure the machine, not the run


@dataclass
class Counts:
    """What happened over the trials."""

    trials: int = 0
    successes: int = 0  # finished, bitwise equal to the uninterrupted run, no temp files, clean log
    kills: int = 0
    kills_during_write: int = 0  # inside TrainingRun.save: checkpoint files, pointer, pruning or export
    kills_in_checkpoint: int = 0  # of those, while the checkpoint folder or its pointer was being written
    kills_before_first_checkpoint: int = 0
    resumes: int = 0  # children started with --resume
    fresh_starts: int = 0  # children started again because no checkpoint existed yet
    finished_before_kill: int = 0  # the child ended before its kill moment came
    failures: list[str] = field(default_factory=list)


def train_command(out: Path, steps: int, checkpoint_every: int, resume: bool, child: bool,
                  log_every: int = 4) -> list[str]:
    """The `latentdiff train` command line (through this script's --child shim when ``child``)."""
    head = [sys.executable, __file__, "--child"] if child else [sys.executable, "-m", "latentdiff"]
    args = ["train", *TRAIN_ARGS, f"train.log_every={log_every}", f"train.checkpoint_every={checkpoint_every}",
            "--steps", str(steps), "--out", str(out)]
    return head + args + (["--resume"] if resume else [])


def final_state(run: Path) -> dict[str, dict]:
    """Every tensor group of the latest checkpoint and the exported UNet, as name -> tensors."""
    from latentdiff.formats.checkpoint import load_tensors
    from latentdiff.training.checkpoints import latest_checkpoint

    folder = latest_checkpoint(run / "checkpoints")
    groups = {p.stem: load_tensors(p) for p in sorted(folder.glob("*.safetensors"))}
    groups["exported_unet"] = load_tensors(run / "unet" / "model.safetensors")
    groups["metrics.csv"] = logged_metrics(run)
    return groups


def logged_metrics(run: Path) -> dict:
    """metrics.csv as "step N column" -> a float64 scalar (Python writes floats in their shortest exact form,
    so equal bits mean an equal row), less the timing columns; the header's order is a tensor too."""
    import csv

    import torch

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    keep = [i for i, name in enumerate(header) if name not in TIMING_COLUMNS]
    values = {f"step {row[0]} {header[i]}": torch.tensor(float(row[i]), dtype=torch.float64)
              for row in rows[1:] for i in keep}
    values["header"] = torch.tensor(list(",".join(header).encode()), dtype=torch.uint8)
    return values


def bitwise_differences(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    """Names of groups/tensors that differ in any bit (or exist on one side only)."""
    import torch

    diffs = sorted(set(a) ^ set(b))
    for g in sorted(set(a) & set(b)):
        if a[g].keys() != b[g].keys():
            diffs.append(f"{g} (keys)")
            continue
        diffs += [f"{g}/{k}" for k in a[g] if a[g][k].dtype != b[g][k].dtype or a[g][k].shape != b[g][k].shape
                  or not torch.equal(_bits(a[g][k]), _bits(b[g][k]))]
    return diffs


def _bits(t):
    """The raw bytes of a tensor (so NaN equals NaN and -0.0 differs from 0.0)."""
    import torch

    return t.reshape(-1).view(torch.uint8)


def checkpoint_step(run: Path) -> int | None:
    """The step of the checkpoint latest.json points at after loading all of it, or None if there is none."""
    from latentdiff.formats.checkpoint import load_json, load_tensors
    from latentdiff.training.checkpoints import latest_checkpoint

    folder = latest_checkpoint(run / "checkpoints")
    if folder is None:
        return None
    for f in folder.glob("*.safetensors"):
        load_tensors(f)  # raises a UserError on a truncated or corrupt file
    state = load_json(folder / "state.json")
    if state["step"] != int(folder.name.split("_")[1]):
        raise AssertionError(f"{folder}: state.json says step {state['step']}")
    return state["step"]


def leftover_temps(run: Path) -> list[str]:
    """Temporary files or folders of interrupted writes anywhere in the run folder."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")
                  if p.name.startswith(".tmp-") or (p.name.startswith(".") and p.name.endswith(".tmp")))


def logged_steps(run: Path) -> list[int]:
    """The step column of metrics.csv."""
    lines = (run / "metrics.csv").read_text().splitlines()[1:]
    return [int(line.split(",", 1)[0]) for line in lines if line]


def start_step(stderr: str) -> int | None:
    """The first step a child trained from ('steps A→B' in its first line), or None."""
    for line in stderr.splitlines():
        if line.startswith("training on") and "steps " in line:
            return int(line.rsplit("steps ", 1)[1].split("→", 1)[0])
    return None


def run_trial(work: Path, reference: dict[str, dict], rng: random.Random, kill_modes: list[str], steps: int,
              checkpoint_every: int, run_seconds: float, delay: float, counts: Counts,
              timeout: float = 300.0, log_every: int = 4) -> None:
    """One training run killed once per mode ("save": inside a save, "any": at a random moment of the run),
    resumed to the end and checked; failures go to ``counts``."""
    run, marker = work / "run", work / "saving"
    work.mkdir(parents=True, exist_ok=True)
    env = os.environ | {MARKER_ENV: str(marker), DELAY_ENV: str(delay), "PYTHONUNBUFFERED": "1"}
    counts.trials += 1
    failures: list[str] = []
    for i in range(len(kill_modes) + 1):
        before = checkpoint_step(run)
        last = i == len(kill_modes)
        log = work / f"child{i}.err"
        cmd = train_command(run, steps, checkpoint_every, resume=before is not None, child=True, log_every=log_every)
        with open(log, "w") as err:
            child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=work)
        counts.resumes += before is not None
        counts.fresh_starts += before is None and i > 0
        if last:
            rc = child.wait(timeout)
            if rc != 0:
                failures.append(f"final run exit {rc}: {log.read_text()[-300:]}")
        else:
            saves_left = max(1, (steps - (before or 0)) // checkpoint_every)
            _kill(child, run, marker, kill_modes[i], rng, saves_left, run_seconds, delay, counts, timeout)
        marker.unlink(missing_ok=True)
        text = log.read_text()
        if before is not None and start_step(text) not in (None, before):
            failures.append(f"child {i} resumed from step {start_step(text)}, latest checkpoint was {before}")
        try:
            after = checkpoint_step(run)
        except Exception as e:  # a checkpoint that does not load is the failure this harness looks for
            failures.append(f"after kill {i}: latest checkpoint does not load ({type(e).__name__}: {e})")
            break
        if before is not None and (after is None or after < before):
            failures.append(f"after kill {i}: latest checkpoint went back from step {before} to {after}")
    if not failures:
        diffs = bitwise_differences(final_state(run), reference)
        if diffs:
            failures.append(f"final state differs from the uninterrupted run: {', '.join(diffs[:5])}")
        if leftover_temps(run):
            failures.append(f"temporary files left: {', '.join(leftover_temps(run)[:5])}")
        if logged_steps(run) != sorted(set(logged_steps(run))):
            failures.append(f"metrics.csv steps repeat or go back: {logged_steps(run)}")
    counts.failures += [f"trial {counts.trials}: {f}" for f in failures]
    counts.successes += not failures


def _kill(child: subprocess.Popen, run: Path, marker: Path, mode: str, rng: random.Random, saves_left: int,
          run_seconds: float, delay: float, counts: Counts, timeout: float) -> None:
    """SIGKILL ``child`` at a random moment inside one of its next ``saves_left`` saves (mode "save") or
    anywhere in the run ("any")."""
    t0 = time.monotonic()
    if mode == "save":  # wait for the start of a random save, then land somewhere inside it (~17 pauses)
        for _ in range(rng.randint(1, saves_left)):
            while marker.exists() and child.poll() is None and time.monotonic() - t0 < timeout:
                time.sleep(0.002)
            while not marker.exists() and child.poll() is None and time.monotonic() - t0 < timeout:
                time.sleep(0.002)
        time.sleep(rng.uniform(0, 15 * delay))
    else:
        time.sleep(rng.uniform(0, run_seconds))
    if child.poll() is not None:
        counts.finished_before_kill += 1
        return
    had_checkpoint = (run / "checkpoints" / "latest.json").exists()
    child.send_signal(signal.SIGKILL)
    child.wait()
    counts.kills += 1
    counts.kills_before_first_checkpoint += not had_checkpoint
    phase = marker.read_text() if marker.exists() else None
    if phase is not None:
        counts.kills_during_write += 1
        counts.kills_in_checkpoint += phase == "checkpoint"


def reference_run(work: Path, steps: int, checkpoint_every: int, timeout: float = 300.0,
                  log_every: int = 4) -> tuple[dict, float]:
    """An uninterrupted run through the plain CLI: its final state and its wall time."""
    t0 = time.perf_counter()
    r = subprocess.run(train_command(work / "reference", steps, checkpoint_every, resume=False, child=False,
                                     log_every=log_every),
                       capture_output=True, text=True, timeout=timeout, cwd=work)
    if r.returncode != 0:
        raise RuntimeError(f"reference run failed: {r.stderr[-500:]}")
    return final_state(work / "reference"), time.perf_counter() - t0


# ---------------------------------------------------------------------------------- the child shim


def _child() -> None:
    """Run the CLI with widened write windows and the save phase written to $KILL_RESUME_MARKER."""
    import shutil

    from safetensors.torch import save

    import latentdiff.formats.checkpoint as fc
    import latentdiff.training.loop as loop
    from latentdiff.cli import main

    delay, marker = float(os.environ[DELAY_ENV]), Path(os.environ[MARKER_ENV])

    def slow_save_file(tensors, filename, metadata=None):  # half a file on disk, a pause, the rest
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(delay)
            f.write(data[len(data) // 2:])

    def paused(fn):
        def wrapper(*args, **kwargs):
            time.sleep(delay)
            return fn(*args, **kwargs)
        return wrapper

    def phase(fn, before, after):
        def wrapper(*args, **kwargs):
            marker.write_text(before)
            result = fn(*args, **kwargs)
            if after:
                marker.write_text(after)
            else:
                marker.unlink(missing_ok=True)
            return result
        return wrapper

    fc.save_file = slow_save_file
    os.replace, shutil.rmtree = paused(os.replace), paused(shutil.rmtree)
    loop.save_training_state = phase(loop.save_training_state, "checkpoint", "export")
    loop.TrainingRun.save = phase(loop.TrainingRun.save, "save", None)
    sys.argv = ["latentdiff", *sys.argv[2:]]
    main()


# ---------------------------------------------------------------------------------- the benchmark


def main() -> None:
    """Run the trials and write benchmarks/results/kill_resume.{md,json}."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from machine import cpu_name  # benchmarks/machine.py, beside this script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--log-every", type=int, default=4)
    ap.add_argument("--p-write", type=float, default=0.5, help="share of kills aimed at a save")
    ap.add_argument("--delay", type=float, default=0.01, help="seconds of each widening pause in the child")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kill_resume")
    args = ap.parse_args()
    counts, rng, t0 = Counts(), random.Random(args.seed), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        reference, ref_seconds = reference_run(Path(tmp), args.steps, args.checkpoint_every,
                                               log_every=args.log_every)
        for trial in range(args.trials):
            work = Path(tmp) / f"trial{trial}"
            modes = ["save" if rng.random() < args.p_write else "any" for _ in range(args.kills)]
            run_trial(work, reference, rng, modes, args.steps, args.checkpoint_every, ref_seconds, args.delay, counts,
                      log_every=args.log_every)
            print(f"trial {trial + 1}/{args.trials}: {counts.successes} ok, {counts.kills} kills "
                  f"({counts.kills_during_write} during a save)", file=sys.stderr)
    command = "nice -n 10 python benchmarks/kill_resume.py " + " ".join(sys.argv[1:])
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "command": command.strip(),
              "settings": vars(args) | {"out": str(args.out.relative_to(ROOT)) if args.out.is_relative_to(ROOT)
                                        else str(args.out)},
              "train_args": TRAIN_ARGS, "reference_seconds": round(ref_seconds, 1),
              "wall_seconds": round(time.perf_counter() - t0, 1), **asdict(counts)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    sys.exit(0 if counts.successes == counts.trials else 1)


def _markdown(r: dict) -> str:
    rows = [("trials", r["trials"]), ("successes (bitwise equal, no temp files, clean log)", r["successes"]),
            ("SIGKILLs", r["kills"]), ("… during a save (checkpoint or model export)", r["kills_during_write"]),
            ("… … while the checkpoint folder or latest.json was written", r["kills_in_checkpoint"]),
            ("… before the first checkpoint", r["kills_before_first_checkpoint"]),
            ("resumes (--resume)", r["resumes"]), ("fresh starts (no checkpoint yet)", r["fresh_starts"]),
            ("children that finished before their kill moment", r["finished_before_kill"])]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    failures = "\n".join(f"- {f}" for f in r["failures"]) or "none"
    return (f"# Kill-anywhere resume\n\nMachine: {r['machine']}. Command: `{r['command']}` "
            f"({r['wall_seconds']:.0f} s; the uninterrupted reference run took {r['reference_seconds']} s).\n\n"
            f"Run: `latentdiff train {' '.join(r['train_args'])} "
            f"train.log_every={r['settings'].get('log_every', 4)} train.checkpoint_every="
            f"{r['settings']['checkpoint_every']} --steps {r['settings']['steps']}`, {r['settings']['kills']} "
            f"SIGKILLs per trial, then resumed to the end. Success means: after every kill the checkpoint that "
            f"latest.json names loads and its step never goes back, every resumed process starts at that step, "
            f"and at the end the model, EMA, optimiser and RNG state and the exported UNet equal the "
            f"uninterrupted run's **bit for bit**, no temporary file is left and metrics.csv lists each step "
            f"once and equals the uninterrupted run's (but for images_per_s).\n\n| count | value |\n|---|---:|\n"
            f"{table}\n\nFailures: {failures}\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child()
    else:
        main()
