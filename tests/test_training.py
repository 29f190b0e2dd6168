"""Training: exact resume, atomic checkpoints, model-folder export, config checks."""

import os

import pytest
import torch

from latentdiff.training.config import RunConfig, load_config
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_tensors, save_tensors
from latentdiff.training.checkpoints import latest_checkpoint
from latentdiff.training.diffusion_trainer import DiffusionTrainer as Trainer
from latentdiff.training.loop import lr_at


def _weights(run_dir):
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return load_tensors(ckpt / "model.safetensors"), load_tensors(ckpt / "ema.safetensors")


def test_resume_is_exact(tiny_cfg, tmp_path):
    """3 steps, stop, resume to 6 == 6 steps straight (model, EMA), with dropout and flips in play."""
    tiny_cfg.unet.dropout = 0.1
    tiny_cfg.data.hflip = True
    Trainer(tiny_cfg, tmp_path / "straight", progress=False).run()
    tiny_cfg.train.steps = 3
    Trainer(tiny_cfg, tmp_path / "split", progress=False).run()
    tiny_cfg.train.steps = 6
    Trainer(tiny_cfg, tmp_path / "split", resume=True, progress=False).run()
    (m1, e1), (m2, e2) = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    for a, b in ((m1, m2), (e1, e2)):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # and the run really trained: weights moved away from the (zero-initialised) output layer
    assert float(m1["out.2.weight"].abs().sum()) > 0


def test_a_run_killed_inside_a_log_interval_logs_as_an_uninterrupted_one(tiny_cfg, tmp_path):
    """Checkpoints every 3 steps, rows every 2: killed after the checkpoint of step 3, the resumed run's row of
    step 4 must still average steps 3 and 4 (the running sums travel in the checkpoint), so metrics.csv equals
    the uninterrupted run's, all but its timing column."""
    Trainer(tiny_cfg, tmp_path / "straight", progress=False).run()
    killed = Trainer(tiny_cfg, tmp_path / "split", progress=False)
    step = killed.train_step

    def killed_after_the_checkpoint():  # KeyboardInterrupt stands in for SIGKILL
        if killed.step == 3:
            raise KeyboardInterrupt
        return step()

    killed.train_step = killed_after_the_checkpoint
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    assert [row["step"] for row in _metrics(tmp_path / "split")] == ["2"]
    Trainer(tiny_cfg, tmp_path / "split", resume=True, progress=False).run()
    straight, split = (_metrics(tmp_path / name) for name in ("straight", "split"))
    assert [row["step"] for row in straight] == ["2", "4", "6"] and split == straight


def _metrics(run_dir):
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(f)]


def test_run_folder_layout(tiny_cfg, tmp_path):
    grid = Trainer(tiny_cfg, tmp_path, progress=False).run()
    assert grid.is_file()
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "unet" / "config.json").is_file()
    assert (tmp_path / "config.yaml").is_file()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 4  # header + steps 2, 4, 6
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006"]
    # the exported model is the EMA copy
    ema = load_tensors(latest_checkpoint(tmp_path / "checkpoints") / "ema.safetensors")
    exported = load_tensors(tmp_path / "unet" / "model.safetensors")
    torch.testing.assert_close(exported, ema)


def test_refuses_to_overwrite_and_to_resume_nothing(tiny_cfg, tmp_path):
    tiny_cfg.train.steps = 3
    Trainer(tiny_cfg, tmp_path, progress=False).run()
    with pytest.raises(UserError, match="--resume"):
        Trainer(tiny_cfg, tmp_path)
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer(tiny_cfg, tmp_path / "empty", resume=True)


def test_resume_refuses_changed_data(tiny_cfg, tmp_path):
    tiny_cfg.train.steps = 3
    Trainer(tiny_cfg, tmp_path, progress=False).run()
    tiny_cfg.data.limit = 32
    with pytest.raises(UserError, match="data set changed"):
        Trainer(tiny_cfg, tmp_path, resume=True)


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tiny_cfg, tmp_path, monkeypatch):
    """A crash in the middle of writing step 6 leaves step 3 loadable and pointed at."""
    tiny_cfg.train.steps = 6
    trainer = Trainer(tiny_cfg, tmp_path, progress=False)
    import latentdiff.training.checkpoints as ck

    real = ck.save_tensors
    calls = {"n": 0}

    def flaky(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 6:  # 4 groups at step 3, then die on the 2nd file of step 6
            raise KeyboardInterrupt
        real(tensors, path, metadata)

    monkeypatch.setattr(ck, "save_tensors", flaky)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    latest = latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step_00000003"
    monkeypatch.setattr(ck, "save_tensors", real)
    resumed = Trainer(tiny_cfg, tmp_path, resume=True, progress=False)
    assert resumed.step == 3
    resumed.run()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000006"


def test_corrupt_checkpoint_is_a_clear_error(tiny_cfg, tmp_path):
    tiny_cfg.train.steps = 3
    Trainer(tiny_cfg, tmp_path, progress=False).run()
    f = latest_checkpoint(tmp_path / "checkpoints") / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(UserError, match="model.safetensors"):
        Trainer(tiny_cfg, tmp_path, resume=True)


def test_mismatched_weights_name_the_keys(tmp_path):
    from latentdiff.formats.checkpoint import load_into
    from latentdiff.models.unet import UNet, UNetConfig

    small = UNet(UNetConfig(model_channels=16, num_heads=2))
    state = small.state_dict()
    state.pop("out.2.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing 1 key\(s\) e.g. out.2.bias.*unexpected.*extra.weight"):
        load_into(small, state, "x.safetensors")
    bigger = UNet(UNetConfig(model_channels=32, num_heads=2)).state_dict()
    with pytest.raises(UserError, match="shape mismatch"):
        load_into(small, bigger, "x.safetensors")


def test_nonfinite_losses_are_skipped_then_stop(tiny_cfg, tmp_path):
    """Non-finite steps are skipped on the device (weights, EMA and AdamW state untouched) and counted when
    the loop next reads its logs (every log_every = 2 steps, and before a checkpoint, here at step 3): past
    max_bad_steps it stops, naming the steps."""
    tiny_cfg.train.max_bad_steps = 2
    trainer = Trainer(tiny_cfg, tmp_path, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.model.state_dict().items()}
    trainer.data.images = trainer.data.images.float() * float("nan")  # poison every batch
    with pytest.raises(UserError, match=r"step 3: 3 steps had a non-finite loss \(1 in step 3; limit"):
        trainer.run()
    assert trainer.step == 3 and trainer.bad_steps == 3
    assert latest_checkpoint(tmp_path / "checkpoints") is None  # stopped before the checkpoint of step 3
    for got, want in ((trainer.model.state_dict(), before), (trainer.ema.model.state_dict(), ema_before)):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert all(float(s["step"]) == 0 for s in trainer.opt.state.values())
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[1].startswith("2,nan,") and rows[1].endswith(",2")  # step 2: no finite loss to average, 2 bad


def test_lr_schedule():
    cfg = load_config("digits-tiny", ["train.warmup_steps=10", "train.steps=110", "train.lr_schedule=cosine"]).train
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / 10)
    assert lr_at(9, cfg) == pytest.approx(cfg.lr)
    assert lr_at(60, cfg) == pytest.approx(cfg.lr / 2)
    assert lr_at(110, cfg) == pytest.approx(0, abs=1e-12)


