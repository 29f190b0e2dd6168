"""Single files both ways: the writer (CompVis / A1111 layout), lossless round trips, diffusers' from_single_file
on what we write, and what a single file cannot say (heads, groups, schedule) from --config or the metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentdiff.errors import UserError
from latentdiff.models import UNetConfig
from latentdiff.pipelines.sd_single_file import save_single_file
from latentdiff.pipelines.stable_diffusion import load_any, load_single_file, save_diffusers, save_latentdiff
from sd_helpers import (PROMPT, TOL, VAE, diffusers, diffusers_pipeline, open_clip_state, single_file, text_model, transformers)

pytestmark = pytest.mark.filterwarnings("ignore")


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latentdiff", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def sd_v1(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    return root, diffusers_pipeline(root / "diffusers")


def _v1_file(path: Path) -> dict[str, torch.Tensor]:
    """A v1 single file with what real ones carry beside the model: position ids, schedule buffers, EMA, loss."""
    hf = text_model()
    text = {"text_model." + k.removeprefix("text_model."): v for k, v in hf.state_dict().items()}
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(1,), num_heads=8, context_dim=64)
    state = single_file(text, cfg, "cond_stage_model.transformer.")
    state |= {"alphas_cumprod": torch.linspace(1, 0.01, 1000, dtype=torch.float64), "logvar": torch.zeros(1000),
              "model_ema.decay": torch.tensor(0.9999), "first_stage_model.loss.logvar": torch.zeros(())}
    save_file(state, path)
    return state


def _pruned(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(("model_ema.", "first_stage_model.loss."))}


def test_single_file_folder_single_file_is_tensor_equal(tmp_path) -> None:
    original = _pruned(_v1_file(tmp_path / "v1.safetensors"))
    r = _cli("convert", tmp_path / "v1.safetensors", tmp_path / "folder")
    assert r.returncode == 0, r.stderr
    r = _cli("convert", tmp_path / "folder", tmp_path / "back.safetensors", "--to", "single-file")
    assert r.returncode == 0, r.stderr
    back = load_file(tmp_path / "back.safetensors")
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)
    save_single_file(load_any(tmp_path / "folder"), tmp_path / "half.safetensors", half=True)
    half = load_file(tmp_path / "half.safetensors")
    assert all(torch.equal(half[k], v.half() if v.is_floating_point() else v) for k, v in original.items())
    r = _cli("convert", tmp_path / "folder", tmp_path / "back.safetensors", "--to", "single-file")
    assert r.returncode == 2 and "exists" in r.stderr  # never overwrites


def test_v2_open_clip_round_trip_keeps_the_unread_block(tmp_path) -> None:
    state = single_file(open_clip_state(text_model(layers=3, act="gelu")),
                        UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2),
                                   num_res_blocks=1, attention_resolutions=(1, 2), num_head_channels=64,
                                   context_dim=64, use_linear_projection=True), "cond_stage_model.model.", seed=4)
    save_file(state, tmp_path / "v2.safetensors")
    pipe = load_any(tmp_path / "v2.safetensors")
    assert pipe.cond.text_encoder.text_model.config.layers == 2  # the penultimate block's output is read
    save_latentdiff(pipe, tmp_path / "folder")
    save_single_file(load_any(tmp_path / "folder"), tmp_path / "back.safetensors")
    back = load_file(tmp_path / "back.safetensors")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def _same_modules(pipe, ref) -> None:
    """UNet, VAE (both ways) and text encoder of ``pipe`` (ours or diffusers') against diffusers' ``ref``."""
    ours = not hasattr(pipe, "vae")
    ids = ref.tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, t, c, img = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 77, 64), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        got = (pipe.unet(x, t, c), pipe.autoencoder.decode(x), pipe.autoencoder.encode(img).mean,
               pipe.cond.text_encoder.text_model(ids)[0]) if ours else (
            pipe.unet(x, t, c).sample, pipe.vae.decode(x).sample, pipe.vae.encode(img).latent_dist.mean,
            pipe.text_encoder(ids).last_hidden_state)
        want = (ref.unet(x, t, c).sample, ref.vae.decode(x).sample, ref.vae.encode(img).latent_dist.mean,
                ref.text_encoder(ids).last_hidden_state)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < TOL


def test_written_file_loads_in_diffusers_from_single_file(sd_v1, tmp_path) -> None:
    """diffusers folder -> our single file -> diffusers' from_single_file (and ours): the same modules."""
    root, ref = sd_v1
    save_single_file(load_any(root / "diffusers"), tmp_path / "sd.safetensors")
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        tmp_path / "sd.safetensors", config=str(root / "diffusers"), safety_checker=None, local_files_only=True)
    _same_modules(theirs, ref)
    ours = load_any(tmp_path / "sd.safetensors")  # the metadata gives the size and schedule back
    assert ours.manifest.image_size == 16 and ours.diffusion == load_any(root / "diffusers").diffusion
    _same_modules(ours, ref)


