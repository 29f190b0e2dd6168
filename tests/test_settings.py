"""One generation core: SampleSettings and its checks, what a model refuses (Pipeline.check), the sampler names
users know, and the trainer's grids drawn by the same core as Pipeline.run."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentdiff.diffusion import SAMPLERS, SPACINGS
from latentdiff.diffusion.config import DiffusionConfig
from latentdiff.diffusion.names import EQUIVALENTS, PRESETS, equivalents_table, one_step_names, presets_table, resolve
from latentdiff.errors import SettingError
from latentdiff.models.autoencoder import IdentityAutoencoder
from latentdiff.models.concat import ConcatKind
from latentdiff.models.conditioning import Conditioner, conditioning_kind
from latentdiff.models.folder import Conditioning, Manifest, save_model_folder
from latentdiff.models.sampling import GeneratorNoise
from latentdiff.models.settings import DEFAULT_SAMPLER, REPLACE_SAMPLER, SEED_MAX, SampleSettings, Task
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.pipelines.generate import Pipeline

ROOT = Path(__file__).resolve().parents[1]


def tiny(concat=None, num_classes=None):
    """An untrained pixel-space pipeline (16 px, grey) built in memory: what Pipeline.check needs, in no time."""
    torch.manual_seed(0)
    extra = {None: 0, ConcatKind.INPAINT: 2, ConcatKind.LOW_RES: 1}[concat]
    cfg = UNetConfig(in_channels=1 + extra, model_channels=8, channel_mult=(1, 2), attention_resolutions=(),
                     num_heads=1, num_classes=num_classes)
    m = Manifest(image_size=16, channels=1, components=("unet",), diffusion=DiffusionConfig(),
                 conditioning=Conditioning(conditioning_kind(cfg), 3.0), concat=concat,
                 low_res_size=8 if concat is ConcatKind.LOW_RES else None)
    return Pipeline(UNet(cfg).eval(), IdentityAutoencoder(1), Conditioner(cfg), m, Path("tiny"), torch.device("cpu"))


@pytest.mark.parametrize("changes, field, message", [
    ({"n_samples": 0}, "n_samples", "must be a positive integer, got 0"),
    ({"batch_size": True}, "batch_size", "must be a positive integer, got True"),
    ({"steps": 1.5}, "steps", "must be a positive integer"),
    ({"resample": 0}, "resample", "must be a positive integer"),
    ({"width": 0}, "width", "must be a positive integer"),
    ({"seed": -1}, "seed", f"must be in [0, {SEED_MAX}] with n_samples=1, got -1"),
    ({"seed": SEED_MAX, "n_samples": 2}, "seed", f"must be in [0, {SEED_MAX - 1}] with n_samples=2"),
    ({"guidance": math.nan}, "guidance", "must be a finite number >= 0"),
    ({"guidance": -1}, "guidance", "must be a finite number >= 0"),
    ({"guidance_max_t": -1.0}, "guidance_max_t", "must be a number >= 0 (a timestep), got -1.0"),
    ({"guidance_max_t": math.nan}, "guidance_max_t", "must be a number >= 0"),
    ({"sampler": "plms"}, "sampler", "unknown sampler 'plms'; choose one of DDIM, DDPM, Euler, Euler a"),
    ({"spacing": "sideways"}, "spacing", "unknown spacing 'sideways'"),
    ({"sampler": "ddim", "eta": -1.0}, "eta", "sampler options must be finite numbers >= 0"),
    ({"sampler": "ddim", "options": {"order": 2}}, "sampler", "'ddim' takes no option(s) order"),
    ({"strength": 1.5}, "strength", "must be in [0, 1], got 1.5"),
    ({"class_label": -1}, "class_label", "must be integers >= 0"),
    ({"class_label": (1, 2), "n_samples": 3}, "class_label", "give one class_label or one per sample (n_samples=3)"),
    ({"prompt": 3}, "prompt", "must be text"),
    ({"negative_prompt": ("a", "b"), "n_samples": 3}, "negative_prompt", "give one negative_prompt or one per"),
])
def test_settings_refuse_what_no_model_takes_naming_the_field(changes, field, message):
    with pytest.raises(SettingError) as e:
        SampleSettings(**changes).check()
    assert e.value.field == field and message in e.value.problem and str(e.value).startswith(f"{field}: ")


def test_settings_are_frozen_and_generate_style_arguments_build_them():
    s = SampleSettings.build(3, 2, 5, "Euler a", 7, prompt=["a", "b", "c"], order=3)
    assert (s.n_samples, s.batch_size, s.steps, s.sampler, s.seed, s.prompt) == (3, 2, 5, "Euler a", 7, ("a", "b", "c"))
    assert s.options == {"order": 3} and s.resolved == ("euler_ancestral", "trailing")
    with pytest.raises(Exception):
        s.steps = 9
    assert s.replace(steps=9).steps == 9 and s.steps == 5


@pytest.mark.parametrize("model, task, changes, message", [
    (None, Task.TXT2IMG, {"class_label": 1}, "class_label: this model is not class-conditional"),
    (3, Task.TXT2IMG, {"class_label": (0, 3)}, "class_label: 3 is out of range 0..2"),
    (None, Task.TXT2IMG, {"prompt": "a cat"}, "prompt: this model was not trained on captions"),
    (None, Task.TXT2IMG, {"negative_prompt": "a dog"}, "negative_prompt: this model was not trained on captions"),
    (None, Task.TXT2IMG, {"sampler": "ddim", "steps": 1001}, "steps: 1001 is more than the schedule's 1000 timesteps"),
    (None, Task.TXT2IMG, {"height": 17}, "height: 17 does not fit this model: both sides must be multiples of 2"),
    (None, Task.UPSCALE, {}, "task: this model does txt2img, img2img, inpaint, not upscale; it is not a super-res"),
    (None, Task.INPAINT, {"sampler": "DPM++ 2M Karras"},
     "sampler: inpainting by replacement steps the sampler one step at a time; 'DPM++ 2M Karras' cannot"),
    (ConcatKind.INPAINT, Task.TXT2IMG, {}, "task: this model does inpaint, not txt2img; it is an inpainting model"),
    (ConcatKind.INPAINT, Task.INPAINT, {"resample": 2}, "resample: this is an inpainting model"),
    (ConcatKind.LOW_RES, Task.IMG2IMG, {}, "task: this model does upscale, not img2img; it is a super-resolution"),
    (ConcatKind.LOW_RES, Task.UPSCALE, {"width": 16}, "width: a super-resolution model's size is fixed"),
])
def test_a_model_refuses_what_it_cannot_run_naming_the_field(model, task, changes, message):
    pipe = tiny(concat=model) if isinstance(model, ConcatKind) or model is None else tiny(num_classes=model)
    with pytest.raises(SettingError) as e:
        pipe.check(SampleSettings(n_samples=2, **changes), task)
    assert str(e.value).startswith(message), str(e.value)


def test_the_one_default_sampler_and_where_it_cannot_run():
    pipe = tiny()
    assert pipe.check(SampleSettings()).sampler == DEFAULT_SAMPLER == "DPM++ 2M Karras"
    assert pipe.check(SampleSettings(), Task.INPAINT).sampler == REPLACE_SAMPLER  # one step at a time
    assert tiny(ConcatKind.INPAINT).check(SampleSettings(), Task.INPAINT).sampler == DEFAULT_SAMPLER
    assert pipe.check(SampleSettings(sampler="ddim", steps=1001, spacing="karras")).steps == 1001  # σ grids: any
    keep = torch.ones(16, 16)
    keep[4:12] = 0
    image = torch.full((1, 1, 16, 16), 90, dtype=torch.uint8)
    out = pipe.inpaint(image, keep, steps=2, seed=3)  # no sampler named: the default that can inpaint
    ref = pipe.inpaint(image, keep, steps=2, seed=3, sampler="DDIM")
    assert torch.equal(out, ref)
    z = torch.zeros(1, 1, 16, 16)  # the core alone, as the trainer uses it: a keep-mask means replacement too
    assert pipe.core.sample_latents(SampleSettings(steps=2), init=z, mask=keep[None, None]).z.shape == (1, 1, 16, 16)


def test_sampler_names_users_know_resolve_to_our_samplers():
    assert resolve("DPM++ 2M Karras") == ("dpmpp_2m", "karras") == resolve("dpm++ 2m karras")
    assert resolve("Euler a") == ("euler_ancestral", "trailing") and resolve("heun") == ("heun", "trailing")
    assert resolve("DPM++ 2M Karras", "exponential") == ("dpmpp_2m", "exponential")
    for bad, field in (("plms", "sampler"), (None, "sampler")):
        with pytest.raises(SettingError) as e:
            resolve(bad)
        assert e.value.field == field
    with pytest.raises(SettingError, match="spacing: unknown spacing 'karas'"):
        resolve("ddim", "karas")
    assert all(s in SAMPLERS and sp in SPACINGS for s, sp in PRESETS.values())
    assert list(EQUIVALENTS) == list(SAMPLERS)  # every sampler documented, in the same order
    assert one_step_names() == ["DDIM", "DDPM", "Euler", "Euler a", "Heun", "LCM"]


def test_docs_samplers_tables_are_the_data():
    doc = (ROOT / "docs" / "samplers.md").read_text()
    assert presets_table() in doc and equivalents_table() in doc


def test_trainer_grids_are_drawn_by_the_same_core_as_pipelines(tmp_path):
    """The grid a class-conditional run writes equals Pipeline.run on its exported folder with the grid's noise."""
    import numpy as np
    from PIL import Image

    from latentdiff.data.images import make_grid, upscale_nearest
    from latentdiff.training import make_trainer
    from latentdiff.training.config import load_config

    cfg = load_config("digits-tiny", ["train.steps=2", "train.grid_samples=4", "train.grid_steps=3", "data.limit=32",
                                      "train.warmup_steps=1", "unet.num_classes=10", "cond.guidance=2.0",
                                      "train.seed=5"])
    grid = make_trainer(cfg, tmp_path, progress=False).run()
    pipe = Pipeline.load(tmp_path)
    settings = SampleSettings(4, 4, 3, "ddim", 5, class_label=(0, 1, 2, 3))
    images = pipe.run(settings, noise=GeneratorNoise(torch.Generator().manual_seed(5))).images
    expected = np.asarray(make_grid(upscale_nearest(images)))
    assert np.array_equal(np.asarray(Image.open(grid)), expected)
    assert images.float().std() > 0 and not torch.equal(images[0], images[1])  # four different classes drawn