def test_config_errors_name_the_key():
    with pytest.raises(UserError, match="train: unknown key.*learning_rate"):
        load_config("digits-tiny", ["train.learning_rate=1"])
    with pytest.raises(UserError, match="train.steps: expected int"):
        load_config("digits-tiny", ["train.steps=many"])
    with pytest.raises(UserError, match="train.batch_size must be > 0"):
        load_config("digits-tiny", ["train.batch_size=0"])
    with pytest.raises(UserError, match="diffusion.schedule"):
        load_config("digits-tiny", ["diffusion.schedule=quadratic"])
    with pytest.raises(UserError, match="diffusion.min_snr_offset must be >= 0, got -1"):
        load_config("digits-tiny", ["diffusion.min_snr_offset=-1"])
    with pytest.raises(UserError, match="diffusion.min_snr_gamma must be > 0"):
        load_config("digits-tiny", ["diffusion.min_snr_gamma=0"])
    with pytest.raises(UserError, match="section.key=value"):
        load_config("digits-tiny", ["lr=3"])
    with pytest.raises(UserError, match="neither a preset"):
        load_config("no-such-preset")
    assert load_config("digits-tiny", ["train.lr=1e-4"]).train.lr == 1e-4  # YAML reads 1e-4 as a string


def test_config_round_trip(tmp_path):
    import yaml

    cfg = load_config("mnist")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(str(p)) == cfg
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_atomic_tensor_write_leaves_no_temp_files(tmp_path):
    save_tensors({"a": torch.ones(3)}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_tensorboard_scalars(tiny_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    tiny_cfg.train.tensorboard = True
    tiny_cfg.train.steps = 2
    Trainer(tiny_cfg, tmp_path, progress=False).run()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_time_limit_stops_with_a_checkpoint(tiny_cfg, tmp_path):
    tiny_cfg.train.time_limit = 1e-9
    tiny_cfg.train.steps = 1000
    trainer = Trainer(tiny_cfg, tmp_path, progress=False)
    trainer.run()
    assert trainer.step < 1000 and latest_checkpoint(tmp_path / "checkpoints") is not None


def test_trainer_applies_the_configured_loss_weighting(tiny_cfg, tmp_path):
    """min_snr with offset 1 and no cap is the plain v-loss exactly (min(SNR + 1, ∞) / (SNR + 1) = 1);
    offset 0 weighs the same batch differently: the trainer hands both settings to the loss."""
    tiny_cfg.diffusion.prediction = "v"
    losses = {}
    for name, weighting, offset in (("plain", "uniform", 0.0), ("capped_v", "min_snr", 1.0), ("paper", "min_snr", 0.0)):
        tiny_cfg.diffusion.weighting, tiny_cfg.diffusion.min_snr_gamma = weighting, 1e9
        tiny_cfg.diffusion.min_snr_offset = offset
        losses[name] = float(Trainer(tiny_cfg, tmp_path / name, progress=False).train_step()["loss"])
    assert losses["capped_v"] == pytest.approx(losses["plain"], rel=1e-6)
    assert abs(losses["paper"] - losses["plain"]) > 1e-3 * losses["plain"]


def test_deferred_loss_reads_log_the_per_step_means(tiny_cfg, tmp_path):
    """The loop reads the losses only when it writes a row (every log_every steps), summed on the device in
    float64: each metrics.csv row is exactly the mean of the losses the steps returned, as when every step
    was read on the host (with gradient accumulation, whose micro-step losses are averaged too)."""
    tiny_cfg.train.grad_accum = 2
    tiny_cfg.train.log_every = 3
    tiny_cfg.train.steps = 7
    trainer = Trainer(tiny_cfg, tmp_path, progress=False)
    seen, step = [], trainer.train_step

    def recorded():
        logs = step()
        seen.append(float(logs["loss"]))
        return logs

    trainer.train_step = recorded
    trainer.run()
    rows = [r.split(",") for r in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [3, 6, 7]
    for (first, last), row in zip(((0, 3), (3, 6), (6, 7)), rows):
        assert float(row[1]) == sum(seen[first:last]) / (last - first)  # bit for bit
