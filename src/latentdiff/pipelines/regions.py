"""Regional prompts: per sample, several (prompt, mask) pairs, each prompt guiding only its part of the image.

The masks are given on the image (H, W), in [0, 1], and must add up to 1 at every pixel; they are
averaged down to the latent grid. Samples with fewer regions than others are padded with empty
regions (mask 0), so one batch runs the same number of passes for every sample. The core
(models/sampling.py, ``regions=``) guides with ``diffusion.regional_guidance``; ``pipelines/layout.py``
makes such regions from a two-object shapes caption.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from latentdiff.errors import UserError
from latentdiff.models.conditioning import CondKind
from latentdiff.models.sampling import RegionConditions
from latentdiff.models.settings import SampleSettings

if TYPE_CHECKING:
    from latentdiff.pipelines.generate import Pipeline

Regions = Sequence[Sequence[tuple[str, torch.Tensor]]]  # per sample: (prompt, mask (H, W))


def region_inputs(pipe: "Pipeline", regions: Regions, s: SampleSettings) -> RegionConditions:
    """The UNet's condition for every region slot (each for all n samples) and the masks on the latent grid."""
    n, image_hw = s.n_samples, pipe.image_hw(s)
    if pipe.cond.kind is not CondKind.TEXT:
        raise UserError(f"{pipe.path}: regions need a text-conditional model (regional prompts)")
    if len(regions) not in (1, n):
        raise UserError(f"regions: give one list of (prompt, mask) or one per sample (n_samples={n}), "
                        f"got {len(regions)}")
    per_sample = list(regions) * (n // len(regions))
    k = max(len(r) for r in per_sample)
    if k == 0:
        raise UserError("regions: every sample needs at least one (prompt, mask) region")
    h, w = pipe.latent_shape(s)[-2:]
    prompts, masks = [[""] * n for _ in range(k)], torch.zeros(k, n, 1, h, w)
    for i, sample_regions in enumerate(per_sample):
        total = torch.zeros(image_hw)
        for j, (prompt, mask) in enumerate(sample_regions):
            mask = torch.as_tensor(mask, dtype=torch.float32)
            if tuple(mask.shape) != tuple(image_hw) or not bool(((mask >= 0) & (mask <= 1)).all()):
                raise UserError(f"regions: sample {i}, region {j}: a mask must be {image_hw[0]}x{image_hw[1]} "
                                f"with values in [0, 1], got shape {tuple(mask.shape)}")
            prompts[j][i] = prompt
            masks[j, i, 0] = F.adaptive_avg_pool2d(mask[None, None], (h, w))[0, 0]
            total += mask
        if not torch.allclose(total, torch.ones(image_hw), atol=1e-3):
            raise UserError(f"regions: the masks of sample {i} must add up to 1 at every pixel "
                            f"(they range over [{float(total.min()):g}, {float(total.max()):g}])")
    return RegionConditions(tuple(pipe.cond.prompts(p) for p in prompts), masks.to(pipe.device))
