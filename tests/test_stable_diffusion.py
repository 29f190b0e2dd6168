"""Stable Diffusion checkpoints: parity with diffusers/transformers on random-weight models of small configurations.

Every reference here is built by diffusers or transformers themselves: a StableDiffusionPipeline saved with
``save_pretrained`` (the diffusers layout), and single files read back by diffusers' own ``from_single_file``
and converters. No weights are downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentdiff.errors import UserError
from latentdiff.models import UNetConfig
from latentdiff.models.concat import ConcatKind
from latentdiff.pipelines.generate import Pipeline, SampleSettings
from latentdiff.pipelines.stable_diffusion import (load_any, load_diffusers_folder, load_single_file, read_checkpoint,
                                                   save_diffusers, save_latentdiff)

from sd_helpers import (PROMPT, TOL, ddim, diffusers_pipeline, diffusers, open_clip_state, ours_image, perturb,
                        reference_image, single_file, text_model, transformers)

pytestmark = pytest.mark.filterwarnings("ignore")

@pytest.fixture(scope="module")
def sd_v1(tmp_path_factory) -> tuple[Path, object]:
    """A random tiny SD v1-shaped diffusers pipeline saved in the diffusers folder layout."""
    root = tmp_path_factory.mktemp("sd")
    return root, diffusers_pipeline(root / "diffusers")


def test_diffusers_folder_modules_match(sd_v1) -> None:
    root, ref = sd_v1
    ours = load_diffusers_folder(root / "diffusers")
    assert ours.manifest.image_size == 16 and ours.diffusion.prediction == "eps"
    assert ours.manifest.concat is None
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 77, 64)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = ours.cond.text_encoder.tokenizer([PROMPT, ""])
    assert ids.tolist() == ref.tokenizer([PROMPT, ""], padding="max_length", max_length=77).input_ids
    with torch.no_grad():
        pairs = [(ours.unet(x, t, c), ref.unet(x, t, c).sample),
                 (ours.autoencoder.encode(img).mean, ref.vae.encode(img).latent_dist.mean),
                 (ours.autoencoder.decode(x), ref.vae.decode(x).sample),
                 (ours.cond.text_encoder.text_model(ids)[0], ref.text_encoder(ids).last_hidden_state)]
    for a, b in pairs:
        assert (a - b).abs().max() < TOL


def test_text_to_image_matches_stable_diffusion_pipeline(sd_v1) -> None:
    """Same noise, DDIM 10 steps, guidance 7.5: the uint8 images agree to one grey level (measured: identical)."""
    root, ref = sd_v1
    ours = load_diffusers_folder(root / "diffusers")
    for seed, negative in ((7, None), (8, "blurry")):
        expected = reference_image(ref, seed, negative=negative)
        got = ours_image(ours, seed, negative=negative)
        assert expected.float().std() > 5  # not a flat image: the comparison means something
        assert (got.int() - expected.int()).abs().max() <= 1


def test_export_to_diffusers_and_latentdiff_round_trip(sd_v1, tmp_path) -> None:
    root, ref = sd_v1
    ours = load_diffusers_folder(root / "diffusers")
    expected = reference_image(ref, 11)
    save_diffusers(ours, tmp_path / "exported")
    again = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "exported", safety_checker=None)
    ddim(again)
    assert torch.equal(reference_image(again, 11), expected)
    save_latentdiff(ours, tmp_path / "own")
    own = load_any(tmp_path / "own")
    assert isinstance(own, Pipeline) and (tmp_path / "own" / "unet" / "model.safetensors").is_file()
    assert (ours_image(own, 11).int() - expected.int()).abs().max() <= 1


def test_single_file_v1_matches_diffusers_from_single_file(sd_v1, tmp_path) -> None:
    root, _ = sd_v1
    hf = text_model()
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                     attention_resolutions=(1,), num_heads=8, context_dim=64)
    text = {"text_model." + k.removeprefix("text_model."): v for k, v in hf.state_dict().items()}
    save_file(single_file(text, cfg, "cond_stage_model.transformer."), tmp_path / "v1.safetensors")
    ref = diffusers.StableDiffusionPipeline.from_single_file(
        tmp_path / "v1.safetensors", config=str(root / "diffusers"), safety_checker=None, local_files_only=True)
    ddim(ref)
    ours = load_any(tmp_path / "v1.safetensors")
    assert ours.unet.config == cfg and ours.manifest.image_size == 512 and ours.diffusion.prediction == "eps"
    assert (ours_image(ours, 3, size=16).int() - reference_image(ref, 3).int()).abs().max() <= 1  # tiny: 8x8 latents


def test_single_file_v2_open_clip_v_prediction(tmp_path) -> None:
    """SD v2: OpenCLIP text tower read at its penultimate block, 64-wide heads, linear projections, v-prediction."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    open_clip = open_clip_state(text_model(layers=3, act="gelu"))
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(1, 2), num_head_channels=64, context_dim=64, use_linear_projection=True)
    state = single_file(open_clip, cfg, "cond_stage_model.model.", seed=4)
    save_file(state, tmp_path / "v2.safetensors")
    ours = load_single_file(tmp_path / "v2.safetensors")
    assert ours.unet.config == cfg and ours.diffusion.prediction == "v" and ours.manifest.image_size == 768
    assert ours.cond.text_encoder.tokenizer.pad_id == 0  # open_clip pads with '!'
    # diffusers' converters give the references: a 2-layer CLIPTextModel (penultimate) and the UNet
    ref_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=96,
        hidden_act="gelu", eos_token_id=2)).eval()
    converted = convert_open_clip_checkpoint(ref_text, state)
    ref_text.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()
                              if ".layers.2." not in k}, strict=True)
    ref_unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True).eval()
    ref_unet.load_state_dict(convert_ldm_unet_checkpoint(state, dict(ref_unet.config)), strict=True)
    ids = ours.cond.text_encoder.tokenizer([PROMPT, ""])
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 77, 64)
    with torch.no_grad():
        assert (ours.cond.text_encoder.text_model(ids)[0] - ref_text(ids).last_hidden_state).abs().max() < TOL
        assert (ours.unet(x, t, c) - ref_unet(x, t, c).sample).abs().max() < TOL
    # the 512 px v2 base model is told apart by the step its .ckpt records, as diffusers does
    torch.save({"state_dict": state, "global_step": 875000}, tmp_path / "v2-base.ckpt")
    base = load_any(tmp_path / "v2-base.ckpt")
    assert base.diffusion.prediction == "eps" and base.manifest.image_size == 512


