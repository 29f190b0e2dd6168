"""Training a LoRA on a folder of captioned images: the base model frozen, only B A learned.

The same objective as the base model's training, E[‖target - model(z_t, t, context)‖²] with z_t from
(20.8), on latents of the images encoded once by the base's frozen autoencoder (the posterior's mean
and spread are cached; each step draws z = s · (mean + std · n - shift), LDM's posterior sample). The
adapter (models/lora.py: LoraAdapter) runs as forward hooks on the UNet's layers named by
``lora.unet_targets`` (and the CLIP text encoder's with ``lora.text_encoder``); the export is a
kohya / A1111 file, ``lora.safetensors`` in the run folder, with diffusers' module names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentdiff.data.images import make_grid, save_png, upscale_nearest
from latentdiff.diffusion import diffusion_loss, draw_t_eps
from latentdiff.diffusion.config import DiffusionConfig
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import save_tensors
from latentdiff.formats.clip_keys import clip_text_key_map
from latentdiff.formats.lora import save_kohya
from latentdiff.formats.sd_keys import unet_key_map
from latentdiff.models.autoencoder import Autoencoder
from latentdiff.models.clip import CLIPTextEncoder
from latentdiff.models.conditioning import Conditioner
from latentdiff.models.lora import LoraAdapter
from latentdiff.models.sampling import GeneratorNoise, LatentSampler
from latentdiff.models.settings import SampleSettings
from latentdiff.models.unet import UNet
from latentdiff.training.loop import Batch, TrainingRun

LORA_FILE = "lora.safetensors"


@dataclass
class LoraBase:
    """The frozen model a LoRA adapts (pipelines/lora.py builds it from any model path)."""

    unet: UNet
    autoencoder: Autoencoder
    text_encoder: nn.Module  # a CLIPTextEncoder, or latentdiff's packaged encoder (then only the UNet is adapted)
    diffusion: DiffusionConfig
    guidance: float  # the base's default classifier-free guidance, for preview grids
    source: str  # where it came from, recorded in the LoRA file


def _targets(names: dict[str, str], endings: tuple[str, ...], what: str) -> dict[str, str]:
    """{our module name: the diffusers/transformers name} of the layers whose diffusers name ends with one of ``endings``."""
    chosen = {ours: theirs for ours, theirs in names.items() if theirs.endswith(endings)}
    unmatched = [e for e in endings if not any(theirs.endswith(e) for theirs in names.values())]
    if unmatched:
        raise UserError(f"lora.{what}: no layer of the model is named like {unmatched[0]!r} (names are diffusers' "
                        f"/ transformers', e.g. {', '.join(sorted(names.values())[:3])})")
    return chosen


class LoraTrainer(TrainingRun):
    """Learns LoRA factors for a frozen base model on captioned images; exports a kohya-layout file."""

    kind = "LoRA"

    def __init__(self, cfg: Any, out_dir: Path | str, base: LoraBase, resume: bool = False, device: str = "auto",
                 progress: bool | None = None) -> None:
        self.base = base  # build() runs inside TrainingRun.__init__
        super().__init__(cfg, out_dir, resume=resume, device=device, progress=progress)

    def build(self) -> None:
        """Freeze the base, attach the adapters, encode the images once."""
        b, lc = self.base, self.cfg.lora
        self.unet = b.unet.to(self.device).eval().requires_grad_(False).float()
        self.autoencoder = b.autoencoder.to(self.device).eval().requires_grad_(False).float()
        self.text = b.text_encoder.to(self.device).eval().requires_grad_(False).float()
        if not self.data.captions:
            raise UserError(f"data.source {self.cfg.data.source!r} has no captions; a LoRA learns what captions say")
        self.schedule = b.diffusion.build_schedule()
        ours_to_diffusers = {k[:-7]: v[:-7] for k, v in unet_key_map(self.unet.state_dict(), self.unet.layout).items()
                             if k.endswith(".weight") and isinstance(self.unet.get_submodule(k[:-7]),
                                                                     (nn.Linear, nn.Conv2d))}
        self.unet_names = _targets(ours_to_diffusers, lc.unet_targets, "unet_targets") if lc.unet_targets else {}
        self.text_names: dict[str, str] = {}
        if lc.text_encoder:
            if not isinstance(self.text, CLIPTextEncoder):
                raise UserError(f"lora.text_encoder: {lc.base} has no CLIP text encoder ({type(self.text).__name__})")
            tm = self.text.text_model
            names = {k[:-7]: v[:-7] for k, v in clip_text_key_map(list(tm.state_dict())).items()
                     if k.endswith(".weight") and isinstance(tm.get_submodule(k[:-7]), nn.Linear)}
            self.text_names = _targets(names, lc.text_targets, "text_targets")
        self.adapter = nn.ModuleDict({"unet": LoraAdapter(self.unet, list(self.unet_names), lc.rank, lc.alpha)})
        if self.text_names:
            self.adapter["text"] = LoraAdapter(self.text.text_model, list(self.text_names), lc.rank, lc.alpha)
        self.opt = self.adamw(self.adapter.parameters(), lr=self.cfg.train.lr, weight_decay=self.cfg.train.weight_decay)
        self.cond = Conditioner(self.unet.config, self.text, self.device, cache=not self.text_names)
        self._encode_images()

    @torch.no_grad()
    def _encode_images(self) -> None:
        """The posterior mean and spread of every image (and of its mirror image with data.hflip), on the CPU."""
        ae, size = self.autoencoder, self.cfg.data.image_size
        if self.cfg.data.channels != ae.config.in_channels or size % ae.downsample_factor:
            raise UserError(f"data: {self.cfg.data.channels}-channel {size} px images do not fit the base's autoencoder "
                            f"({ae.config.in_channels} channels, sides multiples of {ae.downsample_factor})")
        moments = {False: [], True: []} if self.cfg.data.hflip else {False: []}
        for start in range(0, len(self.data), 16):
            x = self.data.batch(torch.arange(start, min(start + 16, len(self.data)))).to(self.device)
            for flip, out in moments.items():
                post = ae.encode(x.flip(-1) if flip else x)
                out.append(torch.stack([post.mean, post.std], 1).cpu())
        self.moments = {flip: torch.cat(parts) for flip, parts in moments.items()}  # (N, 2, C, h, w)

    def modules(self) -> dict[str, nn.Module]:
        """The adapter (the base is frozen and not saved)."""
        return {"model": self.adapter}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One AdamW over the LoRA factors."""
        return {"model": self.opt}

    def draw(self) -> Batch:
        """Indices and flips, caption-dropout coins, the posterior's noise, and t and ε of the objective."""
        batch = super().draw()
        n, shape = len(batch["idx"]), tuple(self.moments[False].shape[2:])
        batch["drop"] = torch.rand(n, generator=self.noise_gen) < self.cfg.lora.caption_dropout
        batch["posterior"] = torch.randn((n, *shape), generator=self.noise_gen)
        batch["t"], batch["eps"] = draw_t_eps(self.schedule, (n, *shape), self.noise_gen)
        return batch

    def train_step(self) -> dict[str, torch.Tensor]:
        """One AdamW step of the LoRA factors on the global batch (skipped on the device when the loss is not
        finite)."""
        logs = self.accumulate(self.draw(), self.micro_loss, self.opt)
        self.optimizer_step(self.opt, self.adapter.parameters(), skip=self.check_finite(logs["loss"]))
        return logs

    def micro_loss(self, part: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The base's diffusion loss on some rows, through the adapted networks."""
        flips = part.get("flip", torch.zeros(len(part["idx"]), dtype=torch.bool))
        m = torch.stack([self.moments[bool(f)][int(i)] for i, f in zip(part["idx"], flips)])
        ae = self.autoencoder.config
        z0 = (ae.scale_factor * (m[:, 0] + m[:, 1] * part["posterior"] - ae.shift_factor)).to(self.device)
        captions = ["" if d else self.data.captions[int(i)] for i, d in zip(part["idx"], part["drop"])]
        with torch.set_grad_enabled(bool(self.text_names)):
            context = self.cond.prompts(captions)["context"]
        d = self.base.diffusion

        def model_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.unet(z_t, t, context=context)

        loss = diffusion_loss(model_fn, z0, self.schedule, d.prediction, d.weighting, d.min_snr_gamma,
                              d.min_snr_offset, t=part["t"], eps=part["eps"])
        return loss, {"loss": loss.detach()}  # read by the loop every log_every steps, not here

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter as a kohya / A1111 file's tensors (diffusers' and transformers' module names)."""
        layers = {}
        for component, names in (("unet", self.unet_names), ("text", self.text_names)):
            if component in self.adapter:
                for ours, (a, b) in self.adapter[component].factors().items():
                    layers[(component, names[ours])] = (a, b, self.cfg.lora.alpha)
        return save_kohya(layers)

    def export(self) -> None:
        """``lora.safetensors``: kohya's layout with its ``ss_*`` metadata, loadable by A1111, diffusers and ``--lora``."""
        lc = self.cfg.lora
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(lc.rank), "ss_network_alpha": str(lc.alpha),
                "ss_base_model": self.base.source, "ss_steps": str(self.step), "ss_num_train_images": str(len(self.data)),
                "ss_resolution": str(self.cfg.data.image_size)}
        save_tensors(self.lora_tensors(), self.out / LORA_FILE, meta)

    @torch.no_grad()
    def preview(self) -> Path:
        """A grid of the data's first captions drawn by the adapted model, fixed seed (comparable over training)."""
        tc = self.cfg.train
        n = tc.grid_samples
        distinct = list(dict.fromkeys(self.data.captions))
        prompts = tuple(distinct[i % len(distinct)] for i in range(n))
        guidance = self.cfg.lora.guidance if self.cfg.lora.guidance is not None else self.base.guidance
        settings = SampleSettings(n, n, tc.grid_steps, tc.grid_sampler, tc.seed, prompt=prompts, guidance=guidance)
        core = LatentSampler(self.unet, self.autoencoder, self.cond, self.base.diffusion, self.cfg.data.image_size,
                             guidance=guidance)
        g = torch.Generator().manual_seed(tc.seed)
        images = core.decode(core.sample_latents(settings, GeneratorNoise(g)).z)
        path = self.out / "samples" / f"step_{self.step:08d}.png"
        save_png(make_grid(upscale_nearest(images)), path, {"step": self.step, "prompts": list(prompts),
                                                            "guidance": guidance})
        return path
