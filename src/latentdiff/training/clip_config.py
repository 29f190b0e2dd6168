"""The ``clip`` section of a run config: sizes of the two towers, the tokenizer, and how captions are made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from latentdiff.errors import UserError
from latentdiff.formats.dataclass_io import ConfigMixin
from latentdiff.models.clip import ACTIVATIONS, CLIPTextConfig, CLIPVisionConfig


@dataclass
class CLIPTrainConfig(ConfigMixin):
    """What `model: clip` trains; the image size and channels come from the data section."""

    section: ClassVar[str] = "clip"

    vocab_size: int = 1000  # at most this many tokens in the BPE trained on the captions (fewer if they run out)
    context_length: int = 32  # tokens per caption including start and end (SD uses 77; captions here are short)
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_act: str = "quick_gelu"  # quick_gelu (OpenAI CLIP, SD v1) or gelu
    patch_size: int = 4  # ViT patch side; data.image_size must be divisible by it
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    embed_dim: int = 128  # the joint embedding both towers project to
    caption_template: str | None = None  # e.g. "a photo of a {}": captions from class names for labelled data

    def __post_init__(self) -> None:
        if self.text_act not in ACTIVATIONS:
            raise UserError(f"clip.text_act: unknown value {self.text_act!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.caption_template is not None and self.caption_template.count("{}") != 1:
            raise UserError(f"clip.caption_template must hold one {{}} for the class name, got "
                            f"{self.caption_template!r}")
        if self.context_length < 3:
            raise UserError(f"clip.context_length must be >= 3 (start, a token, end), got {self.context_length}")

    def text_config(self, vocab_size: int, eos_id: int) -> CLIPTextConfig:
        """The text tower for a trained tokenizer of ``vocab_size`` ids."""
        return CLIPTextConfig(vocab_size=vocab_size, context_length=self.context_length, width=self.text_width,
                              layers=self.text_layers, heads=self.text_heads, act=self.text_act,
                              projection_dim=self.embed_dim, eos_id=eos_id)

    def vision_config(self, image_size: int, channels: int) -> CLIPVisionConfig:
        """The image tower for the data's image size and channels."""
        return CLIPVisionConfig(image_size=image_size, channels=channels, patch_size=self.patch_size,
                                width=self.vision_width, layers=self.vision_layers, heads=self.vision_heads)
