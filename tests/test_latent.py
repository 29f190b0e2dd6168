"""Latent diffusion: autoencoder training, the latent cache, one trainer and one sampler path."""

import pytest
import torch

from latentdiff.training.config import load_config
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_json, load_tensors, save_tensors
from latentdiff.models.folder import load_autoencoder
from latentdiff.pipelines.generate import Pipeline
from latentdiff.training import make_trainer

AE = ["data.source=digits", "data.image_size=16", "data.limit=48", "autoencoder.base_channels=8",
      "autoencoder.channel_mult=[1,2]", "train.batch_size=8", "train.steps=4", "train.log_every=2",
      "train.grid_samples=8", "ae_loss.disc_start=2", "ae_loss.disc_ndf=8", "train.checkpoint_every=2"]


def ldm_overrides(ae_dir):
    return ["data.source=digits", "data.image_size=16", "data.limit=48", f"latent.autoencoder={ae_dir}",
            "unet.model_channels=16", "unet.channel_mult=[1,2]", "unet.num_res_blocks=1",
            "unet.attention_resolutions=[2]", "unet.num_heads=2", "train.batch_size=8", "train.steps=3",
            "train.log_every=1", "train.grid_samples=4", "train.grid_steps=2", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae")
    cfg = load_config("ae-fashion", AE)
    make_trainer(cfg, out, progress=False).run()
    return out


def test_autoencoder_run_exports_a_measured_scale(ae_dir):
    manifest = load_json(ae_dir / "model_index.json")
    assert manifest["components"] == ["autoencoder"] and manifest["kind"] == "autoencoder"
    ae = load_autoencoder(ae_dir)
    assert ae.config.scale_factor == pytest.approx(manifest["scale_factor"])
    from latentdiff.data import DataConfig, load_dataset

    x = load_dataset(DataConfig(source="digits", image_size=16, limit=48)).batch(torch.arange(48))
    with torch.no_grad():
        z = ae.encode_latents(x)  # s · E(x): unit standard deviation by construction
    assert float(z.std()) == pytest.approx(1.0, rel=1e-3)
    rows = (ae_dir / "metrics.csv").read_text().splitlines()
    assert "d_loss" in rows[0] and "kl" in rows[0]  # discriminator on from step 2
    assert float(rows[-1].split(",")[rows[0].split(",").index("disc_factor")]) == 1.0


def test_autoencoder_resume_is_exact(tmp_path):
    cfg = load_config("ae-fashion", AE)
    make_trainer(cfg, tmp_path / "a", progress=False).run()
    cfg.train.steps = 2
    make_trainer(cfg, tmp_path / "b", progress=False).run()
    cfg.train.steps = 4
    make_trainer(cfg, tmp_path / "b", resume=True, progress=False).run()
    a = load_tensors(tmp_path / "a" / "autoencoder" / "model.safetensors")
    b = load_tensors(tmp_path / "b" / "autoencoder" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_latent_diffusion_end_to_end(ae_dir, tmp_path):
    cfg = load_config("ldm-fashion", ldm_overrides(ae_dir))
    trainer = make_trainer(cfg, tmp_path, progress=False)
    assert trainer.latent_shape == (4, 8, 8)
    trainer.run()
    caches = list((ae_dir / "latent_cache").glob("*/manifest.json"))
    assert len(caches) == 1
    manifest = load_json(tmp_path / "model_index.json")
    assert manifest["components"] == ["autoencoder", "unet"] and manifest["latent_shape"] == [4, 8, 8]
    pipe = Pipeline.load(tmp_path)
    a = pipe.generate(n_samples=3, batch_size=3, steps=3, seed=2)
    b = pipe.generate(n_samples=3, batch_size=1, steps=3, seed=2)
    assert a.shape == (3, 1, 16, 16) and (a.int() - b.int()).abs().max() <= 1


def test_latent_cache_is_reused_and_rebuilt_when_the_autoencoder_changes(ae_dir, tmp_path, capsys):
    cfg = load_config("ldm-fashion", ldm_overrides(ae_dir))
    make_trainer(cfg, tmp_path / "one", progress=False)
    capsys.readouterr()
    make_trainer(cfg, tmp_path / "two", progress=False)
    assert "encoding" not in capsys.readouterr().err  # second run reads the cache
    weights = ae_dir / "autoencoder" / "model.safetensors"
    original = weights.read_bytes()
    try:
        state = load_tensors(weights)
        state["encoder.conv_in.bias"] = state["encoder.conv_in.bias"] + 0.1
        save_tensors(state, weights)
        trainer = make_trainer(cfg, tmp_path / "three", progress=False)
        assert "encoding" in capsys.readouterr().err
        assert len(list((ae_dir / "latent_cache").glob("*/manifest.json"))) == 2
        # the cached moments are the new autoencoder's
        x = trainer.data.batch(torch.arange(4))
        with torch.no_grad():
            torch.testing.assert_close(trainer.latents.moments(torch.arange(4))[0], trainer.autoencoder.encode(x).mean,
                                       atol=1e-5, rtol=1e-5)
    finally:
        weights.write_bytes(original)


def test_pixel_diffusion_is_the_identity_autoencoder(tmp_path):
    cfg = load_config("digits-tiny", ["train.steps=2", "train.grid_samples=2", "train.grid_steps=2"])
    trainer = make_trainer(cfg, tmp_path, progress=False)
    assert trainer.latents is None and trainer.autoencoder.downsample_factor == 1
    assert trainer.latent_shape == (1, 16, 16)


def test_wrong_channels_and_sizes_are_clear_errors(ae_dir, tmp_path):
    with pytest.raises(UserError, match=r"latent channels \(4\)"):
        make_trainer(load_config("ldm-fashion", ldm_overrides(ae_dir) + ["unet.in_channels=3"]), tmp_path / "a")
    with pytest.raises(UserError, match="not divisible by the autoencoder's factor f=2"):
        make_trainer(load_config("ldm-fashion", ldm_overrides(ae_dir) + ["data.image_size=15"]), tmp_path / "b")
    with pytest.raises(UserError, match="no autoencoder/ component"):
        make_trainer(load_config("ldm-fashion", ldm_overrides(tmp_path)), tmp_path / "c")
    with pytest.raises(UserError, match="without a UNet"):
        Pipeline.load(ae_dir)


def test_eval_command_on_both_kinds_of_folder(ae_dir, tmp_path):
    import json
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "latentdiff", "eval", *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    r = run(ae_dir, "--n-samples", 40)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["n"] == 40 and rec["psnr"] > 5 and 0 < rec["ssim"] <= 1
    cfg = load_config("ldm-fashion", ldm_overrides(ae_dir))
    make_trainer(cfg, tmp_path / "ldm", progress=False).run()
    args = (tmp_path / "ldm", "--n-samples", 20, "--steps", 2, "--features", "domain:mnist5k", "--out", tmp_path / "r.json")
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["n_fake"] == a["n_real"] == 20 and a["fid"] > 0 and 0 <= a["precision"] <= 1
    assert {k: a[k] for k in ("fid", "cmmd", "precision", "recall")} == {k: b[k] for k in ("fid", "cmmd", "precision", "recall")}
    assert json.loads((tmp_path / "r.json").read_text())["fid"] == a["fid"]
    r = run(tmp_path / "ldm", "--n-samples", 20)  # digits have no shipped feature network
    assert r.returncode == 2 and "--features" in r.stderr