def test_inpainting_variant_is_detected(sd_v1, tmp_path) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    hf = text_model()
    cfg = UNetConfig(in_channels=9, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(1,), num_heads=8, context_dim=64)
    state = single_file({"text_model." + k.removeprefix("text_model."): v for k, v in hf.state_dict().items()},
                         cfg, "cond_stage_model.transformer.", seed=6)
    save_file(state, tmp_path / "inpaint.safetensors")
    ours = load_any(tmp_path / "inpaint.safetensors")
    assert ours.manifest.concat is ConcatKind.INPAINT and ours.unet.config.in_channels == 9
    ref = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint(state, dict(ref.config)), strict=True)
    x, t, c = torch.randn(2, 9, 8, 8), torch.tensor([5, 900]), torch.randn(2, 77, 64)
    with torch.no_grad():
        assert (ours.unet(x, t, c) - ref(x, t, c).sample).abs().max() < TOL
    image = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)  # the dedicated inpainting path runs end
    keep = torch.ones(16, 16)  # to end at 16 px; the kept region stays exact
    keep[4:12, 4:12] = 0
    out = ours.inpaint(image, keep, steps=3, prompt=PROMPT, guidance=7.5, width=16, height=16)
    assert out.shape == (1, 3, 16, 16) and torch.equal(out[..., keep.bool()], image[..., keep.bool()])
    save_diffusers(ours, tmp_path / "inpaint-diffusers")  # and the diffusers export says what it is
    assert "Inpaint" in (tmp_path / "inpaint-diffusers" / "model_index.json").read_text()
    assert load_any(tmp_path / "inpaint-diffusers").manifest.concat is ConcatKind.INPAINT


