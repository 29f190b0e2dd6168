"""Kill-anywhere resume: real `latentdiff train` processes SIGKILLed (also inside checkpoint writes) and resumed
end bit for bit where an uninterrupted run ends (the harness is benchmarks/kill_resume.py)."""

import os
import random
import sys
from pathlib import Path

import torch
from benchmark_module import load_benchmark

from latentdiff.cli import main


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``latentdiff ARGS`` in this process through the CLI's entry point: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["latentdiff", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    return code, capsys.readouterr().err


def test_the_command_that_started_a_run_resumes_it(tmp_path, monkeypatch, capsys):
    args = ["train", "digits-tiny", "data.limit=32", "train.grid_samples=2", "train.grid_steps=2", "--out", tmp_path]
    assert run_cli(monkeypatch, capsys, *args, "--steps", 2)[0] == 0
    code, err = run_cli(monkeypatch, capsys, *args, "--steps", 3, "--resume")
    assert code == 0 and "steps 2→3" in err
    code, err = run_cli(monkeypatch, capsys, *args[:2], "data.limit=16", "--out", tmp_path, "--steps", 4, "--resume")
    assert code == 2 and "cannot apply data.limit=16 (the run has data.limit=32)" in err


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    """One run killed three times (two kills aimed inside a save), resumed each time; bitwise equal at the end,
    metrics.csv included (checkpoints every 3 steps, rows every 4: a resume lands inside a log interval)."""
    kr = load_benchmark("kill_resume")
    steps, every, log_every = 12, 3, 4
    reference, seconds = kr.reference_run(tmp_path, steps, every, log_every=log_every)
    assert [k.split()[1] for k in reference["metrics.csv"] if k.endswith(" loss")] == ["4", "8", "12"]
    counts = kr.Counts()
    kr.run_trial(tmp_path / "trial", reference, random.Random(3), ["save", "any", "save"], steps, every, seconds,
                 0.01, counts, log_every=log_every)
    assert counts.failures == []
    assert counts.successes == 1 and counts.kills_during_write >= 1
    assert counts.kills + counts.finished_before_kill == 3


def test_resaving_the_resumed_step_never_unlinks_the_latest_checkpoint(tmp_path, monkeypatch):
    """A run resumed at its last step saves that step again; a kill inside that save must keep it loadable."""
    import latentdiff.training.checkpoints as ck

    groups = {"model": {"w": torch.arange(4.0)}}
    ck.save_checkpoint(tmp_path, 6, groups, {"x": 1}, keep=2)
    replace = os.replace

    def killed_at_the_folder_rename(src, dst):  # KeyboardInterrupt stands in for SIGKILL
        if Path(dst) == tmp_path / "step_00000006":
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_folder_rename)
    try:
        ck.save_checkpoint(tmp_path, 6, groups, {"x": 1}, keep=2)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    tensors, state = ck.load_checkpoint(ck.latest_checkpoint(tmp_path), ["model"])
    assert state["step"] == 6 and torch.equal(tensors["model"]["w"], torch.arange(4.0))


def test_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    from latentdiff.formats.checkpoint import atomic_write
    from latentdiff.training.checkpoints import remove_interrupted_writes

    def write(tmp):  # note the temporary name, which a SIGKILL at this moment would leave behind
        Path(tmp).write_bytes(b"weights")
        stale.append(Path(tmp))

    stale = []
    atomic_write(tmp_path / "unet" / "model.safetensors", write)
    stale[0].write_bytes(b"half")  # as a killed writer leaves it
    (tmp_path / "checkpoints" / ".tmp-step_00000008").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step_00000008" / "model.safetensors").write_bytes(b"x")
    keep = [tmp_path / ".hidden", tmp_path / "unet" / "model.safetensors", tmp_path / "notes.tmp", tmp_path / ".a.tmp"]
    for p in keep[2:] + keep[:1]:
        p.write_text("a user's file")
    removed = remove_interrupted_writes(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale[0].name, ".tmp-step_00000008"])
    assert all(p.exists() for p in keep) and not stale[0].exists()
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000008").exists()


def test_metrics_log_restarts_at_the_checkpoint_step(tmp_path):
    from latentdiff.training.metrics_log import CsvLog

    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\n2,0.5\n4,0.4\n6,0.3\n8,0.")
    CsvLog(path, None, 4).write({"step": 6, "loss": 0.25})
    assert path.read_text().splitlines() == ["step,loss", "2,0.5", "4,0.4", "6,0.25"]
    CsvLog(path, None, 0).write({"step": 2, "loss": 0.5})  # a fresh start in a folder a killed run logged to
    assert path.read_text().splitlines() == ["step,loss", "2,0.5"]
