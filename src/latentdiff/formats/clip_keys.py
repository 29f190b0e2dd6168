"""transformers ``CLIPTextModel`` keys -> ``models.clip.CLIPTextTransformer`` keys.

Accepts the bare keys of transformers 5 (``embeddings.token_embedding.weight``), the prefixed keys of
older files (``text_model.embeddings...``) and SD v1 single-file checkpoints
(``cond_stage_model.transformer.text_model...``). Anything not recognised, or a layer with a missing
tensor, is a UserError that names the keys.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from latentdiff.errors import UserError
from latentdiff.formats.sd_configs import KeyTable, check_config_keys

_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "position_embedding.weight",
    "final_layer_norm.weight": "final_norm.weight",
    "final_layer_norm.bias": "final_norm.bias",
}
_LAYER = {  # inside encoder.layers.N.
    "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
    "self_attn.out_proj": "attn.out", "layer_norm1": "norm1", "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_IGNORED = ("embeddings.position_ids",)  # a non-persistent buffer that older files still carry


def _strip_prefix(key: str) -> str:
    i = key.find("text_model.")
    return key[i + len("text_model."):] if i >= 0 else key


def clip_text_from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers CLIPTextModel state dict to CLIPTextTransformer's keys (tensors unchanged)."""
    out: dict[str, torch.Tensor] = {}
    unexpected, layers = [], set()
    for key, value in state_dict.items():
        k = _strip_prefix(key)
        if k in _IGNORED:
            continue
        if k in _FIXED:
            out[_FIXED[k]] = value
            continue
        m = _LAYER_RE.fullmatch(k)
        if m and m.group(2) in _LAYER:
            layers.add(int(m.group(1)))
            out[f"blocks.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"] = value
        else:
            unexpected.append(key)
    if unexpected:
        hint = " (a projection belongs to CLIPModel, not the text encoder)" if any(
            "projection" in k for k in unexpected) else ""
        raise UserError(f"CLIP text state dict: {len(unexpected)} unexpected key(s), e.g. "
                        f"{', '.join(sorted(unexpected)[:3])}{hint}")
    expected = set(_FIXED.values()) | {f"blocks.{n}.{name}.{p}" for n in range(len(layers))
                                        for name in _LAYER.values() for p in ("weight", "bias")}
    missing = sorted(expected - set(out))
    if missing or layers != set(range(len(layers))):
        raise UserError(f"CLIP text state dict: {len(missing)} missing tensor(s), e.g. {', '.join(missing[:3])}"
                        f" (layers found: {sorted(layers)})")
    return out


# Every key of transformers' CLIPTextConfig, as formats/sd_configs.py's tables: honoured, accepted at SD's
# value only, or accepted because it cannot change the text tower's hidden states.
CLIP_TEXT_KEYS: KeyTable = {
    "vocab_size": ("read", (), "clip.text.vocab_size"),
    "hidden_size": ("read", (), "clip.text.width (the UNet's context_dim)"),
    "intermediate_size": ("read", (), "clip.text.intermediate_size"),
    "projection_dim": ("read", (), "clip.text.projection_dim (the pooled projection; SD does not use it)"),
    "num_hidden_layers": ("read", (), "clip.text.layers"),
    "num_attention_heads": ("read", (), "clip.text.heads"),
    "max_position_embeddings": ("read", (), "clip.text.context_length (77)"),
    "hidden_act": ("only", ("quick_gelu", "gelu"), "clip.text.act"),
    "layer_norm_eps": ("read", (), "clip.text.layer_norm_eps"),
    "attention_dropout": ("only", (0, 0.0), "training-time dropout; latentdiff's text tower has none"),
    "dropout": ("only", (0, 0.0), "training-time dropout; latentdiff's text tower has none"),
    "initializer_range": ("inert", (), "initialisation only"),
    "initializer_factor": ("inert", (), "initialisation only"),
    "eos_token_id": ("read", (), "clip.text.eos_id, where the pooled output is read (2: the largest id)"),
    "bos_token_id": ("inert", (), "the tokenizer folder sets the ids"),
    "pad_token_id": ("inert", (), "the tokenizer folder sets the ids"),
    "architectures": ("only", ("CLIPTextModel", None), "a text tower without projection"),
    "model_type": ("only", ("clip_text_model",), "a CLIP text tower"),
    "pruned_heads": ("only", ({},), "all heads present"),
    "is_encoder_decoder": ("only", (False,), "an encoder"),
    "is_decoder": ("only", (False,), "an encoder"),
    "add_cross_attention": ("only", (False,), "no cross-attention in the text tower"),
}
# transformers' generic PretrainedConfig settings (generation, task heads, output flags, dtype, versions):
# none of them changes the text tower's hidden states
CLIP_GENERIC_KEYS = (
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "torch_dtype", "dtype", "use_bfloat16",
    "tf_legacy_loss", "tie_word_embeddings", "chunk_size_feed_forward", "cross_attention_hidden_size",
    "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "transformers_version",
    "gradient_checkpointing", "use_cache")
