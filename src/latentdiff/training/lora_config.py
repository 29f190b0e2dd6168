"""The settings of a LoRA training run (``latentdiff train lora BASE_MODEL data.source=FOLDER ...``)."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from latentdiff.data.config import DataConfig
from latentdiff.errors import UserError
from latentdiff.formats.dataclass_io import ConfigMixin, build_dataclass, check_type, to_plain
from latentdiff.training.config import TrainConfig

# kohya's default set for SD LoRAs: every projection of the UNet's transformer blocks (diffusers names)
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


@dataclass
class LoraConfig(ConfigMixin):
    """What is adapted and how: W' = W + (alpha / rank) · B A on the layers named by ``*_targets``."""

    section: ClassVar[str] = "lora"

    base: str = ""  # the model to adapt: a latentdiff model folder, a diffusers SD folder or an SD single file
    rank: int = 8  # r of B A (kohya's network_dim)
    alpha: float = 8.0  # the update is scaled by alpha / rank (kohya's network_alpha)
    unet_targets: tuple[str, ...] = UNET_ATTENTION  # endings of diffusers module names, e.g. "to_q", "conv1"
    text_encoder: bool = False  # also adapt the CLIP text encoder
    text_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")  # endings of transformers' names
    caption_dropout: float = 0.0  # share of captions replaced by "" (keeps the unconditional branch in step)
    guidance: float | None = None  # preview grids' guidance; null: the base model's
    config: str | None = None  # single-file base: its config (as `sample --config`)
    tokenizer: str | None = None  # single-file base: a tokenizer folder (as `sample --tokenizer`)
    prediction: str | None = None  # single-file base: eps or v, if the file's own guess is wrong

    def __post_init__(self) -> None:
        self.unet_targets, self.text_targets = tuple(self.unet_targets), tuple(self.text_targets)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"lora.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not self.unet_targets and not (self.text_encoder and self.text_targets):
            raise UserError("lora: nothing to adapt (lora.unet_targets is empty and lora.text_encoder is false)")


@dataclass
class LoraRunConfig:
    """A LoRA run: the images (data), the adapter (lora) and the optimisation (train); saved as config.yaml."""

    model: str = "lora"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not self.lora.base:
            raise UserError("lora.base: give the model to adapt (latentdiff train lora BASE_MODEL data.source=FOLDER)")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), for YAML and JSON."""
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "LoraRunConfig":
        """Build from a nested dict, checking every key and type; errors name the key."""
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(d) - set(hints))
        if unknown:
            raise UserError(f"{where}: unknown section(s) {', '.join(map(str, unknown))} for a LoRA run; "
                            f"known: {', '.join(hints)}")
        model = check_type(d.get("model", "lora"), str, "model")
        return cls(model=model, **{k: build_dataclass(hints[k], d.get(k) or {}, k) for k in hints if k != "model"})
