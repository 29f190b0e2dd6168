"""Time budgets (training/plan.py, budget_run.py, recipe.py): the planning logic on a fake clock, then
tiny real budgeted runs: they end on time, annealed, and continue with a bigger budget."""

import csv
import json
import math
import subprocess
import sys
import time

import pytest
import torch

from latentdiff.errors import UserError
from latentdiff.training import make_trainer
from latentdiff.training.checkpoints import latest_checkpoint
from latentdiff.training.config import load_config
from latentdiff.training.loop import lr_at
from latentdiff.training.plan import (CALIBRATION_STEPS, BudgetPlanner, Reference, ThreadTrial, check_minutes,
                                      choose_batch, ema_decay_for, lr_for_batch, scaled_settings, steps_to_deadline)
from latentdiff.training.recipe import load_recipe


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "nan", "-inf", "ten", None])
def test_bad_budgets_are_one_line_errors(bad):
    with pytest.raises(UserError, match="--minutes must be a") as e:
        check_minutes(bad)
    assert "\n" not in str(e.value)
    assert check_minutes("0.5") == 0.5


def test_schedule_is_the_presets_stretched():
    ref = Reference(steps=4000, warmup_steps=100, ema_decay=0.999, checkpoint_every=1000, sample_every=0,
                    lr_schedule="constant", extra={"disc_start": 2000, "never": 10**6})
    s = scaled_settings(ref, 8000)
    half = lambda d: math.log(0.5) / math.log(d)  # noqa: E731
    assert half(s["ema_decay"]) == pytest.approx(2 * half(0.999))  # the same fraction of the run
    assert s["lr_schedule"] == "cosine" and s["warmup_steps"] == 100 and s["sample_every"] == 0
    assert s["checkpoint_every"] == 2000  # as many checkpoints as the preset writes
    short = scaled_settings(ref, 300)
    assert short["warmup_steps"] == 30 and short["checkpoint_every"] == 75  # warm-up at most a tenth
    from latentdiff.training.plan import scaled_extra

    assert scaled_extra(ref, 300) == {"disc_start": 150, "never": 10**6}  # a GAN the preset never reaches stays off
    assert ema_decay_for(4000, 4000, 0.999) == pytest.approx(0.999)


def test_steps_to_deadline():
    assert steps_to_deadline(10, now=0.0, deadline=100.0, seconds_per_step=0.5, reserve=10.0) == 10 + 180
    assert steps_to_deadline(10, 0.0, 100.0, 0.5, 10.0, max_steps=50) == 50
    assert steps_to_deadline(10, 95.0, 100.0, 0.5, 10.0) == 10  # only the reserve is left: stop here


class FakeRun:
    """A loop on a fake clock: each step takes `sps` seconds (changeable), a save 2 s, a grid 3 s."""

    def __init__(self, deadline, sps, **kw):
        self.t, self.sps, self.saves = 0.0, sps, 0
        ref = Reference(steps=1000, warmup_steps=50, ema_decay=0.999, checkpoint_every=250, sample_every=0,
                        lr_schedule="cosine")
        self.planner = BudgetPlanner(deadline, 0, ref, started=0.0, clock=lambda: self.t, **kw)

    def save(self):
        self.t += 2.0
        self.saves += 1
        return 2.0

    def grid(self):
        self.t += 3.0
        return 3.0

    def run(self, slow_after=None, factor=1.0):
        """Train until the plan's steps are done or time runs out; then the final save and grid."""
        steps, planned, step = 10**9, [], 0
        self.planner.begin()
        while step < steps and not self.planner.out_of_time():
            if slow_after is not None and step == slow_after:
                self.sps *= factor
            self.t += self.sps
            step += 1
            new = self.planner.after_step(step, self.save, self.grid)
            if new:
                steps = new["steps"]
                planned.append(steps)
                every = new["checkpoint_every"]
            if planned and every and step % every == 0 and step < steps:  # as the loop: after the plan
                self.planner.exclude(self.save())
        self.save()
        self.grid()
        return step, planned


