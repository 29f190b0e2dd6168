"""Models conditioned by concatenation: dedicated inpainting (SD inpainting's layout) and SR3 super-resolution."""

import json
import os
import subprocess
import sys

import pytest
import torch

from latentdiff.training.config import load_config
from latentdiff.data.masks import random_masks
from latentdiff.errors import UserError
from latentdiff.models.autoencoder import Autoencoder, AutoencoderConfig
from latentdiff.models.concat import ConcatKind, inpaint_concat, low_res_concat, with_concat
from latentdiff.models.folder import FolderKind, Manifest, read_manifest, save_model_folder
from latentdiff.pipelines.generate import Pipeline
from latentdiff.training import make_trainer

# one thread: several times faster than two when other jobs share the 2 cores, about as fast when they do not
TINY = ["train.steps=3", "train.grid_samples=2", "train.grid_steps=2", "data.limit=32", "train.warmup_steps=1",
        "train.threads=1"]


def train(tmp_path, name, overrides, preset="digits-tiny"):
    out = tmp_path / name
    make_trainer(load_config(preset, TINY + overrides), out, progress=False).run()
    return out


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
    return train(tmp_path_factory.mktemp("inp"), "m", ["unet.in_channels=3", "cond.concat=inpaint"])


@pytest.fixture(scope="module")
def sr_dir(tmp_path_factory):
    return train(tmp_path_factory.mktemp("sr"), "m", ["unet.in_channels=2", "cond.concat=low_res",
                                                      "cond.low_res_size=8"])


def tiny_autoencoder(seed=0):
    torch.manual_seed(seed)
    cfg = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), z_channels=4, embed_dim=4, scale_factor=0.7)
    return Autoencoder(cfg).eval()


def test_random_masks_are_binary_boxes_strokes_and_some_whole_images():
    m = random_masks(4000, 32, torch.Generator().manual_seed(0), full_prob=0.25)
    assert m.shape == (4000, 1, 32, 32) and set(m.unique().tolist()) == {0.0, 1.0}
    cover = m.flatten(1).mean(1)
    assert abs(float((cover == 1).float().mean()) - 0.25) < 0.03  # whole-image masks at the asked rate
    part = cover[cover < 1]
    assert float(part.min()) > 0 and 0.1 < float(part.mean()) < 0.4  # every other mask marks part of the image
    again = random_masks(4000, 32, torch.Generator().manual_seed(0), full_prob=0.25)
    assert torch.equal(m, again)


def test_inpaint_concat_matches_diffusers_prepare_mask_latents():
    """Same mask resize and masked-image latent as StableDiffusionInpaintPipeline, in the order its UNet reads."""
    from diffusers import StableDiffusionInpaintPipeline

    ae = tiny_autoencoder()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    repaint = random_masks(3, 16, g, full_prob=0.0)
    ours = inpaint_concat(ae, images, repaint)
    assert ours.shape == (3, 1 + 4, 8, 8)

    class Stub:  # what prepare_mask_latents reads from the pipeline
        vae_scale_factor = ae.downsample_factor

        @staticmethod
        def _encode_vae_image(image, generator):
            return ae.encode_latents(image)  # SD: vae.encode(...).latent_dist * scaling_factor

    with torch.no_grad():
        mask, masked = StableDiffusionInpaintPipeline.prepare_mask_latents(
            Stub(), repaint, images * (repaint < 0.5), 3, 16, 16, torch.float32, "cpu", None, False)
    torch.testing.assert_close(ours, torch.cat([mask, masked], 1))
    # and independently of diffusers: nearest resize keeps each 2x2 cell's top-left pixel
    assert torch.equal(ours[:, :1], repaint[:, :, ::2, ::2])
    assert not torch.allclose(ours[:, 1:], ae.encode_latents(images).detach())  # the hole is hidden


