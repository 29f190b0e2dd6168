"""Tokenizers for text conditioning: prompt strings -> fixed-length id tensors for a text encoder.

Two implementations share one call interface (`Tokenizer`):
- `CLIPTokenizer`: Stable Diffusion's byte-level BPE (OpenAI CLIP vocabulary, 49408 entries), written
  here and checked id-for-id against the installed `transformers.CLIPTokenizer` (what diffusers uses).
- `TrainedTokenizer`: a small BPE trained with the `tokenizers` library on your own captions.
`load_tokenizer(folder)` picks one from the files a model folder carries.
"""

from __future__ import annotations

import gzip
import unicodedata
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import regex
import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import atomic_write, load_json, load_json_object, save_json

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
OPEN_CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges: 256 bytes * 2 + merges + 2 specials = 49408 ids
_SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")  # matched case-sensitively in raw text
# CLIP's word pattern, minus its special-token alternatives (those are split off before normalising)
_WORD = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""")
_SPACES = regex.compile(r"\s+")


class Tokenizer(ABC):
    """Text -> LongTensor (B, context_length) = [bos, tokens..., eos, pad...]; shared by all tokenizers."""

    def __init__(self, context_length: int, bos_id: int, eos_id: int, pad_id: int, vocab_size: int) -> None:
        if not isinstance(context_length, int) or context_length < 2:
            raise UserError(f"context_length must be an integer >= 2 (room for bos and eos), got {context_length!r}")
        self._context_length, self._bos, self._eos, self._pad, self._size = (
            context_length, bos_id, eos_id, pad_id, vocab_size)

    @property
    def context_length(self) -> int:
        """Length of every row that `__call__` returns."""
        return self._context_length

    @property
    def bos_id(self) -> int:
        """Id put first in every row."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """Id put after the last text token."""
        return self._eos

    @property
    def pad_id(self) -> int:
        """Id that fills a row after eos."""
        return self._pad

    @property
    def vocab_size(self) -> int:
        """Number of ids (the text encoder's embedding rows)."""
        return self._size

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without bos/eos/padding."""

    @abstractmethod
    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids; special tokens and the padding after eos are dropped."""

    @abstractmethod
    def save(self, folder: Path | str) -> None:
        """Write the files `load_tokenizer(folder)` reads back."""

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Tokenize a batch of prompts to (B, context_length) ids; one warning lists truncated prompts."""
        if isinstance(texts, str):  # a bare string is one prompt, not a batch of characters
            texts = [texts]
        n = self.context_length - 2
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        dropped = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserError(f"prompt {i} is a {type(text).__name__}, expected a string")
            ids = self.encode(text)
            if len(ids) > n:
                dropped.append(f"{_shorten(text)!r} (dropped {len(ids) - n} tokens)")
            row = [self.bos_id, *ids[:n], self.eos_id]
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        if dropped:
            warnings.warn(f"prompt longer than {self.context_length} tokens, truncated: {'; '.join(dropped)}",
                          stacklevel=2)
        return out

    def _strip_row(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        """Ids without bos/eos; for a row from `__call__` (starts with bos), nothing after its eos."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.bos_id and self.eos_id in ids[1:]:
            ids = ids[:ids.index(self.eos_id, 1)]
        return [i for i in ids if i not in (self.bos_id, self.eos_id)]


def _shorten(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable character map (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


class CLIPTokenizer(Tokenizer):
    """Stable Diffusion's CLIP byte-level BPE tokenizer (ids identical to transformers.CLIPTokenizer)."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], context_length: int = 77,
                 pad_token: str | int = EOS) -> None:
        self._byte_char = _bytes_to_unicode()
        chars = self._byte_char.values()
        missing = [t for t in (BOS, EOS, *chars, *(c + "</w>" for c in chars)) if t not in vocab]
        if missing:
            raise UserError(f"not a CLIP byte-level vocabulary: {len(missing)} tokens missing, e.g. {missing[0]!r}")
        self._vocab = dict(vocab)
        self._tokens = {i: t for t, i in vocab.items()}
        self._merges = [tuple(m) for m in merges]
        self._ranks = {m: r for r, m in enumerate(self._merges)}
        self._char_byte = {c: b for b, c in self._byte_char.items()}
        self._cache: dict[str, list[int]] = {}
        if isinstance(pad_token, int):
            if pad_token not in self._tokens:
                raise UserError(f"pad id {pad_token} is outside the vocabulary (0..{len(vocab) - 1})")
            pad_id = pad_token
        elif pad_token in vocab:
            pad_id = vocab[pad_token]
        else:
            raise UserError(f"pad token {pad_token!r} is not in the vocabulary (SD v1 uses {EOS!r}, SD v2 '!')")
        super().__init__(context_length, vocab[BOS], vocab[EOS], pad_id, len(vocab))

    @classmethod
    def from_folder(cls, path: Path | str, context_length: int | None = None,
                    pad_token: str | int | None = None) -> CLIPTokenizer:
        """Read a diffusers `tokenizer/` folder: vocab.json + merges.txt, or the tokenizers library's
        tokenizer.json (what transformers 5 writes); pad and length from its configs."""
        path = Path(path)
        missing = [f for f in ("vocab.json", "merges.txt") if not (path / f).is_file()]
        if missing and (path / "tokenizer.json").is_file():
            vocab, merges = _read_tokenizer_json(path / "tokenizer.json")
        elif missing:
            raise UserError(f"{path}: not a CLIP tokenizer folder, missing {' and '.join(missing)} "
                            "(or tokenizer.json)")
        else:
            vocab = load_json(path / "vocab.json")
            lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        if not isinstance(vocab, dict):
            raise UserError(f"{path}: the vocabulary must be a JSON object of token -> id")
        if any(len(m) != 2 for m in merges):
            raise UserError(f"{path}: every merge must be two space-separated symbols")
        pairs = [(a, b) for a, b in merges]
        settings = {}  # later files win, as in transformers: special_tokens_map.json over tokenizer_config.json
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (path / name).is_file():
                settings.update(load_json_object(path / name))
        pad = settings.get("pad_token", EOS)
        pad = pad["content"] if isinstance(pad, dict) else pad  # saved AddedToken form
        length = settings.get("model_max_length", 77)
        length = length if isinstance(length, int) and length < 100_000 else 77  # transformers' "no limit" is 1e30
        return cls(vocab, pairs, context_length or length, pad if pad_token is None else pad_token)

    @classmethod
    def from_bpe_file(cls, path: Path | str, context_length: int = 77, pad_token: str | int = EOS) -> CLIPTokenizer:
        """Build the vocabulary from open_clip's merges file exactly as CLIP does."""
        path = Path(path)
        try:
            lines = gzip.open(path).read().decode("utf-8").split("\n")
        except FileNotFoundError:
            raise UserError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise UserError(f"{path}: not a gzip BPE merges file ({e})") from None
        merges = [tuple(line.split()) for line in lines[1:_N_MERGES + 1]]  # line 0 is a header
        if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
            raise UserError(f"{path}: expected {_N_MERGES} merge lines of two symbols each")
        pairs = [(a, b) for a, b in merges]
        chars = list(_bytes_to_unicode().values())
        tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), BOS, EOS]
        return cls({t: i for i, t in enumerate(tokens)}, pairs, context_length, pad_token)

    @classmethod
    def default(cls, context_length: int = 77, pad_token: str | int = EOS) -> CLIPTokenizer:
        """The CLIP tokenizer from the merges file that ships with latentdiff (OpenAI's, MIT licence)."""
        path = resources.files("latentdiff.models") / "clip_vocab" / OPEN_CLIP_BPE  # one name per step on 3.10
        with resources.as_file(path) as file:
            if not file.is_file():
                raise UserError(f"{file} is missing from this installation of latentdiff; reinstall it, or give "
                                "a tokenizer folder (vocab.json + merges.txt) with --tokenizer")
            return cls.from_bpe_file(file, context_length, pad_token)

    def save(self, folder: Path | str) -> None:
        """Write vocab.json, merges.txt and tokenizer_config.json (loadable by transformers too)."""
        folder = Path(folder)
        save_json(self._vocab, folder / "vocab.json")
        text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges)
        atomic_write(folder / "merges.txt", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        save_json({"tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length,
                   "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                   "pad_token": self._tokens[self.pad_id]}, folder / "tokenizer_config.json")

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without bos/eos; literal <|startoftext|>/<|endoftext|> map to their ids."""
        ids: list[int] = []
        for part in _SPECIAL.split(text):
            if part in (BOS, EOS):
                ids.append(self._vocab[part])
                continue
            # transformers' normaliser: NFC, whitespace runs -> one space, lower case one character at a time
            # (so a word-final capital sigma becomes σ, not ς as str.lower() would make it)
            part = _SPACES.sub(" ", unicodedata.normalize("NFC", part)).replace("Σ", "σ").lower()
            for word in _WORD.findall(part):
                ids.extend(self._bpe("".join(self._byte_char[b] for b in word.encode("utf-8"))))
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Merge a word's byte characters by merge rank, lowest first (the last symbol carries '</w>')."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self._ranks.get(p, len(self._ranks)))
            if pair not in self._ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self._vocab.get(s, self.eos_id) for s in symbols]  # unknown -> eos, as transformers' unk_token
        if len(self._cache) > 50_000:  # bounded: a long-running server sees endless new words
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids (words separated by spaces); bos, eos and padding after eos are dropped."""
        data = bytearray()
        for i in self._strip_row(ids):
            if i not in self._tokens:
                raise UserError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            token = self._tokens[i]
            end = token.endswith("</w>")
            data.extend(self._char_byte[c] for c in (token[:-4] if end else token))
            data.extend(b" " if end else b"")
        return data.decode("utf-8", errors="replace").strip()


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, ...]]]:
    """Vocabulary (with the added special tokens) and merges of a tokenizers-library BPE file."""
    data = load_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{path}: not a BPE tokenizer.json (model.type must be 'BPE' with a vocab)")
    vocab = dict(model["vocab"]) | {t["content"]: t["id"] for t in data.get("added_tokens", [])
                                    if isinstance(t, dict) and "content" in t and "id" in t}
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return vocab, merges


