"""UNet and its building blocks: SD-compatible shapes and names, init, errors, config, attention slicing."""

from __future__ import annotations

import json

import pytest
import torch

from latentdiff.errors import UserError
from latentdiff.models import UNet, UNetConfig
from latentdiff.nn import Attention, norm_groups, timestep_embedding


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


SD_DIFFUSERS = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_sd_parameter_count_matches_diffusers(version: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    extra = (dict(cross_attention_dim=768, attention_head_dim=8) if version == "v1" else
             dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True))
    with torch.device("meta"):
        ours = UNet(getattr(UNetConfig, f"sd_{version}")())
        ref = diffusers.UNet2DConditionModel(**SD_DIFFUSERS, **extra)
    assert n_params(ours) == n_params(ref)
    if version == "v1":
        assert n_params(ours) == 859_520_964


@pytest.mark.parametrize("linear", [False, True])
def test_sd_checkpoint_keys_convert_to_diffusers_and_outputs_match(linear: bool) -> None:
    """Our state dict, named like an SD single-file checkpoint, goes through diffusers' converter and agrees."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(1, 2), num_heads=2, context_dim=16, use_linear_projection=linear)
    ours = UNet(cfg).eval()
    with torch.no_grad():  # perturb so the zero-initialised layers take part in the comparison
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=16, attention_head_dim=2, use_linear_projection=linear).eval()
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    ref.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(ref.config)), strict=True)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, c), ref(x, t, c).sample, atol=1e-5, rtol=1e-4)


def test_forward_shapes() -> None:
    x = torch.randn(3, 1, 28, 28)
    assert UNet()(x, torch.tensor([0, 10, 999])).shape == x.shape
    assert UNet()(x, 500).shape == x.shape  # scalar t broadcasts
    assert UNet()(x, torch.rand(3) * 999).shape == x.shape  # float t
    cross = UNet(UNetConfig(context_dim=24, out_channels=2))
    assert cross(x, torch.tensor([1, 2, 3]), context=torch.randn(3, 7, 24)).shape == (3, 2, 28, 28)
    labelled = UNet(UNetConfig(num_classes=10))
    assert labelled.label_emb.num_embeddings == 11  # last row = null class for classifier-free guidance
    assert labelled(x, 5, class_labels=torch.tensor([0, 9, 10])).shape == x.shape
    assert labelled(x, 5).shape == x.shape  # no labels: allowed (what they mean: test_no_labels_is_the_null_class)
    lin = UNet(UNetConfig(num_head_channels=16, use_linear_projection=True, transformer_depth=2))
    assert lin(x, 1).shape == x.shape


def test_no_labels_is_the_null_class() -> None:
    """class_labels=None means the last label_emb row ("no class", what guidance uses); a real label differs."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(num_classes=10)).eval()
    with torch.no_grad():  # zero-initialised layers (the output, each ResBlock's last conv) hide the labels
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        unlabelled = model(x, 5)
        null = model(x, 5, class_labels=torch.full((3,), 10))
        labelled = model(x, 5, class_labels=torch.tensor([0, 9, 3]))
    assert torch.equal(unlabelled, null)
    assert (labelled - unlabelled).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample's label shows


@pytest.mark.parametrize("labels", [False, True])
def test_plain_attention_unet_equals_diffusers_unet2dmodel(labels: bool) -> None:
    """unet.attention_block=plain is diffusers' UNet2DModel: its weights load by name and the outputs agree."""
    diffusers = pytest.importorskip("diffusers")
    from latentdiff.formats.checkpoint import load_into
    from latentdiff.formats.sd_keys import unet_from_diffusers, unet_key_map

    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16, norm_num_groups=8,
        num_class_embeds=4 if labels else None).eval()
    with torch.no_grad():  # perturb so the zero-initialised layers take part in the comparison
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = UNetConfig(in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(2, 4), num_heads=2, norm_groups=8, attention_block="plain",
                     num_classes=4 if labels else None)
    ours = UNet(cfg).eval()
    state = dict(ref.state_dict())
    if labels:  # our label table has one more row, the "no class" of classifier-free guidance
        state["class_embedding.weight"] = torch.cat([state["class_embedding.weight"], torch.zeros(1, 64)])
    load_into(ours, unet_from_diffusers(state, unet_key_map(ours.state_dict(), ours.layout)), "UNet2DModel")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    y = torch.tensor([1, 3]) if labels else None
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, class_labels=y), ref(x, t, class_labels=y).sample, atol=1e-5,
                                   rtol=1e-4)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) + 64 * labels
    with pytest.raises(UserError, match="attention_block=plain"):
        UNetConfig(context_dim=8, attention_block="plain")
    with pytest.raises(UserError, match="attention_block"):
        UNetConfig(attention_block="linear")


