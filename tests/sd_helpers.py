"""Shared by the Stable Diffusion tests: random-weight reference models built with diffusers/transformers,
the same-noise text-to-image run on both sides, and single files assembled from latentdiff modules."""

from __future__ import annotations

import pytest
import torch

from latentdiff.models import UNet, UNetConfig
from latentdiff.models.autoencoder import Autoencoder, AutoencoderConfig
from latentdiff.pipelines.generate import PerSampleNoise, Pipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32 module parity bar of the issue
PROMPT = "a red circle above a blue square"
# Tiny SD v1 shape: heads are 8 (SD v1's count, which the single-file loader assumes), text heads 64 wide.
UNET_V1 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8)
VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, sample_size=16)


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, so zero-initialised layers take part in the comparison too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def text_model(layers: int = 2, act: str = "quick_gelu") -> torch.nn.Module:
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, num_hidden_layers=layers,
                                      num_attention_heads=1, intermediate_size=96, max_position_embeddings=77,
                                      hidden_act=act, eos_token_id=2)
    return perturb(transformers.CLIPTextModel(cfg), 3)


def ddim(pipe) -> None:
    """diffusers' DDIM on trailing timesteps ending at ᾱ = 1, the schedule latentdiff's ddim runs."""
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                         set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)


def reference_image(pipe, seed: int, prompt: str = PROMPT, negative: str | None = None) -> torch.Tensor:
    """diffusers' text-to-image run from latentdiff's noise for ``seed``: DDIM 10 steps, guidance 7.5, uint8."""
    latents = PerSampleNoise([seed]).randn((1, 4, 8, 8))
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=10, guidance_scale=7.5, latents=latents,
               output_type="pt").images
    return (out * 255).round().to(torch.uint8)


def ours_image(pipe: Pipeline, seed: int, prompt: str = PROMPT, negative: str | None = None,
               size: int | None = None) -> torch.Tensor:
    """latentdiff's run of :func:`reference_image` (``size``: another side than the model's own)."""
    return pipe.generate(n_samples=1, steps=10, sampler="ddim", seed=seed, prompt=prompt, negative_prompt=negative,
                         guidance=7.5, spacing="trailing", width=size, height=size)


def single_file(text_state: dict[str, torch.Tensor], unet_cfg: UNetConfig, text_prefix: str,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """A single-file checkpoint in the CompVis layout from random latentdiff models (CompVis names)."""
    torch.manual_seed(seed)
    unet = perturb(UNet(unet_cfg), seed)
    vae = perturb(Autoencoder(AutoencoderConfig(in_channels=3, out_channels=3, base_channels=32,
                                                 channel_mult=(1, 2), num_res_blocks=1)), seed + 1)
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    state |= {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    return state | {text_prefix + k: v.contiguous() for k, v in text_state.items()}


def open_clip_state(hf: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers CLIP text weights renamed to OpenCLIP's layout (q, k, v packed into in_proj)."""
    s = {k.removeprefix("text_model."): v for k, v in hf.state_dict().items()}
    out = {"token_embedding.weight": s["embeddings.token_embedding.weight"],
           "positional_embedding": s["embeddings.position_embedding.weight"],
           "ln_final.weight": s["final_layer_norm.weight"], "ln_final.bias": s["final_layer_norm.bias"],
           "text_projection": torch.randn(64, 64), "logit_scale": torch.tensor(4.6)}
    for n in range(hf.config.num_hidden_layers):
        p, q = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[q + f"attn.in_proj_{kind}"] = torch.cat([s[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[q + f"{b}.{kind}"] = s[p + f"{a}.{kind}"]
    return out


def diffusers_pipeline(folder, unet: dict = UNET_V1, vae: dict = VAE, text: torch.nn.Module | None = None,
                       seed: int = 0, **scheduler: object):
    """A random tiny StableDiffusionPipeline saved in ``folder`` (diffusers layout), DDIM set up as ours runs it."""
    from latentdiff.models.tokenizer import CLIPTokenizer

    torch.manual_seed(seed)
    CLIPTokenizer.default(pad_token=0 if text is not None and text.config.hidden_act == "gelu" else "<|endoftext|>"
                          ).save(folder.parent / f"{folder.name}-tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder.parent / f"{folder.name}-tokenizer")
    pipe = diffusers.StableDiffusionPipeline(
        vae=perturb(diffusers.AutoencoderKL(**vae), seed + 1), text_encoder=text if text is not None else text_model(),
        tokenizer=tokenizer, unet=perturb(diffusers.UNet2DConditionModel(**unet), seed + 2),
        scheduler=diffusers.DDIMScheduler(**dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 clip_sample=False, set_alpha_to_one=False, steps_offset=1) | scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    ddim(pipe)
    return pipe
