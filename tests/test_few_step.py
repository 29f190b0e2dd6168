"""Few-step models on a whole text-to-image run, same noise as diffusers: LCM (with an LCM-LoRA, as users run
SD v1.5 + lcm-lora-sdv1-5) and SD-Turbo-style Euler ancestral on trailing timesteps, both without guidance."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from latentdiff.pipelines.lora import load_lora
from latentdiff.pipelines.stable_diffusion import load_any
from sd_helpers import PROMPT, diffusers, diffusers_pipeline

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("few")
    ref = diffusers_pipeline(root / "diffusers")
    return root, ref


def _theirs(pipe, steps: int, seed: int, guidance: float) -> torch.Tensor:
    """diffusers' run: the generator draws the initial latents first, then each step's noise, as ours does."""
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
               output_type="pt").images
    return (out * 255).round().to(torch.uint8)


def _lcm_lora(pipe, path) -> None:
    """A random LoRA on the UNet's attention and convolutions (kohya layout), standing in for an LCM-LoRA."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, m in pipe.unet.named_modules():
        if name.endswith(("to_q", "to_v", "to_out.0", "proj_in", "conv1")) and hasattr(m, "weight"):
            key = "lora_unet_" + name.replace(".", "_")
            w = m.weight
            out[f"{key}.lora_down.weight"] = torch.randn(4, *w.shape[1:], generator=g) * 0.2
            out[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 4, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.2
            out[f"{key}.alpha"] = torch.tensor(8.0)
    save_file(out, path)


def test_lcm_lora_run_matches_diffusers(sd, tmp_path) -> None:
    root, _ = sd
    ref = diffusers.StableDiffusionPipeline.from_pretrained(root / "diffusers", safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    _lcm_lora(ref, tmp_path / "lcm-lora.safetensors")
    ref.load_lora_weights(tmp_path / "lcm-lora.safetensors")
    ref.fuse_lora()
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ours = load_any(root / "diffusers")
    load_lora(ours, tmp_path / "lcm-lora.safetensors")
    for steps, seed in ((4, 3), (2, 4)):
        expected = _theirs(ref, steps, seed, guidance=1.0)  # LCM runs without classifier-free guidance
        got = ours.generate(n_samples=1, steps=steps, sampler="lcm", spacing="lcm", seed=seed, prompt=PROMPT,
                            guidance=1.0)
        assert expected.float().std() > 5
        assert (got.int() - expected.int()).abs().max() <= 1, steps


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_style_euler_ancestral_matches_diffusers(sd, steps) -> None:
    """SD-Turbo's recipe: EulerAncestralDiscreteScheduler on trailing timesteps, 1-4 steps, guidance off
    (diffusers' guidance_scale=0.0 switches guidance off; latentdiff's guidance 1 is the plain conditional model)."""
    root, ref = sd
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config,
                                                                         timestep_spacing="trailing")
    ours = load_any(root / "diffusers")
    expected = _theirs(ref, steps, 5, guidance=0.0)
    got = ours.generate(n_samples=1, steps=steps, sampler="euler_ancestral", spacing="trailing", seed=5, prompt=PROMPT,
                        guidance=1.0)
    assert expected.float().std() > 5
    assert (got.int() - expected.int()).abs().max() <= 1