def folder_with_random_unet(tmp_path):
    cfg = UNetConfig(model_channels=8, channel_mult=(1, 2), attention_resolutions=(), num_heads=1)
    m = Manifest(image_size=16, channels=1, diffusion=DiffusionConfig(), conditioning=Conditioning())
    save_model_folder(tmp_path, {"unet": (cfg.to_dict(), UNet(cfg).state_dict())}, m)
    return tmp_path


@pytest.mark.parametrize("args, line", [
    (["--size", "17"], "error: --size: 17 does not fit this model: both sides must be multiples of 2"),
    (["--seed", str(2**64)], f"error: --seed: must be in [0, {SEED_MAX}] with n_samples=1, got {2**64}"),
    (["--sampler", "plms"], "error: --sampler: unknown sampler 'plms'; choose one of DDIM, DDPM"),
    (["--steps", "1001", "--sampler", "ddim"], "error: --steps: 1001 is more than the schedule's 1000 timesteps"),
])
def test_the_cli_names_its_option_for_a_refused_setting(tmp_path, args, line):
    folder = folder_with_random_unet(tmp_path)
    r = subprocess.run([sys.executable, "-m", "latentdiff", "sample", folder, *args, "--out", tmp_path / "o"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith(line), r.stderr


def test_the_command_line_starts_without_torch():
    code = "import sys, latentdiff.cli; print(sorted(m for m in sys.modules if re.match('torch($|[.])', m)))"
    r = subprocess.run([sys.executable, "-c", "import re; " + code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    help_text = subprocess.run([sys.executable, "-m", "latentdiff", "sample", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    assert "[default: DPM++ 2M Karras; DDIM to inpaint by replacement]" in re.sub(r"\s+", " ", help_text)


def test_seeds_outside_the_generators_range_are_refused_everywhere():
    from latentdiff.diffusion import Schedule
    from latentdiff.pipelines.viz import noised_images

    image = torch.zeros(1, 8, 8, dtype=torch.uint8)
    with pytest.raises(SettingError, match=r"seed: must be in \[0, "):
        noised_images(image, Schedule.from_name("linear", 10), [0, 5], seed=SEED_MAX + 1)
    assert noised_images(image, Schedule.from_name("linear", 10), [0, 5], seed=SEED_MAX - 1).shape == (2, 1, 8, 8)


def test_a_converted_model_without_data_cannot_be_measured_against_its_data():
    from latentdiff.errors import UserError
    from latentdiff.pipelines.evaluate import reference_images

    with pytest.raises(UserError, match=r"names no training data set \(source: stable-diffusion v1\)"):
        reference_images(Manifest(image_size=16, channels=3, source="stable-diffusion v1"), 4)
