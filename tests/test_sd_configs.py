"""Every key of diffusers' UNet / VAE and transformers' CLIP text configs is honoured or refused by name;
the honoured ones give diffusers' outputs on random weights (max |Δ| ≤ 1e-4), and would not if ignored."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_into
from latentdiff.formats.clip_keys import CLIP_KEYS_ALL, CLIP_TEXT_KEYS, clip_text_config_from_hf
from latentdiff.formats.sd_configs import (UNET_KEYS, VAE_KEYS, check_config_keys, markdown_table,
                                           unet_config_from_diffusers, unet_config_to_diffusers,
                                           vae_config_from_diffusers)
from latentdiff.formats.sd_keys import unet_from_diffusers, unet_key_map, vae_from_diffusers, vae_key_map
from latentdiff.models import UNet, UNetConfig
from latentdiff.models.autoencoder import Autoencoder, AutoencoderConfig
from sd_helpers import TOL, diffusers, perturb, transformers

pytestmark = pytest.mark.filterwarnings("ignore")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "stable_diffusion.md"
BASE = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
            cross_attention_dim=32, attention_head_dim=4)
CASES = {  # what each case sets on top of BASE
    "norm_num_groups": {"norm_num_groups": 16},
    "norm_eps": {"norm_eps": 1e-2},
    "downsample_padding": {"downsample_padding": 0},
    "center_input_sample": {"center_input_sample": True},
    "mid_block_scale_factor": {"mid_block_scale_factor": 2.0},
    "per-level heads, one width": {"attention_head_dim": (2, 4)},  # 16-wide heads: num_head_channels
    "unequal head widths": {"attention_head_dim": (1, 8)},  # 32- and 8-wide heads: heads_per_level
    "all at once": {"norm_num_groups": 8, "norm_eps": 1e-3, "downsample_padding": 0, "center_input_sample": True,
                    "mid_block_scale_factor": 1.5, "attention_head_dim": (4, 2), "down_block_types":
                    ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
}


def _unet_from(ref: torch.nn.Module, config: dict) -> UNet:
    ours = UNet(UNetConfig(**unet_config_from_diffusers(config))).eval()
    load_into(ours, unet_from_diffusers(ref.state_dict(), unet_key_map(ours.state_dict(), ours.layout)), "ref")
    return ours


@pytest.mark.parametrize("case", CASES)
def test_unet_config_keys_match_diffusers(case) -> None:
    ref = perturb(diffusers.UNet2DConditionModel(**BASE | CASES[case]), 5)
    ours = _unet_from(ref, dict(ref.config))
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = ref(x, t, c).sample
        err = float((ours(x, t, c) - expected).abs().max())
        # the same weights read with the key left at its default: what ignoring it would give
        reset = [k for k in CASES[case] if not k.endswith("block_types")]  # the layout itself stays
        ignored = _unet_from(ref, dict(ref.config) | {k: BASE[k] if k in BASE else UNET_DEFAULTS[k] for k in reset})
        missed = float((ignored(x, t, c) - expected).abs().max())
    print(case, "max |Δ|", err, "ignoring it:", missed)
    assert err <= TOL and missed > 100 * TOL
    # and back: our config written as diffusers' reads as the same network
    again = unet_config_from_diffusers(unet_config_to_diffusers(ours.config, ours.layout))
    assert UNetConfig(**again) == ours.config


UNET_DEFAULTS = {k: p.default for k, p in inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters.items()}


@pytest.mark.parametrize("kw", [{"norm_num_groups": 16}, {"mid_block_add_attention": False}])
def test_vae_config_keys_match_diffusers(kw) -> None:
    ref = perturb(diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                          layers_per_block=1, **kw), 6)
    ours = Autoencoder(AutoencoderConfig(**vae_config_from_diffusers(dict(ref.config)))).eval()
    load_into(ours, vae_from_diffusers(ref.state_dict(), vae_key_map(ours.state_dict(), ours.config)), "ref")
    img, z = torch.rand(1, 3, 16, 16) * 2 - 1, torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert (ours.encode(img).mean - ref.encode(img).latent_dist.mean).abs().max() <= TOL
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() <= TOL


def test_every_installed_config_key_has_a_rule() -> None:
    """A key a newer diffusers/transformers adds fails here until the tables say what it does."""
    unet = set(inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters) - {"self"}
    vae = set(inspect.signature(diffusers.AutoencoderKL.__init__).parameters) - {"self"}
    clip = {k for k in transformers.CLIPTextConfig().to_dict() if not k.startswith("_")}
    assert unet <= set(UNET_KEYS), sorted(unet - set(UNET_KEYS))
    assert vae <= set(VAE_KEYS), sorted(vae - set(VAE_KEYS))
    assert clip <= set(CLIP_KEYS_ALL), sorted(clip - set(CLIP_KEYS_ALL))
    docs = DOCS.read_text()
    for table in (UNET_KEYS, VAE_KEYS, CLIP_TEXT_KEYS):  # the docs print the tables the code uses
        assert markdown_table(table) in docs, "regenerate the key tables in docs/stable_diffusion.md"


def _other_value(accepted: tuple) -> object:
    return next(v for v in (7, "something-else", True, False, None, 0.5) if v not in accepted)


@pytest.mark.parametrize("table,name", [(UNET_KEYS, "unet"), (VAE_KEYS, "vae"), (CLIP_KEYS_ALL, "clip")])
def test_other_values_and_unknown_keys_are_refused_by_name(table, name) -> None:
    only = {k: accepted for k, (policy, accepted, _) in table.items() if policy == "only"}
    assert only
    for key, accepted in only.items():
        for good in accepted:
            check_config_keys({key: good}, table, name)
        with pytest.raises(UserError, match=f"{name}: {key}=.* is not supported"):
            check_config_keys({key: _other_value(accepted)}, table, name)
    with pytest.raises(UserError, match="unknown key 'brand_new_key'"):
        check_config_keys({"_class_name": "X", "brand_new_key": 1}, table, name)


def test_values_latentdiff_cannot_hold_are_refused_by_name() -> None:
    cfg = dict(diffusers.UNet2DConditionModel(**BASE).config)
    for change, message in [({"layers_per_block": [1, 2]}, "per-level layers_per_block"),
                            ({"norm_num_groups": 24}, "norm_num_groups=24 must be a positive integer dividing"),
                            ({"num_attention_heads": 4}, "num_attention_heads=4 is not supported"),
                            ({"time_cond_proj_dim": 256}, "time_cond_proj_dim=256 .*LCM-LoRA"),
                            ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),
                            ({"attention_head_dim": [2, 4, 8]}, "one head count per level")]:
        with pytest.raises(UserError, match=message):
            unet_config_from_diffusers(cfg | change, "unet/config.json")
    vae = dict(diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2).config)
    with pytest.raises(UserError, match="vae/config.json: norm_num_groups=24"):  # not blamed on block_out_channels
        vae_config_from_diffusers(vae | {"norm_num_groups": 24})
    with pytest.raises(UserError, match="use_quant_conv=False"):
        vae_config_from_diffusers(vae | {"use_quant_conv": False})
    text = transformers.CLIPTextConfig(hidden_size=64, num_attention_heads=4).to_dict()
    assert clip_text_config_from_hf(text)["heads"] == 4
    with pytest.raises(UserError, match="hidden_act='relu'"):
        clip_text_config_from_hf(text | {"hidden_act": "relu"})
