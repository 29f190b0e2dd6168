"""Tokenizers: CLIP ids identical to transformers, a trained BPE, the shared call interface, folders."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch

import latentdiff.models
from latentdiff.errors import UserError
from latentdiff.models import tokenizer as tokmod
from latentdiff.models.tokenizer import CLIPTokenizer, TrainedTokenizer, load_tokenizer

BOS, EOS = 49406, 49407
LONG = "a highly detailed matte painting of a castle on a hill at sunset, " * 6
STRINGS = [
    # plain prompts
    "a photo of a cat", "an astronaut riding a horse on mars", "a painting of a fox in the style of van gogh",
    "portrait of a woman, oil on canvas, trending on artstation", "cyberpunk city at night, neon lights, rain",
    "a bowl of fruit on a wooden table", "watercolor", "the quick brown fox jumps over the lazy dog",
    # upper case
    "A PHOTO OF A CAT", "Photo Of A Dog", "NASA's Rover On MARS", "iPhone McDonald's",
    # punctuation
    "hello, world!", "wait... what?!", "(masterpiece:1.2), [bad hands], {fantasy}", "a/b\\c|d", "--ar 16:9",
    "#hashtag @user", "\"quoted\" 'single'", "x_y-z+w=v", "~!@#$%^&*()", "<tag> </w> <|endofline|>",
    # numbers
    "1024x768", "3.14159", "year 2023", "١٢٣ and ৪৫৬", "1,000,000 stars", "½ ¾ ²", "Ⅻ ① ⑩",
    # contractions
    "it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S DON'T", "rock'n'roll", "'s 't 're",
    # whitespace
    "a  photo   of", "tab\tseparated\ttext", "new\nline\r\nwindows", "  leading and trailing  ", "a\u3000b\u00a0c",
    # accents and Unicode normal forms
    "café", "naïve", "cafe\u0301", "Ångström", "crème brûlée", "ΟΔΟΣ ΣΑΣ", "İstanbul", "straße", "Ｆｕｌｌｗｉｄｔｈ",
    # scripts
    "東京タワーの夜景", "一只猫", "한국어 문장", "مرحبا بالعالم", "שלום עולם", "Привет мир", "नमस्ते दुनिया", "ไทย",
    # emoji: plain, skin tones, ZWJ sequences, flags, variation selectors
    "😀", "a cat 🐱 on a mat", "👍🏽👍🏿", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵", "❤️", "🧑🏻‍🚀 astronaut",
    # HTML entities stay literal in transformers (no unescaping)
    "fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt;", "&#39;quote&#39;",
    # control and format characters
    "a\x00b", "zero\u200bwidth", "bom\ufeffhere", "soft\u00adhyphen",
    # special tokens written in the prompt (matched case-sensitively, as transformers does)
    "x<|endoftext|>y", "<|startoftext|> a cat", "x <|ENDOFTEXT|> y",
    # long, empty, only whitespace
    LONG, "word " * 200, "", " ", "\t\n  \r\n",
]


def _open_clip_bpe() -> Path:
    """The merges file latentdiff ships, checked to be OpenAI's byte for byte (the hash of clip/ in OpenAI's repo)."""
    path = Path(latentdiff.models.__file__).parent / "clip_vocab" / "bpe_simple_vocab_16e6.txt.gz"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    return path


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """vocab.json + merges.txt built from open_clip's file by CLIP's recipe, written independently of our code."""
    lines = gzip.open(_open_clip_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    tokens = chars + [c + "</w>" for c in chars] + [line.replace(" ", "") for line in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def clip(clip_folder) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(clip_folder)


@pytest.fixture(scope="module")
def hf_clip(clip_folder):
    transformers = pytest.importorskip("transformers")
    # the tokenizers-backed class: transformers 5 has only that one (CLIPTokenizerFast is an alias of
    # CLIPTokenizer); 4.x's slow Python CLIPTokenizer differs without ftfy (splits CJK, drops format characters)
    return getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer).from_pretrained(str(clip_folder))


def test_string_set_is_broad():
    assert len(STRINGS) >= 60 and len(set(STRINGS)) == len(STRINGS)


def test_bpe_file_builds_the_same_vocabulary_as_the_folder(clip, clip_folder):
    ours = CLIPTokenizer.from_bpe_file(_open_clip_bpe())
    assert ours.vocab_size == 49408 and (ours.bos_id, ours.eos_id, ours.pad_id) == (BOS, EOS, EOS)
    assert ours._vocab == json.loads((clip_folder / "vocab.json").read_text(encoding="utf-8"))
    assert ours._merges == clip._merges and len(ours._merges) == 48894


def test_known_stable_diffusion_ids(clip):
    assert clip.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert clip(["a photo of a cat"])[0, :8].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS, EOS]


def test_encode_matches_transformers_on_every_string(clip, hf_clip):
    want = hf_clip(STRINGS, add_special_tokens=False)["input_ids"]
    diff = [(s, w, clip.encode(s)) for s, w in zip(STRINGS, want) if clip.encode(s) != w]
    assert not diff, f"{len(diff)} strings differ from transformers, first: {diff[0]}"


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_call_matches_transformers_padded_and_truncated(clip_folder, hf_clip, pad):
    hf_clip.pad_token, old = pad, hf_clip.pad_token
    ours = CLIPTokenizer.from_folder(clip_folder, pad_token=pad)
    want = hf_clip(STRINGS, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    with pytest.warns(UserWarning):
        got = ours(STRINGS)
    assert got.dtype == torch.long and got.shape == (len(STRINGS), 77)
    hf_clip.pad_token = old
    bad = [s for s, g, w in zip(STRINGS, got, want) if not torch.equal(g, w)]
    assert not bad, f"{len(bad)} rows differ from transformers, first: {bad[0]!r}"


def test_sampled_code_points_match_transformers(clip, hf_clip):
    # every 97th code point, alone and inside a word; skipped: those Python's own Unicode tables call unassigned
    # (newer letters: the regex module, Python's str.lower and the Rust tokenizers disagree on them)
    texts = [f"a{chr(c)}b {chr(c)}" for c in range(0x20, 0x110000, 97) if unicodedata.category(chr(c)) not in "CnCs"]
    want = hf_clip(texts, add_special_tokens=False)["input_ids"]
    bad = [(hex(ord(t[1])), t) for t, w in zip(texts, want) if clip.encode(t) != w]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]}"


def test_long_prompt_is_truncated_with_one_warning(clip):
    full = clip.encode(LONG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = clip([LONG, "a cat"])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"dropped {len(full) - 75} tokens" in message and LONG[:30] in message and LONG not in message
    assert ids[0].tolist() == [BOS, *full[:75], EOS]
    assert ids[1, :4].tolist() == [BOS, *clip.encode("a cat"), EOS]


def test_prompt_that_fits_exactly_does_not_warn(clip):
    text = " ".join(["cat"] * 75)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = clip([text])
    assert ids[0, -1].item() == EOS and ids[0, 1:76].tolist() == clip.encode(text)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_prompt_is_bos_eos_then_padding(clip_folder, text):
    assert CLIPTokenizer.from_folder(clip_folder)([text])[0].tolist() == [BOS, EOS] + [EOS] * 75
    v2 = CLIPTokenizer.from_folder(clip_folder, pad_token="!")
    assert v2.pad_id == 0 and v2([text])[0].tolist() == [BOS, EOS] + [0] * 75


def test_pad_and_context_length_options(clip_folder):
    tok = CLIPTokenizer.from_folder(clip_folder, context_length=8, pad_token=0)
    assert tok.context_length == 8 and tok(["a cat"]).tolist() == [[BOS, 320, 2368, EOS, 0, 0, 0, 0]]
    assert tok("a cat").shape == (1, 8)  # a bare string is one prompt
    assert tok([]).shape == (0, 8)
    with pytest.raises(UserError, match="pad token '<pad>'"):
        CLIPTokenizer.from_folder(clip_folder, pad_token="<pad>")
    with pytest.raises(UserError, match="pad id 50000"):
        CLIPTokenizer.from_folder(clip_folder, pad_token=50000)
    with pytest.raises(UserError, match="context_length"):
        CLIPTokenizer.from_folder(clip_folder, context_length=1)
    with pytest.raises(UserError, match="prompt 1 is a int"):
        tok(["a cat", 3])


def test_decode_inverts_encode(clip):
    assert clip.decode(clip.encode("A photo of a  cat")) == "a photo of a cat"
    assert clip.decode(clip.encode("café naïve 東京 😀")) == "café naïve 東京 😀"
    assert clip.decode(clip.encode("it's 3.14!")) == "it 's 3 . 1 4 !"  # every word piece ends with a space
    assert clip.decode(clip(["Hello  World"])[0]) == "hello world"  # bos, eos and padding dropped
    with pytest.raises(UserError, match="token id 60000"):
        clip.decode([60000])


def test_save_round_trips_and_transformers_reads_it(clip_folder, tmp_path):
    tok = CLIPTokenizer.from_folder(clip_folder, context_length=64, pad_token="!")
    tok.save(tmp_path)
    back = CLIPTokenizer.from_folder(tmp_path)
    assert (back.context_length, back.pad_id, back._vocab, back._merges) == (64, 0, tok._vocab, tok._merges)
    assert torch.equal(back(STRINGS[:20]), tok(STRINGS[:20]))
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    assert (hf.pad_token_id, hf.model_max_length) == (0, 64)
    texts = [s for s in STRINGS if "!" not in s]
    assert hf(texts, add_special_tokens=False)["input_ids"] == [tok.encode(s) for s in texts]
    # known difference: transformers loads pad "!" as a special token and so splits every "!" in a prompt off
    # as id 0 (diffusers#4153); we keep open_clip's ids, with which SD v2 was trained: "!" at a word end is 256
    assert tok.encode("wow!") == [2781, 256] and hf("wow!", add_special_tokens=False)["input_ids"] == [2781, 0]


def test_from_folder_reads_diffusers_configs(clip_folder, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((clip_folder / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}}))
    tok = CLIPTokenizer.from_folder(tmp_path)
    assert (tok.pad_id, tok.context_length) == (0, 77)


def test_from_folder_names_missing_files(clip_folder, tmp_path):
    (tmp_path / "vocab.json").write_bytes((clip_folder / "vocab.json").read_bytes())
    with pytest.raises(UserError, match="missing merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(UserError, match="missing vocab.json and merges.txt"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    with pytest.raises(UserError, match="file not found"):
        CLIPTokenizer.from_bpe_file(tmp_path / "bpe.txt.gz")
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(UserError, match="not a CLIP byte-level vocabulary"):
        CLIPTokenizer.from_folder(tmp_path)


def test_default_uses_the_shipped_vocabulary_without_open_clip(monkeypatch):
    """The vocabulary ships with latentdiff: no open-clip-torch needed (its import is made to fail here)."""
    _open_clip_bpe()
    monkeypatch.setitem(sys.modules, "open_clip", None)
    assert CLIPTokenizer.default().encode("a cat") == [320, 2368]
    monkeypatch.setattr(tokmod, "OPEN_CLIP_BPE", "gone.txt.gz")
    with pytest.raises(UserError, match="gone.txt.gz is missing from this installation.*--tokenizer"):
        CLIPTokenizer.default()


CAPTIONS = [f"a {c} {a} on a {p}." for c in ("red", "blue", "green", "small", "big")
            for a in ("cat", "dog", "bird", "car") for p in ("table", "hill", "road")]


@pytest.fixture(scope="module")
def trained() -> TrainedTokenizer:
    return TrainedTokenizer.train(CAPTIONS, vocab_size=60, context_length=12)


def test_trained_tokenizer_call_interface(trained):
    ids = trained(["a red cat on a hill.", ""])
    assert ids.shape == (2, 12) and ids.dtype == torch.long
    n = len(trained.encode("a red cat on a hill."))
    assert ids[0, 0] == trained.bos_id and ids[0, n + 1] == trained.eos_id and (ids[0, n + 2:] == trained.pad_id).all()
    assert ids[1, :3].tolist() == [trained.bos_id, trained.eos_id, trained.pad_id]
    assert 4 < trained.vocab_size <= 60 and len({trained.bos_id, trained.eos_id, trained.pad_id}) == 3
    assert trained.encode("A RED Cat") == trained.encode("a red cat")  # lower-cased
    assert trained.encode("cat..") == trained.encode("cat") + trained.encode(".") * 2  # each mark on its own
    assert trained.decode(ids[0]) == "a red cat on a hill ."


def test_trained_tokenizer_unknown_characters_become_unk(trained):
    unk = trained._tok.token_to_id("<unk>")
    word_start = trained._tok.token_to_id("▁")
    assert trained.encode("x") == [word_start, unk] and trained.encode("xq") == [word_start, unk, unk]
    assert trained.encode("cat 🐱")[-1] == unk and unk not in trained.encode("a red cat")


def test_trained_tokenizer_truncation_warns_once(trained):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = trained(["a red cat on a hill. " * 5])
    assert len(caught) == 1 and "dropped" in str(caught[0].message)
    assert ids[0, -1] == trained.eos_id


def test_trained_tokenizer_is_deterministic_across_processes(trained, tmp_path):
    again = TrainedTokenizer.train(CAPTIONS, vocab_size=60, context_length=12)
    assert again._tok.to_str() == trained._tok.to_str()
    code = ("import sys, json; from latentdiff.models.tokenizer import TrainedTokenizer as T; "
            "c = json.loads(sys.argv[1]); print(T.train(c, vocab_size=60).encode(' '.join(c)))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(CAPTIONS)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    assert out.strip() == str(trained.encode(" ".join(CAPTIONS)))


def test_trained_tokenizer_save_load_and_load_tokenizer(trained, clip_folder, tmp_path):
    trained.save(tmp_path / "t")
    back = load_tokenizer(tmp_path / "t")
    assert isinstance(back, TrainedTokenizer) and back.context_length == 12
    assert torch.equal(back(CAPTIONS), trained(CAPTIONS))
    assert isinstance(load_tokenizer(clip_folder), CLIPTokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="vocab.json \\+ merges.txt .*tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="not a tokenizers file"):
        load_tokenizer(tmp_path / "bad")


@pytest.mark.parametrize("captions, size, match", [([], 100, "non-empty"), ("a cat", 100, "non-empty"),
                                                   (["a", 3], 100, "strings"), (["a cat"], 3, "at least 5")])
def test_trained_tokenizer_rejects_bad_input(captions, size, match):
    with pytest.raises(UserError, match=match):
        TrainedTokenizer.train(captions, vocab_size=size)