UNUSUAL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                    cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=16,
                    use_linear_projection=True)


@pytest.fixture(scope="module")
def unusual(tmp_path_factory):
    """A v2-style model (OpenCLIP-style GELU text tower) off SD's conventions: 16 groups, 16-wide UNet heads,
    a 32-wide UNet level (64-wide heads would give it none), 4 text heads of 16, v-prediction."""
    root = tmp_path_factory.mktemp("unusual")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        hidden_act="gelu", eos_token_id=2))
    from sd_helpers import perturb
    pipe = diffusers_pipeline(root / "diffusers", UNUSUAL_UNET, VAE | {"norm_num_groups": 16}, perturb(text, 9),
                              seed=3, prediction_type="v_prediction")
    save_single_file(load_any(root / "diffusers"), root / "with-metadata.safetensors")
    with safe_open(root / "with-metadata.safetensors", "pt") as f:
        assert "latentdiff" in f.metadata()
    save_file(load_file(root / "with-metadata.safetensors"), root / "bare.safetensors")  # what other tools write
    return root, pipe


def test_a_guess_the_weights_contradict_is_one_line(unusual) -> None:
    root, _ = unusual
    with pytest.raises(UserError) as e:
        load_any(root / "bare.safetensors")
    message = str(e.value)
    assert "\n" not in message and "level 0 (32 channels)" in message and "--config" in message
    r = _cli("sample", "--model", root / "bare.safetensors", "--steps", 1, "--out", root / "x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--config" in r.stderr


@pytest.mark.parametrize("source", ["metadata", "config folder"])
def test_heads_groups_and_schedule_from_a_config(unusual, tmp_path, source) -> None:
    root, ref = unusual
    ours = load_any(root / "with-metadata.safetensors") if source == "metadata" else \
        load_any(root / "bare.safetensors", config=root / "diffusers")
    assert ours.unet.config.norm_groups == 16 and ours.autoencoder.config.norm_groups == 16
    assert ours.cond.text_encoder.text_model.config.heads == 4 and ours.diffusion.prediction == "v"
    _same_modules(ours, ref)
    save_diffusers(ours, tmp_path / "out")  # the export writes the text encoder's real head count
    assert json.loads((tmp_path / "out" / "text_encoder" / "config.json").read_text())["num_attention_heads"] == 4


def test_compvis_yaml_config(tmp_path) -> None:
    """A CompVis inference YAML gives heads, schedule, prediction, latent scale and the text layer."""
    hf = text_model(layers=3)
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(1,), num_heads=2, context_dim=64)
    state = single_file({"text_model." + k.removeprefix("text_model."): v for k, v in hf.state_dict().items()},
                        cfg, "cond_stage_model.transformer.", seed=8)
    save_file(state, tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").write_text("""
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.001
    linear_end: 0.015
    timesteps: 1000
    image_size: 4
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.13025
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {image_size: 32, in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [1],
               num_res_blocks: 1, channel_mult: [1, 2], num_heads: 2, use_spatial_transformer: true,
               transformer_depth: 1, context_dim: 64, use_checkpoint: true, legacy: false}
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig: {double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 32,
                   ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}
        lossconfig: {target: torch.nn.Identity}
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params: {layer: penultimate}
""")
    pipe = load_single_file(tmp_path / "m.safetensors", config=tmp_path / "m.yaml")
    d = pipe.diffusion
    assert pipe.unet.config.num_heads == 2 and d.prediction == "v" and (d.beta_start, d.beta_end) == (0.001, 0.015)
    assert pipe.autoencoder.config.scale_factor == 0.13025 and pipe.manifest.image_size == 8
    assert pipe.cond.text_encoder.text_model.config.layers == 2  # layer: penultimate
    ref = UNetConfig(**{**cfg.to_dict()})
    from latentdiff.models import UNet
    from latentdiff.formats.checkpoint import load_into
    truth = UNet(ref).eval()
    load_into(truth, {k[len("model.diffusion_model."):]: v for k, v in state.items()
                      if k.startswith("model.diffusion_model.")}, "m")
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 77, 64)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, c), truth(x, t, c))
        assert not torch.allclose(load_single_file(tmp_path / "m.safetensors").unet(x, t, c), truth(x, t, c))
    text = (tmp_path / "m.yaml").read_text()
    for bad, message in [("use_checkpoint: true", "use_scale_shift_norm: true"), ("legacy: false", "brand_new: 1")]:
        (tmp_path / "bad.yaml").write_text(text.replace(bad, message))
        with pytest.raises(UserError, match="bad.yaml.*(use_scale_shift_norm=True is not supported|unknown key 'brand_new')"):
            load_single_file(tmp_path / "m.safetensors", config=tmp_path / "bad.yaml")
    (tmp_path / "other.yaml").write_text(text.replace("channel_mult: [1, 2]", "channel_mult: [1, 4]"))
    with pytest.raises(UserError, match=r"config says unet.channel_mult=\(1, 4\) but the weights have \(1, 2\)"):
        load_single_file(tmp_path / "m.safetensors", config=tmp_path / "other.yaml")


def test_single_file_needs_a_clip_model(tmp_path, tiny_cfg) -> None:
    from latentdiff.training import make_trainer
    tiny_cfg.train.steps = 1
    tiny_cfg.train.grid_samples = 0
    make_trainer(tiny_cfg, tmp_path / "run", device="cpu", progress=False).run()
    with pytest.raises(UserError, match="latent, text-conditional model"):
        save_single_file(load_any(tmp_path / "run"), tmp_path / "x.safetensors")


def test_tokenizer_option_and_help(sd_v1, tmp_path) -> None:
    """--tokenizer replaces the shipped vocabulary (here: the diffusers folder's, with another pad token);
    --help shows no '[x<=None]' for an unbounded option."""
    from click.testing import CliRunner

    from latentdiff.cli import cli

    root, _ = sd_v1
    save_single_file(load_any(root / "diffusers"), tmp_path / "sd.safetensors")
    tok = tmp_path / "tok"
    import shutil
    shutil.copytree(root / "diffusers" / "tokenizer", tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps(config | {"pad_token": "!"}))
    assert load_any(tmp_path / "sd.safetensors").cond.text_encoder.tokenizer.pad_id != 0
    assert load_any(tmp_path / "sd.safetensors", tokenizer=tok).cond.text_encoder.tokenizer.pad_id == 0
    for command in ("sample", "convert", "img2img"):
        out = CliRunner().invoke(cli, [command, "--help"]).output
        assert "--tokenizer" in out and "--config" in out and "None]" not in out, command
    assert "--lora" in CliRunner().invoke(cli, ["sample", "--help"]).output