# ---- bad input ------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # what an unpickler would run


def test_pickled_code_is_refused_never_run(tmp_path) -> None:
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"w": _Evil(marker)}}, f)
    torch.save({"state_dict": {"w": _Evil(marker)}}, tmp_path / "evil-zip.ckpt")
    for name in ("evil.ckpt", "evil-zip.ckpt"):
        with pytest.raises(UserError, match="refused"):
            read_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_unknown_layout_truncated_and_empty_files(tmp_path) -> None:
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match=r"model\.diffusion_model\.\*.*found e\.g\. encoder\.weight"):
        load_any(tmp_path / "other.safetensors")
    save_file({"model.diffusion_model.x": torch.zeros(1000)}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 10)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    for name in ("cut.safetensors", "cut.ckpt", "empty.ckpt"):
        with pytest.raises(UserError, match=name):
            load_any(tmp_path / name)
    (tmp_path / "model.txt").write_text("weights?")
    with pytest.raises(UserError, match="model folder or a .safetensors"):
        load_any(tmp_path / "model.txt")
    with pytest.raises(UserError, match="missing.ckpt does not exist"):
        load_any(tmp_path / "missing.ckpt")


def test_broken_diffusers_folders_are_named(sd_v1, tmp_path) -> None:
    import shutil

    root, _ = sd_v1
    folder = tmp_path / "sd"
    shutil.copytree(root / "diffusers", folder)
    (folder / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"tokenizer: not a CLIP tokenizer folder, missing vocab\.json and merges\.txt"):
        load_any(folder)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(UserError, match="missing tokenizer"):
        load_any(folder)
    shutil.copytree(root / "diffusers" / "tokenizer", folder / "tokenizer")
    config = folder / "text_encoder" / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 64', '"hidden_size": 32'))
    with pytest.raises(UserError, match="text_encoder"):  # weights no longer fit the config: named
        load_any(folder)


def test_components_that_disagree_are_refused(tmp_path) -> None:
    hf = text_model()  # 64 wide
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(1,), num_heads=8, context_dim=32)
    state = single_file({"text_model." + k.removeprefix("text_model."): v for k, v in hf.state_dict().items()},
                         cfg, "cond_stage_model.transformer.")
    save_file(state, tmp_path / "mixed.safetensors")
    with pytest.raises(UserError, match="text encoder is 64 wide but the UNet's cross-attention reads 32"):
        load_any(tmp_path / "mixed.safetensors")
    cfg.in_channels, cfg.context_dim = 6, 64
    save_file(single_file({"text_model." + k.removeprefix("text_model."): v for k, v in hf.state_dict().items()},
                           cfg, "cond_stage_model.transformer."), tmp_path / "channels.safetensors")
    with pytest.raises(UserError, match="takes 6 input channels but the VAE makes 4-channel latents"):
        load_any(tmp_path / "channels.safetensors", prediction="eps")


# ---- the command line and the memory savers ---------------------------------------------------------------
def _cli(*args: object):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "latentdiff", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_convert_and_sample_a_checkpoint(sd_v1, tmp_path) -> None:
    from PIL import Image

    root, ref = sd_v1
    expected = reference_image(ref, 4)
    r = _cli("convert", root / "diffusers", tmp_path / "own")
    assert r.returncode == 0, r.stderr
    r = _cli("convert", tmp_path / "own", tmp_path / "back", "--to", "diffusers")
    assert r.returncode == 0, r.stderr
    r = _cli("sample", "--model", tmp_path / "back", "--prompt", PROMPT, "--guidance", 7.5, "--steps", 10,
             "--sampler", "ddim", "--n-samples", 1, "--seed", 4, "--out", tmp_path / "out",
             "--guidance-max-t", 1000)  # every step guided, as diffusers does
    assert r.returncode == 0, r.stderr
    got = torch.from_numpy(__import__("numpy").asarray(Image.open(tmp_path / "out" / "000004.png"))).permute(2, 0, 1)
    assert (got.int() - expected[0].int()).abs().max() <= 1
    r = _cli("convert", root / "diffusers", tmp_path / "own")  # refuses to overwrite
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr
    r = _cli("convert", tmp_path / "own", tmp_path / "sized", "--size", 32)  # the default size DST keeps
    assert r.returncode == 0 and "32 px" in r.stdout, r.stderr
    assert __import__("json").loads((tmp_path / "sized" / "model_index.json").read_text())["image_size"] == 32
    r = _cli("sample", "--model", tmp_path / "own", "--size", 10, "--out", tmp_path / "bad")
    assert r.returncode == 2 and "both sides must be multiples of 4" in r.stderr