def test_with_concat_feeds_the_extra_channels_and_guidance_batches_them():
    seen = []

    def model(x, t, **kw):
        seen.append(x.shape)
        return x[:, :1]

    from latentdiff.diffusion import classifier_free_guidance

    extra = torch.randn(2, 3, 4, 4)
    guided = classifier_free_guidance(with_concat(model), {"concat": extra}, {"concat": extra}, 3.0)
    out = guided(torch.zeros(2, 1, 4, 4), torch.tensor([5, 5]))
    assert seen == [(4, 4, 4, 4)] and out.shape == (2, 1, 4, 4)  # cond and uncond in one batch of 2B
    assert low_res_concat(torch.zeros(2, 1, 8, 8), 16).shape == (2, 1, 16, 16)


def test_inpainting_model_folder_and_pipeline(inpaint_dir):
    manifest = read_manifest(inpaint_dir)
    assert manifest.concat is ConcatKind.INPAINT and manifest.low_res_size is None
    assert "low_res_size" not in json.loads((inpaint_dir / "model_index.json").read_text())
    pipe = Pipeline.load(inpaint_dir)
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    keep = torch.ones(16, 16)
    keep[4:12, 3:9] = 0
    shapes = []
    pipe.unet.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    out = pipe.inpaint(images, keep, steps=3, sampler="dpmpp_2m")  # any sampler: no replacement needed
    assert out.shape == (2, 1, 16, 16) and shapes[0] == (2, 3, 16, 16)  # z_t + mask + masked image
    assert torch.equal(out[:, :, keep.bool()], images[:, :, keep.bool()])  # kept pixels pasted back exactly
    raw = pipe.inpaint(images, keep, steps=3, sampler="dpmpp_2m", paste=False)
    assert torch.equal(raw[:, :, ~keep.bool()], out[:, :, ~keep.bool()])


def test_inpainting_model_bad_input(inpaint_dir):
    pipe = Pipeline.load(inpaint_dir)
    images = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    keep = torch.ones(16, 16)
    keep[:8] = 0
    with pytest.raises(UserError, match="inpainting model: give an image and a mask"):
        pipe.generate(n_samples=1, steps=2)
    with pytest.raises(UserError, match="inpainting model: give an image and a mask"):
        pipe.img2img(images, steps=2)
    with pytest.raises(UserError, match=r"mask must be \(16, 16\)"):
        pipe.inpaint(images, torch.ones(8, 8), steps=2)
    with pytest.raises(UserError, match="only 0 .* and 1"):
        pipe.inpaint(images, keep * 0.5, steps=2)
    with pytest.raises(UserError, match="resample"):
        pipe.inpaint(images, keep, steps=2, resample=3)
    with pytest.raises(UserError, match="not a super-resolution model"):
        pipe.inpaint(images, keep, steps=2, low_res=torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_latent_inpainting_model_reads_nine_channels(tmp_path):
    """A 4-channel latent gives SD inpainting's 9 input channels, in training and in the pipeline."""
    ae = tiny_autoencoder()
    save_model_folder(tmp_path / "ae", {"autoencoder": (ae.config.to_dict(), ae.state_dict())},
                      Manifest(image_size=16, channels=1, kind=FolderKind.AUTOENCODER))
    run = train(tmp_path, "ldm", ["unet.in_channels=9", "unet.out_channels=4", "cond.concat=inpaint",
                                  f"latent.autoencoder={tmp_path / 'ae'}"])
    pipe = Pipeline.load(run)
    shapes = []
    pipe.unet.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    keep = torch.ones(16, 16)
    keep[:, :8] = 0
    out = pipe.inpaint(torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8), keep, steps=2)
    assert shapes[0] == (1, 9, 8, 8) and out.shape == (1, 1, 16, 16)
    with pytest.raises(UserError, match=r"unet.in_channels \(5\) must be 9"):
        train(tmp_path, "bad", ["unet.in_channels=5", "unet.out_channels=4", "cond.concat=inpaint",
                                f"latent.autoencoder={tmp_path / 'ae'}"])