def test_plan_ends_at_the_deadline():
    run = FakeRun(deadline=600.0, sps=0.25)
    step, planned = run.run()
    assert all(abs(p - step) <= 2 for p in planned) and planned[-1] == step  # steady speed: the plan held
    assert 600.0 - 0.5 <= run.t <= 600.0 + 1e-9  # finished (saved, grid made) within half a second of the deadline
    assert step > 2000 and run.saves >= 4  # calibration save, periodic ones, the final one


def test_plan_follows_a_machine_that_slows_down():
    run = FakeRun(deadline=600.0, sps=0.25)
    step, planned = run.run(slow_after=800, factor=1.25)  # 20 % less CPU from step 800 on
    assert planned[-1] < planned[0]  # re-planned to fewer steps ...
    assert step == planned[-1]  # ... and reached them: the LR schedule ended
    assert 600.0 - 1.5 <= run.t <= 600.0 + 0.3  # and still on time (within a step of the re-plan's error)


def test_budget_smaller_than_one_step_is_an_error():
    run = FakeRun(deadline=1.0, sps=0.5)
    with pytest.raises(UserError, match=r"smaller than setting up .* and 5 training steps"):
        run.run()
    late = BudgetPlanner(1.0, 0, Reference(10, 1, 0.9, 0, 0, "cosine"), started=0.0, clock=lambda: 2.0)
    with pytest.raises(UserError, match="ran out 1.0 s before the first training step"):
        late.begin()
    # a stage of a recipe (not strict) takes its calibration steps and stops: never an error
    run = FakeRun(deadline=1.0, sps=0.5, strict=False)
    step, planned = run.run()
    assert step == 1 + CALIBRATION_STEPS and planned == [step]


@pytest.mark.parametrize("busy", [False, True])
def test_thread_trial_keeps_the_faster_count(busy):
    """After a warm-up step (1 thread), two steps with 1 thread and two with 2 are timed and the faster count
    kept; on a busy machine, where 2 threads can be far slower, one slow step is enough to drop them."""
    clock, threads = [0.0], []
    per_step = {1: 0.15, 2: 0.1} if not busy else {1: 0.2, 2: 0.6}
    trial = ThreadTrial(0, [1, 2], threads.append, clock=lambda: clock[0])
    step = 0
    while True:
        clock[0] += per_step[threads[-1]]
        step += 1
        if not trial.after_step(step):
            break
    assert threads[0] == 1 and threads[-1] == trial.choice == (1 if busy else 2)
    assert step == (4 if busy else 5)
    assert trial.times == [[pytest.approx(per_step[1])] * 2, [pytest.approx(per_step[2])] * (1 if busy else 2)]
    assert trial.describe().endswith(f"keeping {trial.choice}")


def test_choose_batch_fills_the_device():
    # images/s grow with the batch until 256 (the device is full), then flatten; 1024 does not fit
    def seconds(n):
        if n >= 1024:
            raise torch.OutOfMemoryError("fake")
        return max(n, 256) / 256 * 0.01

    assert choose_batch(seconds, 32, max_batch=8192) == 256
    assert choose_batch(lambda n: n * 0.001, 32, max_batch=8192) == 32  # the CPU: images/s flat from the start
    assert choose_batch(lambda n: 0.01, 32, max_batch=128) == 128  # launch-bound: only the cap stops it

    def launch_bound_until_oom(n):
        if n >= 1024:
            raise torch.OutOfMemoryError("fake")
        return 0.01

    assert choose_batch(launch_bound_until_oom, 32, max_batch=8192) == 512
    assert lr_for_batch(1e-3, 256, 64) == pytest.approx(2e-3)


def test_recipes_load_and_refuse_bad_ones(tmp_path):
    r = load_recipe("fashion")
    assert [s.preset for s in r.stages] == ["ae-fashion", "ldm-fashion"] and 0 < r.stages[0].share < 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {name: a, preset: ae-fashion}\n  - {name: b, preset: ldm-fashion}\n")
    with pytest.raises(UserError, match="stage 'a' needs a share"):
        load_recipe(str(bad))
    bad.write_text("stages: []\n")
    with pytest.raises(UserError, match="non-empty list"):
        load_recipe(str(bad))


SLACK_STEPS = 2  # a hard deadline may cut this many of the planned steps when the machine slows at the very end