CLIP_KEYS_ALL: KeyTable = CLIP_TEXT_KEYS | {k: ("inert", (), "transformers' generic settings") for k in CLIP_GENERIC_KEYS}


def clip_text_config_from_hf(config: dict[str, Any], where: str = "text_encoder/config.json") -> dict[str, Any]:
    """A transformers CLIPTextConfig dict (config.json) as keyword arguments of our CLIPTextConfig (every key checked)."""
    check_config_keys(config, CLIP_KEYS_ALL, where)
    try:
        eos = config.get("eos_token_id", 2)
        return {"vocab_size": config["vocab_size"], "context_length": config["max_position_embeddings"],
                "width": config["hidden_size"], "layers": config["num_hidden_layers"],
                "heads": config["num_attention_heads"], "intermediate_size": config["intermediate_size"],
                "act": config.get("hidden_act", "quick_gelu"), "layer_norm_eps": config.get("layer_norm_eps", 1e-5),
                "projection_dim": config.get("projection_dim", config["hidden_size"]),
                # transformers pools at argmax(ids) when eos_token_id == 2 (the files written before its fix)
                "eos_id": None if eos == 2 else eos}
    except KeyError as e:
        raise UserError(f"{where}: missing key {e.args[0]!r}") from None


def clip_text_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextTransformer keys -> transformers CLIPTextModel keys (``text_model.`` prefix), the inverse map."""
    fixed = {v: k for k, v in _FIXED.items()}
    layer = {v: k for k, v in _LAYER.items()}
    out = {}
    for key, value in state_dict.items():
        if key in fixed:
            out["text_model." + fixed[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m or m.group(2) not in layer:
            raise UserError(f"CLIP text state dict: no transformers name for {key!r}")
        out[f"text_model.encoder.layers.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"] = value
    return out


def clip_text_config_to_hf(cfg: Any, tokenizer: Any) -> dict[str, Any]:
    """A transformers CLIPTextConfig dict (config.json) for our CLIPTextConfig and its tokenizer."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.width,
            "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "intermediate_size": cfg.mlp_width, "hidden_act": cfg.act, "layer_norm_eps": cfg.layer_norm_eps,
            "projection_dim": cfg.projection_dim, "bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id,
            # eos_token_id 2 is transformers' signal for "pool at the largest id", our eos_id None
            "eos_token_id": 2 if cfg.eos_id is None else cfg.eos_id}


def clip_text_key_map(keys: list[str]) -> dict[str, str]:
    """Our CLIPTextTransformer key -> transformers' (``text_model.``-prefixed) key, for each of ``keys``."""
    placeholder = torch.empty(0)
    return dict(zip(keys, clip_text_to_hf({k: placeholder for k in keys})))
