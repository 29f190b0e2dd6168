"""Colour emoji rendered from the Noto Color Emoji font, captioned with their Unicode names."""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from latentdiff.data.transforms import resize_and_crop
from latentdiff.errors import UserError

# Debian/Ubuntu (fonts-noto-color-emoji) first, then Fedora's google-noto-color-emoji-fonts.
FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",
)
FONT_SIZE = 109  # the only size of the font's CBDT bitmaps: FreeType refuses any other
# Blocks holding single-code-point emoji (copyright/registered, symbols and arrows, CJK marks, the
# 1F000-1FAFF emoji blocks); the font's private-use and ASCII keycap-base glyphs fall outside.
EMOJI_RANGES = ((0x00A9, 0x00AE), (0x203C, 0x3299), (0x1F000, 0x1FAFF))
# Joiners, variation selectors, tags, enclosing keycap, skin tones: they modify, not name, an emoji.
_MODIFIER_CATEGORIES = ("Mn", "Me", "Cf", "Sk")
_REGIONAL = range(0x1F1E6, 0x1F200)  # two of these make a flag; alone they are boxed letters
_TAGS = range(0xE0020, 0xE007F)  # subdivision flags spell their code in tag letters (gbeng)


def find_font(path: str | None = None) -> Path:
    """The emoji font file: `path` if given, else the first of the usual system locations."""
    for p in (path,) if path else FONT_PATHS:
        if Path(p).expanduser().is_file():
            return Path(p).expanduser()
    where = f"data.emoji_font {path!r}: no such file" if path else f"emoji font not found at {FONT_PATHS[0]}"
    raise UserError(f"{where}; install it with `apt-get install fonts-noto-color-emoji` or set data.emoji_font")


def emoji_caption(seq: str) -> str | None:
    """Lower-case Unicode name(s) of an emoji or emoji sequence; None if a code point has no name."""
    cps = [ord(c) for c in seq]
    if len(cps) == 2 and all(c in _REGIONAL for c in cps):
        return "flag " + "".join(chr(c - 0x1F1E6 + ord("a")) for c in cps)
    words, tag = [], ""
    for ch in seq:
        if ord(ch) in _TAGS:
            tag += chr(ord(ch) - 0xE0000)
        elif ch == "\u20e3":
            words.append("keycap")  # "digit one keycap" reads better than "combining enclosing keycap"
        elif unicodedata.category(ch) not in _MODIFIER_CATEGORIES:
            name = unicodedata.name(ch, "")
            if not name:  # newer than this Python's Unicode database
                return None
            words.append(name.lower())
    return " ".join(words + ([tag] if tag else [])) or None


@functools.lru_cache(maxsize=4)  # the cmap parse is ~50 ms; train and test splits share it
def emoji_list(font_path: Path) -> tuple[tuple[str, str], ...]:
    """(emoji, caption) for every single code point in EMOJI_RANGES the font has a glyph for, by code point."""
    try:
        from fontTools.ttLib import TTFont  # a dependency of matplotlib, so normally present
    except ImportError as e:
        raise UserError(f"data.source 'emoji' needs fontTools to read the font's cmap: pip install fonttools ({e})")
    try:
        with TTFont(font_path, lazy=True) as font:
            cmap = font.getBestCmap() or {}
    except Exception as e:  # fontTools raises many types on files that are not fonts
        raise UserError(f"{font_path}: cannot read the font's character map ({type(e).__name__}: {e})") from None
    out = []
    for cp in sorted(cmap):
        ch = chr(cp)
        if not any(lo <= cp <= hi for lo, hi in EMOJI_RANGES) or cp in _REGIONAL:
            continue
        if unicodedata.category(ch) in _MODIFIER_CATEGORIES:
            continue
        caption = emoji_caption(ch)
        if caption:
            out.append((ch, caption))
    if not out:
        raise UserError(f"{font_path}: no emoji glyphs in the font's character map (not a colour emoji font?)")
    return tuple(out)


def render_emoji(chars: list[str], font_path: Path, size: int,
                 background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Render each emoji centred on `background`, resized to size x size: uint8 (N, 3, size, size)."""
    try:
        font = ImageFont.truetype(str(font_path), FONT_SIZE)
    except OSError as e:
        raise UserError(f"{font_path}: cannot load as a colour emoji font at size {FONT_SIZE} ({e})") from None
    w, h = font.getbbox("\U0001F600")[2:]  # every glyph shares one bitmap box (136 x 128 for Noto)
    side = max(w, h)
    out = np.empty((len(chars), 3, size, size), np.uint8)
    for i, ch in enumerate(chars):
        glyph = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((0, 0), ch, font=font, embedded_color=True)
        canvas = Image.new("RGBA", (side, side), (*background, 255))
        # Square canvas with the glyph box centred: one scale for all, so relative sizes are kept.
        canvas.alpha_composite(glyph, ((side - w) // 2, (side - h) // 2))
        out[i] = np.asarray(resize_and_crop(canvas.convert("RGB"), size)).transpose(2, 0, 1)
    return out