def _tiny(extra=()):
    return load_config("digits-tiny", ["train.log_every=5", "train.grid_samples=4", "train.grid_steps=2",
                                       "data.limit=64", "train.threads=1", *extra])


def test_budgeted_run_ends_on_time_annealed_and_continues(tmp_path):
    """A 0.4-minute run plans its steps, ends within the budget with the LR at 0, checkpoints its plan;
    --resume with 0.5 more minutes re-plans from where it stopped and trains further."""
    cfg = _tiny(["train.time_budget=0.4"])
    t = time.perf_counter()
    trainer = make_trainer(cfg, tmp_path, device="cpu", progress=False, started=t)
    trainer.run()
    took = time.perf_counter() - t
    assert took <= 0.4 * 60 + 5.0  # on time (give or take a step and a save on a loaded machine)
    steps, planned = trainer.step, trainer.cfg.train.steps
    # ended where it planned to: the deadline is hard, so on a loaded machine (a step suddenly slower than the
    # last re-plan measured) it may cut the last step or two, never more
    assert planned - SLACK_STEPS <= steps <= planned and steps >= 1 + CALIBRATION_STEPS
    assert lr_at(steps, trainer.cfg.train) <= 0.01 * trainer.cfg.train.lr  # annealed at the end
    state = json.loads((latest_checkpoint(tmp_path / "checkpoints") / "state.json").read_text())
    assert state["plan"]["reference"]["steps"] == 200 and state["plan"]["steps"] == planned
    assert load_config(str(tmp_path / "config.yaml")).train.steps == planned  # config.yaml holds the plan
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert int(rows[-1]["step"]) == steps
    # continue with a bigger budget
    more = load_config(str(tmp_path / "config.yaml"), ["train.time_budget=0.5"])
    again = make_trainer(more, tmp_path, resume=True, device="cpu", progress=False)
    again.run()
    assert again.step > steps and again.cfg.train.steps - SLACK_STEPS <= again.step <= again.cfg.train.steps
    state = json.loads((latest_checkpoint(tmp_path / "checkpoints") / "state.json").read_text())
    assert state["plan"]["spent_seconds"] > took - 1 and state["plan"]["reference"]["steps"] == 200


def test_cli_minutes_errors(tmp_path):
    for bad in ("0", "nan"):  # (every bad kind: test_bad_budgets_are_one_line_errors)
        r = subprocess.run([sys.executable, "-m", "latentdiff", "train", "digits-tiny", "--minutes", bad, "--out",
                            str(tmp_path / "x")], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--minutes must be a" in r.stderr
    r = subprocess.run([sys.executable, "-m", "latentdiff", "train", "digits-tiny", "--minutes", "0.0001",
                        "--out", str(tmp_path / "y"), "train.threads=1"], capture_output=True, text=True)
    assert r.returncode == 2 and "error: the time budget ran out" in r.stderr


@pytest.mark.slow
def test_budgeted_recipe_splits_ends_on_time_and_continues(tmp_path):
    """A two-stage recipe (autoencoder, then latent diffusion on its latents) in 0.75 minutes, everything
    included: the autoencoder stops at its share (or its preset's steps), the LDM plans to the deadline;
    a --resume with more minutes keeps the finished autoencoder and trains the LDM further."""
    from latentdiff.training.recipe import run_recipe

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "stages:\n"
        "  - {name: ae, preset: ae-mnist, share: 0.3,\n"
        "     overrides: ['autoencoder.base_channels=8', 'train.steps=40', 'ae_loss.perceptual_weight=0']}\n"
        "  - {name: ldm, preset: ldm-mnist,\n"
        "     overrides: ['latent.autoencoder={ae}', 'unet.model_channels=16', 'unet.attention_resolutions=[4]']}\n")
    common = ["data.limit=128", "train.threads=1", "train.grid_samples=4", "train.grid_steps=2", "train.log_every=5"]
    t = time.perf_counter()
    model = run_recipe(str(recipe), tmp_path / "run", 0.75, common, device="cpu", started=t, log=lambda m: None)
    took = time.perf_counter() - t
    assert took <= 0.75 * 60 + 5.0 and model == tmp_path / "run" / "ldm"
    stages = json.loads((tmp_path / "run" / "recipe.json").read_text())["stages"]
    assert stages["ae"]["done"] and 1 <= stages["ae"]["steps"] <= 40
    planned = load_config(str(model / "config.yaml")).train.steps
    assert stages["ldm"]["done"] and planned - SLACK_STEPS <= stages["ldm"]["steps"] <= planned
    assert stages["ae"]["seconds"] + stages["ldm"]["seconds"] <= took
    ae_ckpt = latest_checkpoint(tmp_path / "run" / "ae" / "checkpoints")
    with pytest.raises(UserError, match="already holds a tiny run"):
        run_recipe(str(recipe), tmp_path / "run", 0.5, common, device="cpu", log=lambda m: None)
    run_recipe(str(recipe), tmp_path / "run", 0.5, common, device="cpu", resume=True, log=lambda m: None)
    again = json.loads((tmp_path / "run" / "recipe.json").read_text())["stages"]
    assert again["ae"] == stages["ae"] and latest_checkpoint(tmp_path / "run" / "ae" / "checkpoints") == ae_ckpt
    assert again["ldm"]["steps"] > stages["ldm"]["steps"]


