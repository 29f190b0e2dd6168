"""Data-parallel training on the CPU (gloo, 2 processes under torchrun): the same step as one process.

Two torchrun launches in all (~45 s on 2 cores): the CLI, and tests/dist_worker.py for the other trainers,
gradient accumulation across processes and a resume.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker
from latentdiff.training.config import load_config
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_tensors
from latentdiff.training import make_trainer
from latentdiff.training.checkpoints import latest_checkpoint
from latentdiff.training.distributed import DistEnv, env_from_environ, shard

TESTS = Path(__file__).parent
GROUPS = {"diffusion": ("model", "ema"), "accum": ("model", "ema"), "autoencoder": ("model", "loss"),
          "clip": ("model",)}  # the checkpoint's weight groups of each run
TOL = {"autoencoder": 1e-2}  # see assert_same
DIFFUSION = ["data.hflip=true", "unet.num_classes=10"]  # the CLI run: flips and condition dropout in play

# Installed through PYTHONPATH in the torchrun workers: records every file-system write under LD_AUDIT_DIR.
AUDIT = '''
import atexit, os, sys
if os.environ.get("LD_AUDIT_DIR") and "RANK" in os.environ:
    watched, seen = os.path.realpath(os.environ["LD_AUDIT_DIR"]), []
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    EVENTS = ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE)
        elif event in EVENTS:
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.realpath(os.fsdecode(path))
            if p.startswith(watched):
                seen.append(event + " " + p)

    sys.addaudithook(hook)
    log = os.environ["LD_AUDIT_LOG"] + ".rank" + os.environ["RANK"]
    atexit.register(lambda: open(log, "w").write("".join(s + "\\n" for s in seen)))
'''


def torchrun(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS``; fails the test with its stderr on a non-zero exit."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd,
                       env=clean | {"OMP_NUM_THREADS": "1"} | (env or {}))
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def weights(run: Path, group: str = "model") -> dict[str, torch.Tensor]:
    return load_tensors(latest_checkpoint(run / "checkpoints") / f"{group}.safetensors")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], init: dict[str, torch.Tensor] | None = None,
                tol: float = 1e-3) -> None:
    """Equal weights (``init`` None); or, from differently summed gradients, apart by at most ``tol`` of how
    far training moved them from ``init``, on average over all weights.

    Not per weight: Adam's first steps move a weight by about lr whatever the size of its gradient, so a
    weight whose gradient is zero up to rounding takes a ±lr step on a rounding difference. Measured:
    diffusion and CLIP runs agree to ~1e-5 of their movement; the autoencoder (Adam β = 0.5, 0.9, a GAN)
    to 4e-4 between 1 and 2 processes and 5e-3 between 1 and 2 micro-steps (2e-2 if the thread counts
    differ too), against 0.6-0.7 when its batches really differ (half the batch, or other flips).
    """
    assert a.keys() == b.keys()
    if init is None:
        for k in a:
            assert torch.equal(a[k], b[k]), k
        return
    keys = [k for k in a if a[k].is_floating_point()]
    n = sum(a[k].numel() for k in keys)
    apart = sum(float((a[k] - b[k]).abs().sum()) for k in keys) / n
    moved = sum(float((a[k] - init[k]).abs().sum()) for k in keys) / n
    assert moved > 1e-5, "the run did not train"
    assert apart <= tol * moved, (apart, moved)


def initial(cfg, tmp_path: Path, group: str) -> dict[str, torch.Tensor]:
    """The weights of ``group`` before the first step (same seed, same init)."""
    return make_trainer(cfg, tmp_path / "init", device="cpu").modules()[group].state_dict()


def losses(run: Path) -> list[float]:
    rows = (run / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("loss")
    return [float(r.split(",")[col]) for r in rows[1:]]


def single_process(cfg, out: Path, threads: int = 0) -> Path:
    """The same run in this process (one process, one micro-step: the global batch at once)."""
    cfg.train.grad_accum, cfg.train.threads = 1, threads  # threads=1 as the torchrun workers: same kernels
    make_trainer(cfg, out, device="cpu", progress=False).run()
    return out


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    torchrun([str(TESTS / "dist_worker.py"), str(out)], out)
    return out


def test_cli_under_torchrun_equals_one_process_and_only_rank0_writes(tmp_path):
    site, out = tmp_path / "site", tmp_path / "run"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    overrides = dist_worker.STEPS + DIFFUSION
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "LD_AUDIT_DIR": str(out), "LD_AUDIT_LOG": str(tmp_path / "audit")}
    r = torchrun(["-m", "latentdiff", "train", "digits-tiny", "--out", str(out), "--device", "cpu", *overrides],
                 tmp_path, env)
    assert r.stdout.count("model:") == 1  # one report, from rank 0
    assert "training on 2 processes (gloo)" in r.stderr and "global batch 8 = 2 process(es)" in r.stderr

    rank0, rank1 = ((tmp_path / f"audit.rank{i}").read_text() for i in (0, 1))
    assert "metrics.csv" in rank0 and "checkpoints" in rank0 and "unet" in rank0  # the audit sees writes ...
    assert rank1 == ""  # ... and rank 1 made none

    one = single_process(load_config("digits-tiny", overrides), tmp_path / "one", threads=1)
    for group in GROUPS["diffusion"]:
        assert_same(weights(out, group), weights(one, group), initial(load_config("digits-tiny", overrides),
                                                                      tmp_path, group))
    assert losses(out) == pytest.approx(losses(one), rel=1e-5)  # logged: the mean over both processes
    assert len(losses(out)) == 3  # one row per step: rank 1 appended nothing


@pytest.mark.parametrize("name", list(dist_worker.RUNS))
def test_two_processes_equal_one_process(worker_runs, tmp_path, name):
    """autoencoder (GAN on), CLIP (contrastive loss over both processes' pairs), 2 processes × 2 micro-steps."""
    one = single_process(dist_worker.config(name), tmp_path / "one", threads=1)
    for group in GROUPS[name]:
        assert_same(weights(worker_runs / name, group), weights(one, group),
                    initial(dist_worker.config(name), tmp_path, group), TOL.get(name, 1e-3))
    assert losses(worker_runs / name) == pytest.approx(losses(one), rel=1e-4)


def test_resume_under_torchrun_equals_uninterrupted(worker_runs):
    """2 steps, resume to 4 == 4 straight, with dropout (each rank's RNG stream is in the checkpoint)."""
    for group in ("model", "ema"):
        assert_same(weights(worker_runs / "split", group), weights(worker_runs / "straight", group))
    rng = load_tensors(latest_checkpoint(worker_runs / "split" / "checkpoints") / "rng.safetensors")
    assert "torch.rank1" in rng and not torch.equal(rng["torch"], rng["torch.rank1"])


@pytest.mark.parametrize("preset,extra", [
    ("digits-tiny", ["data.hflip=true", "unet.num_classes=10"]),
    ("ae-mnist", ["data.source=digits", "data.image_size=16", "autoencoder.base_channels=8",
                  "autoencoder.channel_mult=[1,2]"]),  # reconstruction, perceptual and KL terms (GAN not yet on)
])
def test_grad_accumulation_equals_one_big_batch(tmp_path, preset, extra):
    """2 micro-batches of 4 == 1 batch of 8 (one process)."""
    cfg = load_config(preset, dist_worker.STEPS + extra + ["train.grad_accum=2"])
    make_trainer(cfg, tmp_path / "accum", device="cpu", progress=False).run()
    one = single_process(load_config(preset, dist_worker.STEPS + extra), tmp_path / "one")
    assert_same(weights(tmp_path / "accum"), weights(one), initial(cfg, tmp_path, "model"), TOL.get(cfg.model, 1e-3))


def test_fp16_grad_scaler_trains_and_resumes(tmp_path):
    """precision=fp16: scaled backward, unscaled clipping, the scaler's state in the checkpoint (CLIP: quick on CPU)."""
    cfg = dist_worker.config("clip")
    cfg.train.precision = "fp16"
    make_trainer(cfg, tmp_path / "straight", device="cpu", progress=False).run()
    cfg.train.steps = 2
    make_trainer(cfg, tmp_path / "split", device="cpu", progress=False).run()
    cfg.train.steps = 3
    trainer = make_trainer(cfg, tmp_path / "split", resume=True, device="cpu", progress=False)
    assert trainer.scaler.state_dict()["_growth_tracker"] == 2  # restored: two steps without overflow
    trainer.run()
    assert_same(weights(tmp_path / "split"), weights(tmp_path / "straight"))
    assert all(math.isfinite(v) for v in losses(tmp_path / "straight"))


def test_shards_partition_the_global_batch():
    rows = {}
    for rank in range(3):
        for micro, s in enumerate(shard(24, 2, DistEnv(rank, 3, rank))):
            rows[(micro, rank)] = list(range(24))[s]
    assert sorted(sum(rows.values(), [])) == list(range(24))  # every row once
    # micro-step i is a contiguous block of the batch, split over the ranks in rank order
    assert rows[(0, 0)] + rows[(0, 1)] + rows[(0, 2)] == list(range(12))


def test_distributed_config_errors(monkeypatch, tiny_cfg, tmp_path):
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(UserError, match="RANK='one'"):
        env_from_environ()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="RANK=2 WORLD_SIZE=2"):
        env_from_environ()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    tiny_cfg.train.batch_size, tiny_cfg.train.grad_accum = 6, 4
    with pytest.raises(UserError, match=r"train.batch_size=6.*grad_accum=4.*divisible by 4"):
        make_trainer(tiny_cfg, tmp_path)
    with pytest.raises(UserError, match="train.precision"):
        load_config("digits-tiny", ["train.precision=fp8"])
    for legacy in (["train.bf16=true"], ["train.bf16=true", "train.precision=fp16"], ["train.bf16=1"],
                   ["train.bf16=false", "train.precision=bf16"]):
        with pytest.raises(UserError, match=r"train\.bf16 was removed: use train\.precision=bf16"):
            load_config("digits-tiny", legacy)
    # what older versions wrote into a run's config.yaml (bf16 mirrored precision) still loads, to resume
    for precision in ("fp32", "bf16", "fp16"):
        old = load_config("digits-tiny", [f"train.precision={precision}", f"train.bf16={precision == 'bf16'}"])
        assert old.train.precision == precision and "bf16" not in old.to_dict()["train"]