def test_super_resolution_pipeline_and_bad_input(sr_dir):
    manifest = read_manifest(sr_dir)
    assert manifest.concat is ConcatKind.LOW_RES and manifest.low_res_size == 8
    pipe = Pipeline.load(sr_dir)
    low = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)
    out = pipe.upscale(low, n_samples=3, steps=3, seed=4)
    assert out.shape == (3, 1, 16, 16) and out.dtype == torch.uint8
    assert not torch.equal(out[0], out[1])  # one low-res image, different seeds: different samples
    again = pipe.upscale(low.expand(2, -1, -1, -1), steps=3, seed=5)
    assert torch.equal(again[0], out[1])  # sample i uses seed + i, whether the input was given once or per sample
    with pytest.raises(UserError, match=r"uint8 \(N, 1, 8, 8\).*upscales 8x8 to 16"):
        pipe.upscale(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), steps=2)
    with pytest.raises(UserError, match="super-resolution model: give the low-resolution image"):
        pipe.generate(n_samples=1, steps=2)
    with pytest.raises(UserError, match="one low-resolution image or n_samples=3"):
        pipe.upscale(low.expand(2, -1, -1, -1), n_samples=3, steps=2)


def cli(*args):
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # as TINY's train.threads=1
    return subprocess.run([sys.executable, "-m", "latentdiff", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_upscale(sr_dir, tmp_path):
    from PIL import Image

    Image.new("L", (8, 8), 90).save(tmp_path / "low.png")
    Image.new("L", (10, 12), 90).save(tmp_path / "wrong.png")
    r = cli("upscale", sr_dir, "--input", tmp_path / "low.png", "--n-samples", 2, "--steps", 2, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["000000.png", "000001.png", "grid.png"]
    assert Image.open(tmp_path / "o" / "000001.png").size == (16, 16)
    r = cli("upscale", sr_dir, "--input", tmp_path / "wrong.png", "--out", tmp_path / "o2")
    assert r.returncode == 2 and "10x12" in r.stderr and "8x8" in r.stderr and "Traceback" not in r.stderr
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    mask.save(tmp_path / "mask.png")
    r = cli("inpaint", sr_dir, tmp_path / "low.png", tmp_path / "mask.png", "--out", tmp_path / "o3")
    assert r.returncode == 2 and "give the low-resolution image" in r.stderr and "Traceback" not in r.stderr


def test_init_unet_widens_a_plain_model_with_zero_channels(tmp_path, inpaint_dir):
    """SD inpainting's recipe: start from the plain model, the added input channels at zero weight."""
    from latentdiff.models.folder import load_unet

    plain = train(tmp_path, "plain", [])
    trainer = make_trainer(load_config("digits-tiny", TINY + ["unet.in_channels=3", "cond.concat=inpaint",
                                                              f"train.init_unet={plain}"]), tmp_path / "ft")
    x, extra, t = torch.randn(2, 1, 16, 16), torch.randn(2, 2, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(with_concat(trainer.model)(x, t, concat=extra), load_unet(plain)(x, t))
    with pytest.raises(UserError, match="reads 3 input channels, more than unet.in_channels=1"):
        make_trainer(load_config("digits-tiny", TINY + [f"train.init_unet={inpaint_dir}"]), tmp_path / "x")
    # another network (here: plain attention, one head) names the overrides that would make it the same one
    with pytest.raises(UserError, match=r"another network than this run's; add unet.attention_block=transformer "
                                        r"unet.num_heads=2 to train the same network"):
        make_trainer(load_config("digits-tiny", TINY + ["unet.in_channels=3", "cond.concat=inpaint",
                                                        "unet.attention_block=plain", "unet.num_heads=1",
                                                        f"train.init_unet={plain}"]), tmp_path / "y")


def test_a_short_real_sr_run_follows_its_low_res_input(tmp_path):
    """60 steps on digits (8 -> 16 px): the output, downsampled again, matches its own low-res input, not others'."""
    from latentdiff.data.transforms import from_uint8_image, resize_bicubic, to_uint8_image
    from latentdiff.eval import psnr
    from latentdiff.pipelines.evaluate import reference_images

    run = train(tmp_path, "sr", ["unet.in_channels=2", "cond.concat=low_res", "cond.low_res_size=8", "train.steps=60",
                                 "train.warmup_steps=20", "data.limit=null"])
    pipe = Pipeline.load(run)
    real, _ = reference_images(pipe.manifest, 64)  # held-out digits
    low = to_uint8_image(resize_bicubic(from_uint8_image(real), 8))
    up = pipe.upscale(low, steps=10, sampler="ddim", seed=0)
    down = to_uint8_image(resize_bicubic(from_uint8_image(up), 8)).float()
    own, others = psnr(down, low.float(), 255.0), psnr(down, low.roll(1, 0).float(), 255.0)
    print(f"consistency PSNR {own:.1f} dB with its own input, {others:.1f} dB with another image's")
    assert own > 18 and own > others + 6  # measured 22.3 vs 11.2


def test_inpainting_run_matches_stable_diffusion_inpaint_pipeline(tmp_path):
    """A random tiny SD inpainting pipeline (9-channel UNet) loaded from its diffusers folder: same noise, DDIM 10,
    guidance 7.5 -> the same image as diffusers' StableDiffusionInpaintPipeline (mask layout, order, guidance)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from latentdiff.models.tokenizer import CLIPTokenizer
    from latentdiff.pipelines.generate import PerSampleNoise
    from latentdiff.pipelines.stable_diffusion import load_diffusers_folder

    def perturb(model, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        return model.eval()

    torch.manual_seed(0)
    CLIPTokenizer.default().save(tmp_path / "tok")
    text = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=96,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2)), 3)
    vae = perturb(diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, sample_size=16), 1)
    with torch.no_grad():  # a near-deterministic posterior: diffusers samples the masked-image latent, we take its mode
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30
    unet = perturb(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8), 2)
    ref = diffusers.StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(tmp_path / "tok"), unet=unet,
        scheduler=diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.save_pretrained(tmp_path / "sd-inpaint")
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing",
                                                        set_alpha_to_one=True)  # the grid latentdiff's ddim runs
    ref.set_progress_bar_config(disable=True)
    ours = load_diffusers_folder(tmp_path / "sd-inpaint")
    assert ours.concat_kind == "inpaint"

    g = torch.Generator().manual_seed(5)
    image = torch.randint(0, 256, (1, 3, 16, 16), generator=g, dtype=torch.uint8)
    keep = torch.ones(16, 16)
    keep[3:11, 6:14] = 0
    prompt = "a red circle above a blue square"
    got = ours.inpaint(image, keep, steps=10, sampler="ddim", seed=9, prompt=prompt, guidance=7.5, paste=False)
    with torch.no_grad():
        out = ref(prompt, image=image.float() / 255, mask_image=(1 - keep)[None, None], height=16, width=16,
                  num_inference_steps=10, guidance_scale=7.5, latents=PerSampleNoise([9]).randn((1, 4, 8, 8)),
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    expected = (out * 255).round().to(torch.uint8)
    assert expected.float().std() > 5  # not a flat image
    assert (got.int() - expected.int()).abs().max() <= 1


def test_mask_files_and_bytes_read_the_same(tmp_path):
    import io
    import warnings

    import numpy as np
    from PIL import Image

    from latentdiff.data.masks import read_mask

    a = np.zeros((8, 8), np.uint8)
    a[2:5, 3:7] = 255  # white = redraw
    Image.fromarray(a).save(tmp_path / "m.png")
    keep = read_mask(tmp_path / "m.png", 8)
    assert torch.equal(keep, torch.from_numpy((a == 0).astype(np.float32)))
    assert torch.equal(read_mask((tmp_path / "m.png").read_bytes(), 8, name="mask"), keep)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        grey = a.copy()
        grey[0, 0] = 100  # below half: kept
        buf = io.BytesIO()
        Image.fromarray(grey).resize((16, 16), Image.Resampling.NEAREST).save(buf, format="PNG")
        assert torch.equal(read_mask(buf.getvalue(), 8, name="mask"), keep)
    assert [str(w.message) for w in seen] == ["mask is 16x16, resized to 8x8",
                                             "mask is not black and white; thresholded at 50 %"]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(UserError, match=r"black.png marks nothing to redraw"):
        read_mask(tmp_path / "black.png", 8)
    with pytest.raises(UserError, match=r"^mask: cannot read image"):
        read_mask(b"not an image", 8, name="mask")