def test_recipe_picks_pixel_space_when_the_budget_buys_enough_images(tmp_path):
    """The pixel preset is timed at its batch (no weights change, nothing written); pixel space is chosen
    exactly when the images it would train in the time left reach the recipe's threshold."""
    from latentdiff.training.recipe import _pick_space

    def recipe_with(threshold):
        path = tmp_path / f"r{threshold}.yaml"
        path.write_text("stages:\n  - {name: ae, preset: ae-mnist, share: 0.3}\n  - {name: ldm, preset: ldm-mnist}\n"
                        f"pixel: {{preset: digits-tiny, min_images: {threshold}}}\n")
        return load_recipe(str(path))

    said = []
    deadline = time.perf_counter() + 60
    assert _pick_space(recipe_with(1), tmp_path / "p", ["data.limit=64"], "cpu", deadline, said.append) == "pixel"
    assert _pick_space(recipe_with(10**12), tmp_path / "p", ["data.limit=64"], "cpu", deadline, said.append) == "latent"
    assert "fewer than the 1,000,000,000,000 where it beats the latent route: latent" in said[1]
    assert not (tmp_path / "p").exists()
    with pytest.raises(UserError, match="'pixel' must be"):
        (tmp_path / "bad.yaml").write_text("stages:\n  - {name: a, preset: ldm-mnist}\npixel: {preset: x}\n")
        load_recipe(str(tmp_path / "bad.yaml"))


@pytest.mark.parametrize("preset", ["digits-tiny", "ae-mnist"])
def test_batch_size_auto_probes_without_training(preset, tmp_path):
    """train.batch_size=auto times real forward + backward passes at doubling batches (probe_step): the
    batch is the preset's times a power of two, lr scaled by √, steps by the ratio (the same images),
    config.yaml holds the choice; the probes change no weight and no random stream."""
    small = ["data.limit=512", "train.grid_samples=4", "train.steps=64", "train.warmup_steps=8"]
    if preset == "ae-mnist":
        small += ["autoencoder.base_channels=8", "ae_loss.perceptual_weight=0"]
    fixed = make_trainer(load_config(preset, small), tmp_path / "fixed", device="cpu", progress=False)
    rng_fixed = torch.get_rng_state()  # the constructor seeds torch, then builds
    cfg = load_config(preset, small + ["train.batch_size=auto"])
    assert cfg.train.lr_batch == fixed.cfg.train.batch_size
    auto = make_trainer(cfg, tmp_path / "auto", device="cpu", progress=False)
    assert torch.equal(torch.get_rng_state(), rng_fixed)
    tc, base = auto.cfg.train, fixed.cfg.train
    ratio = tc.batch_size // base.batch_size
    assert tc.batch_size == base.batch_size * ratio and ratio in (1, 2, 4) and tc.lr_batch == tc.batch_size
    assert tc.lr == pytest.approx(base.lr * math.sqrt(ratio)) and tc.steps == round(64 / ratio)
    for (k, a), b in zip(auto.model.state_dict().items(), fixed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    auto.cfg.train.steps = 1
    auto.run()
    assert load_config(str(tmp_path / "auto" / "config.yaml")).train.batch_size == tc.batch_size