def test_bf16_training_attention_runs_in_fp32_on_cpu() -> None:
    """Under CPU bf16 autocast with gradients the attention scores are fp32: the same output as fp32 inputs."""
    torch.manual_seed(0)
    attn = Attention(16, None, 2, 8)
    x = torch.randn(3, 10, 16)
    with torch.autocast("cpu", torch.bfloat16):
        q, k, v = (m(x).unflatten(-1, (2, -1)).transpose(1, 2) for m in (attn.to_q, attn.to_k, attn.to_v))
        out = attn(x)
    assert out.dtype == torch.bfloat16
    scores = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    with torch.autocast("cpu", torch.bfloat16):
        expected = attn.to_out(scores.to(torch.bfloat16).transpose(1, 2).reshape(3, 10, 16))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out.float().sum().backward()
    assert attn.to_q.weight.grad is not None and attn.to_q.weight.grad.dtype == torch.float32


def test_channels_last_bf16_and_checkpointing_agree() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(context_dim=8))
    with torch.no_grad():
        model.out[2].weight.normal_()
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([1, 900]), torch.randn(2, 3, 8)
    ref = model(x, t, c)
    out_cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, c)
    torch.testing.assert_close(out_cl, ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x, t, c)).all()
    model.gradient_checkpointing = True
    model.train()
    model(x, t, c).square().mean().backward()
    assert model.out[2].weight.grad is not None
    torch.testing.assert_close(model(x, t, c), ref, atol=1e-4, rtol=1e-4)


def test_zero_output_at_init_and_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(context_dim=8, num_classes=3))
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([1, 900]), torch.randn(2, 3, 8)
    assert torch.equal(model(x, t, c), torch.zeros_like(x))
    # Perturb the output conv: the graph reaches every parameter (no unused ones, which DDP would reject).
    with torch.no_grad():
        model.out[2].weight.normal_()
    model(x, t, c, class_labels=torch.tensor([0, 3])).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # Residual branches start as the identity (zero last layers), so after perturbing those too every
    # parameter must get a non-zero gradient.
    model.zero_grad()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out_layers.3.weight", "proj_out.weight")):
                p.normal_(std=0.02)
    model(x, t, c, class_labels=torch.tensor([0, 3])).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_bad_inputs_raise_user_error() -> None:
    model = UNet()
    with pytest.raises(UserError, match=r"divisible by 4.*\(1, 1, 30, 30\)"):
        model(torch.randn(1, 1, 30, 30), 1)
    with pytest.raises(UserError, match="no cross-attention"):
        model(torch.randn(1, 1, 28, 28), 1, context=torch.randn(1, 2, 8))
    with pytest.raises(UserError, match="timesteps"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2, 3]))
    with pytest.raises(UserError, match=r"context of shape \(B, L, 8\)"):
        UNet(UNetConfig(context_dim=8))(torch.randn(1, 1, 28, 28), 1)


def test_config_round_trip_and_unknown_keys() -> None:
    for cfg in (UNetConfig(), UNetConfig.sd_v1(), UNetConfig.sd_v2(), UNetConfig(num_classes=10)):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert UNetConfig.from_dict(d) == cfg
    with pytest.raises(UserError, match="channel_mul, num_head"):
        UNetConfig.from_dict({**UNetConfig().to_dict(), "channel_mul": [1], "num_head": 3})


def test_timestep_embedding_matches_diffusers() -> None:
    diffusers_emb = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 1, 17, 500, 999])
    for dim in (32, 320, 33):
        ours = timestep_embedding(t, dim)
        ref = diffusers_emb.get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(ours, ref)
    # Direct formula: first half cos(t * 10000^(-i/half)), second half sin, for float t too.
    tf, half = torch.tensor([2.5]), 4
    freqs = 10000 ** (-torch.arange(half) / half)
    expected = torch.cat([torch.cos(tf * freqs), torch.sin(tf * freqs)])[None]
    torch.testing.assert_close(timestep_embedding(tf, 8), expected)


def test_attention_slicing_matches_full() -> None:
    torch.manual_seed(0)
    attn = Attention(32, context_dim=12, heads=4, dim_head=8)
    x, c = torch.randn(3, 10, 32), torch.randn(3, 6, 12)
    full = attn(x, c)
    for s in (1, 5, 12):
        attn.slice_size = s
        torch.testing.assert_close(attn(x, c), full, atol=1e-5, rtol=1e-5)
    self_attn = Attention(32, heads=2, dim_head=16, slice_size=3)
    sliced = self_attn(x)
    self_attn.slice_size = None
    torch.testing.assert_close(sliced, self_attn(x), atol=1e-5, rtol=1e-5)


def test_norm_groups() -> None:
    assert [norm_groups(c) for c in (320, 64, 16, 48, 1)] == [32, 32, 16, 24, 1]