class TrainedTokenizer(Tokenizer):
    """A small lower-cased BPE trained on your captions with the `tokenizers` library."""

    SPECIALS = ("<bos>", "<eos>", "<pad>", "<unk>")

    def __init__(self, tokenizer: tokenizers.Tokenizer, context_length: int = 77) -> None:
        ids = []
        for token in self.SPECIALS:
            i = tokenizer.token_to_id(token)
            if i is None:
                raise UserError(f"not a latentdiff trained tokenizer: missing {token}")
            ids.append(i)
        self._tok = tokenizer
        super().__init__(context_length, ids[0], ids[1], ids[2], tokenizer.get_vocab_size())

    @classmethod
    def train(cls, captions: Sequence[str], vocab_size: int = 1000, context_length: int = 77) -> TrainedTokenizer:
        """Train a BPE of at most `vocab_size` ids on the captions (same captions, same ids)."""
        if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
            raise UserError("captions must be a non-empty list of strings")
        if vocab_size < len(cls.SPECIALS) + 1:
            raise UserError(f"vocab_size must be at least {len(cls.SPECIALS) + 1}, got {vocab_size}")
        tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        # words, then each punctuation mark on its own ("red," -> "red", ","), each marked "▁" at its start.
        # A start marker, not CLIP's "</w>" suffix: the trainer numbers suffixed symbols in hash-map order,
        # so ids (and tied merges) would change from run to run; "▁" is one more sorted alphabet character.
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(),
                                                     pre_tokenizers.Metaspace(prepend_scheme="always", split=False)])
        tok.decoder = decoders.Metaspace(prepend_scheme="always", split=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(cls.SPECIALS), show_progress=False)
        tok.train_from_iterator(captions, trainer=trainer)
        return cls(tok, context_length)

    @classmethod
    def load(cls, folder: Path | str, context_length: int | None = None) -> TrainedTokenizer:
        """Read tokenizer.json (+ context length from tokenizer_config.json) written by `save`."""
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a plain Exception on bad files
            raise UserError(f"{path}: not a tokenizers file ({e})") from None
        config = Path(folder) / "tokenizer_config.json"
        length = load_json_object(config).get("model_max_length", 77) if config.is_file() else 77
        if not isinstance(length, int) or isinstance(length, bool):
            raise UserError(f"{config}: model_max_length: expected int, got {length!r:.60}")
        return cls(tok, context_length or length)

    def save(self, folder: Path | str) -> None:
        """Write tokenizer.json and tokenizer_config.json (the context length)."""
        folder = Path(folder)
        text = self._tok.to_str(pretty=True)
        atomic_write(folder / "tokenizer.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        save_json({"tokenizer_class": "TrainedTokenizer", "model_max_length": self.context_length},
                  folder / "tokenizer_config.json")

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without bos/eos; characters never seen in training become <unk>."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids; special tokens and padding are dropped."""
        return self._tok.decode(self._strip_row(ids), skip_special_tokens=True)


def load_tokenizer(folder: Path | str) -> Tokenizer:
    """The tokenizer saved in a folder: vocab.json + merges.txt -> CLIPTokenizer, tokenizer.json -> Trained."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: tokenizer folder not found")
    # CLIP first: a folder written by transformers may hold a tokenizer.json beside vocab.json + merges.txt
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_folder(folder)
    if (folder / "tokenizer.json").is_file():
        return TrainedTokenizer.load(folder)
    raise UserError(f"{folder}: no tokenizer found, looked for vocab.json + merges.txt (CLIP) or tokenizer.json")
