"""The fast CPU path (``--precision bf16``: bf16 weights and kernels) against diffusers' fp32 outputs.

The tolerances below are the ones docs/stable_diffusion.md states; the measured values on this random tiny
SD v1-shaped model are in the comments (benchmarks/results/sd_unet.md has the full-size UNet's).
"""

from __future__ import annotations

import pytest
import torch
from sd_helpers import diffusers_pipeline, ours_image, reference_image

from latentdiff.pipelines.stable_diffusion import load_diffusers_folder

pytestmark = pytest.mark.filterwarnings("ignore")

UNET_REL_RMS = 0.04  # ||ε_bf16 - ε_fp32|| / ||ε_fp32||, measured 0.018
UNET_MAX_ABS = 0.1  # on outputs of std 0.55, measured 0.039
IMAGE_MEAN_GREY = 4.0  # mean |Δ| of the uint8 image after 4 guided DDIM steps, measured 2.3 and 2.5
IMAGE_MAX_GREY = 32  # largest |Δ| of one pixel channel, measured 17 and 14


def test_bf16_unet_and_images_stay_within_the_stated_tolerance_of_diffusers_fp32(tmp_path) -> None:
    ref = diffusers_pipeline(tmp_path / "diffusers")
    ours = load_diffusers_folder(tmp_path / "diffusers").configure(precision="bf16")
    assert {p.dtype for p in ours.unet.parameters()} == {torch.bfloat16}
    torch.manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 77, 64)
    with torch.no_grad():
        want = ref.unet(x, t, c).sample
        got = ours.unet(x.bfloat16(), t, c.bfloat16()).float()
    assert (got - want).norm() / want.norm() < UNET_REL_RMS
    assert (got - want).abs().max() < UNET_MAX_ABS
    for seed in (7, 8):
        expected = reference_image(ref, seed, steps=4)
        delta = (ours_image(ours, seed, steps=4).int() - expected.int()).abs()
        assert expected.float().std() > 5  # not a flat image: the comparison means something
        assert delta.float().mean() < IMAGE_MEAN_GREY and delta.max() <= IMAGE_MAX_GREY