def test_attention_slicing_and_bf16_keep_the_result(sd_v1) -> None:
    root, _ = sd_v1
    pipe = load_diffusers_folder(root / "diffusers")
    full = ours_image(pipe, 9)
    pipe.configure(attention_slice=1)
    assert torch.equal(ours_image(pipe, 9), full) or (ours_image(pipe, 9).int() - full.int()).abs().max() <= 1
    pipe.configure(precision="bf16", attention_slice=0)
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16
    narrow = ours_image(pipe, 9)
    assert (narrow.float() - full.float()).abs().mean() < 4  # measured 1.1 grey levels on this random model
    assert pipe.latent_shape(SampleSettings(width=32, height=32)) == (4, 16, 16)
    assert pipe.latent_shape() == (4, 8, 8) and pipe.manifest.image_size == 16  # a size is per call, never stored


def test_tiled_autoencoder_blends_exactly_where_tiles_agree(sd_v1) -> None:
    from latentdiff.models.autoencoder import tiled

    x = torch.randn(2, 3, 20, 28)
    up = tiled(lambda t: torch.nn.functional.interpolate(t, scale_factor=4), x, tile=8, scale=4)
    torch.testing.assert_close(up, torch.nn.functional.interpolate(x, scale_factor=4))  # every pixel covered once
    down = tiled(lambda t: torch.nn.functional.avg_pool2d(t, 2), x, tile=8, scale=0.5)
    torch.testing.assert_close(down, torch.nn.functional.avg_pool2d(x, 2))
    root, _ = sd_v1
    ae = load_diffusers_folder(root / "diffusers").autoencoder
    z = torch.randn(1, 4, 24, 24)
    with torch.no_grad():
        full = ae.decode_latents(z)
        ae.tile = 24  # a tile as large as the latent: the untiled path
        assert torch.equal(ae.decode_latents(z), full)
        ae.tile = 8
        part = ae.decode_latents(z)
        assert part.shape == full.shape and bool(torch.isfinite(part).all())
        img = full.clamp(-1, 1)
        assert ae.encode_latents(img).shape == (1, 4, 24, 24)


def test_diffusers_folder_v2_like(sd_v1, tmp_path) -> None:
    """Per-level head counts (64-wide heads), linear projections, GELU text encoder, v-prediction scheduler."""
    root, v1 = sd_v1
    unet = perturb(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True), 7)
    pipe = diffusers.StableDiffusionPipeline(
        vae=v1.vae, text_encoder=text_model(act="gelu"), tokenizer=v1.tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          prediction_type="v_prediction", clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "v2")
    ours = load_any(tmp_path / "v2")
    assert ours.diffusion.prediction == "v" and ours.unet.config.num_head_channels == 64
    assert ours.cond.text_encoder.text_model.config.act == "gelu"
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 77, 64)
    ids = ours.cond.text_encoder.tokenizer([PROMPT, ""])
    with torch.no_grad():
        assert (ours.unet(x, t, c) - unet(x, t, c).sample).abs().max() < TOL
        assert (ours.cond.text_encoder.text_model(ids)[0] - pipe.text_encoder(ids).last_hidden_state).abs().max() < TOL
    ddim(pipe)  # v-prediction through the whole run as well
    assert (ours_image(ours, 2).int() - reference_image(pipe, 2).int()).abs().max() <= 1
