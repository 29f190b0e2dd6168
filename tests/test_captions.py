"""Tests for captioned data: metadata.jsonl and sidecar .txt folders, caption modes, the emoji source."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from latentdiff.data import DataConfig, load_dataset
from latentdiff.data import emoji
from latentdiff.data.source import in_test
from latentdiff.errors import UserError

FONT = next((Path(p) for p in emoji.FONT_PATHS if Path(p).is_file()), None)
needs_font = pytest.mark.skipif(FONT is None, reason="Noto Color Emoji absent: apt-get install fonts-noto-color-emoji")


def train_names(n: int, prefix: str = "", ext: str = ".png") -> list[str]:
    """n relative image paths that all fall in the train split (so every test sees every image)."""
    out, i = [], 0
    while len(out) < n:
        name = f"{prefix}img{i}{ext}"
        if not in_test(name):
            out.append(name)
        i += 1
    return out


def write_images(root: Path, names: list[str]) -> dict[str, int]:
    """One flat grey image per name, grey level 10 * (index + 1), so pixels say which file they are."""
    levels = {}
    for k, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        levels[name] = 10 * (k + 1)
        Image.new("L", (12, 10), levels[name]).save(root / name)
    return levels


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def load(root: Path, **kw) -> "object":
    return load_dataset(DataConfig(source=str(root), image_size=4, **kw))


def assert_aligned(d, levels: dict[str, int], caption_of: dict[str, str]) -> None:
    """Image k, file k and caption k all describe the same file."""
    assert d.captions is not None and len(d.captions) == len(d.files) == len(d)
    for k, f in enumerate(d.files):
        assert int(d.images[k, 0, 2, 2]) == levels[f]
        assert d.captions[k] == caption_of[f]


# ---------------------------------------------------------------------------------- folder formats


def test_metadata_jsonl_root_and_subfolder(tmp_path: Path) -> None:
    top, sub = train_names(4), train_names(3, "sub/")
    levels = write_images(tmp_path, top + sub)
    caption_of = {f: f"a grey square number {levels[f]}" for f in top + sub}
    # Root file lists its images out of order and names one in a sub-folder by its relative path;
    # the sub-folder's own metadata.jsonl names the rest relative to itself.
    rows = [{"file_name": f, "text": caption_of[f], "extra": 1} for f in reversed(top)]
    rows.append({"file_name": sub[0], "text": caption_of[sub[0]]})
    write_jsonl(tmp_path / "metadata.jsonl", rows)
    (tmp_path / "sub/metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f[4:], "text": "  " + caption_of[f] + " "}) for f in sub[1:]) + "\n\n"
    )
    d = load(tmp_path)
    assert sorted(d.files) == sorted(top + sub)
    assert_aligned(d, levels, caption_of)  # surrounding whitespace stripped


def test_sidecar_txt_with_bom_and_metadata_precedence(tmp_path: Path) -> None:
    names = train_names(3)
    levels = write_images(tmp_path, names)
    stem = [n.removesuffix(".png") for n in names]
    (tmp_path / f"{stem[0]}.txt").write_bytes("\ufeffcafé au lait\n".encode("utf-8"))  # utf-8-sig
    (tmp_path / f"{stem[1]}.txt").write_text("a red fox", encoding="utf-8")
    (tmp_path / f"{stem[2]}.txt").write_text("sidecar loses", encoding="utf-8")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": names[2], "text": "metadata wins"}])
    d = load(tmp_path)
    assert_aligned(d, levels, {names[0]: "café au lait", names[1]: "a red fox", names[2]: "metadata wins"})


def test_caption_column(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    names = train_names(2)
    levels = write_images(tmp_path, names)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": f, "caption": f"c{levels[f]}"} for f in names])
    d = load(tmp_path, caption_column="caption")
    assert_aligned(d, levels, {f: f"c{levels[f]}" for f in names})
    with caplog.at_level(logging.WARNING, logger="latentdiff.data"):
        assert load(tmp_path).captions is None  # "auto" with the default column: no captions, a warning
    assert "no 'text' key" in caplog.text and "data.caption_column" in caplog.text
    with pytest.raises(UserError, match=r"no 'text' key \(keys: caption, file_name\)"):
        load(tmp_path, captions="require")


# ------------------------------------------------------------------------------------ caption modes


def test_modes_auto_ignore_require(tmp_path: Path) -> None:
    names = train_names(8)
    write_images(tmp_path, names)
    assert load(tmp_path).captions is None  # auto, nothing captioned: unconditional data
    with pytest.raises(UserError, match=r"8 of 8 images have no caption \(data.captions='require'\)"):
        load(tmp_path, captions="require")
    (tmp_path / names[0].replace(".png", ".txt")).write_text("only one")
    with pytest.raises(UserError) as err:  # auto, some but not all: names 5 of the 7 and the count
        load(tmp_path)
    msg = str(err.value)
    assert "7 of 8 images have no caption (data.captions='auto' needs all or none, and 1 have one)" in msg
    assert "(and 2 more)" in msg
    assert all(n in msg for n in names[1:6]) and names[7] not in msg and "\n" not in msg
    (tmp_path / "metadata.jsonl").write_text("{not json\n")  # "ignore" reads no caption file at all
    d = load(tmp_path, captions="ignore")
    assert d.captions is None and len(d) == 8


def test_blank_caption_counts_as_missing(tmp_path: Path) -> None:
    names = train_names(2)
    write_images(tmp_path, names)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": names[0], "text": "a cat"},
                                              {"file_name": names[1], "text": " \t "}])
    with pytest.raises(UserError, match=re.escape(names[1])):
        load(tmp_path)
    (tmp_path / names[1].replace(".png", ".txt")).write_text("\n  \n")
    with pytest.raises(UserError, match=re.escape(names[1])):
        load(tmp_path)


def test_require_on_embedded_source_without_captions() -> None:
    with pytest.raises(UserError, match=r"data.captions='require' but data.source 'digits' has no captions"):
        load_dataset(DataConfig(source="digits", limit=4, captions="require"))


def test_corrupt_image_drops_its_caption(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    names = train_names(4)
    levels = write_images(tmp_path, names)
    (tmp_path / names[1]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    caption_of = {f: f"picture {levels[f]}" for f in names}
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": f, "text": caption_of[f]} for f in names])
    with caplog.at_level(logging.WARNING):
        d = load(tmp_path)
    assert d.files == [names[0], names[2], names[3]] and "skipped 1" in caplog.text
    assert_aligned(d, levels, caption_of)


# ------------------------------------------------------------------------------------ file errors


def test_caption_file_not_utf8(tmp_path: Path) -> None:
    names = train_names(1)
    write_images(tmp_path, names)
    txt = tmp_path / names[0].replace(".png", ".txt")
    txt.write_bytes(b"caf\xe9")  # Latin-1
    with pytest.raises(UserError, match=re.escape(f"{txt}:1: not valid UTF-8 at byte offset 3")):
        load(tmp_path)
    txt.unlink()
    meta = tmp_path / "metadata.jsonl"
    meta.write_bytes(b'{"file_name": "x.png", "text": "ok"}\n{"file_name": "' + b"\xff" + b'"}\n')
    with pytest.raises(UserError, match=re.escape(f"{meta}:2: not valid UTF-8 at byte offset 52")):
        load(tmp_path)


def test_malformed_json_line(tmp_path: Path) -> None:
    names = train_names(2)
    write_images(tmp_path, names)
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": names[0], "text": "a"}) + "\n" + '{"file_name": "x.png", "text": \n')
    with pytest.raises(UserError, match=re.escape(f"{meta}:2: malformed JSON")):
        load(tmp_path)
    meta.write_text('["file_name", "text"]\n')
    with pytest.raises(UserError, match=re.escape(f"{meta}:1: expected a JSON object with a 'file_name'")):
        load(tmp_path)
    meta.write_text(json.dumps({"file_name": names[0], "text": 3}) + "\n")
    with pytest.raises(UserError, match=re.escape(f"{meta}:1: 'text' must be a string, got int")):
        load(tmp_path)


def test_metadata_names_missing_files(tmp_path: Path) -> None:
    names = train_names(2, "sub/")
    write_images(tmp_path, names)
    write_jsonl(tmp_path / "sub/metadata.jsonl", [
        {"file_name": "img0.png", "text": "here"},
        {"file_name": "ghost.png", "text": "gone"},
        {"file_name": "../img0.png", "text": "outside its folder"},
    ])  # fmt: skip
    with pytest.raises(UserError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert "2 metadata line(s) name files that are not images in the folder" in msg
    assert "sub/metadata.jsonl:2 'ghost.png'" in msg and "sub/metadata.jsonl:3 '../img0.png'" in msg


def test_metadata_names_a_file_twice(tmp_path: Path) -> None:
    names = train_names(1, "sub/")
    write_images(tmp_path, names)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": names[0], "text": "one"}])
    write_jsonl(tmp_path / "sub/metadata.jsonl", [{"file_name": names[0][4:], "text": "two"}])
    with pytest.raises(UserError, match=r"named twice, at metadata.jsonl:1 and sub/metadata.jsonl:1"):
        load(tmp_path)


def test_caption_changes_fingerprint(tmp_path: Path) -> None:
    names = train_names(2)
    write_images(tmp_path, names)
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": f, "text": f"a {f}"} for f in names])
    a = load(tmp_path)
    assert load(tmp_path).fingerprint == a.fingerprint
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": f, "text": f"the {f}"} for f in names])
    b = load(tmp_path)
    assert b.fingerprint != a.fingerprint and b.images.equal(a.images)
    assert load(tmp_path, captions="ignore").fingerprint not in (a.fingerprint, b.fingerprint)


@pytest.mark.parametrize("key,value", [("captions", "maybe"), ("caption_column", ""),
                                       ("caption_column", "file_name"), ("emoji_font", 3)])
def test_config_validation(key: str, value: object) -> None:
    with pytest.raises(UserError, match=rf"data\.{key}: expected"):
        DataConfig(**{key: value})


# ------------------------------------------------------------------------------------------- emoji


def test_emoji_captions_of_sequences() -> None:
    assert emoji.emoji_caption("\U0001F600") == "grinning face"
    assert emoji.emoji_caption("\U0001F468\u200d\U0001F469\u200d\U0001F467") == "man woman girl"
    assert emoji.emoji_caption("1\ufe0f\u20e3") == "digit one keycap"
    assert emoji.emoji_caption("\U0001F44D\U0001F3FD") == "thumbs up sign"  # skin tone dropped
    assert emoji.emoji_caption("\U0001F1FA\U0001F1F8") == "flag us"
    assert emoji.emoji_caption("\U0001F3F4\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F") == (
        "waving black flag gbeng"
    )
    assert emoji.emoji_caption("\U000F0000") is None  # private use: no name


def test_emoji_missing_font(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"apt-get install fonts-noto-color-emoji.*data.emoji_font"):
        load_dataset(DataConfig(source="emoji", channels=3, emoji_font=str(tmp_path / "none.ttf")))
    with pytest.raises(UserError, match=r"data.channels=3"):
        load_dataset(DataConfig(source="emoji", channels=1))
    (tmp_path / "fake.ttf").write_bytes(b"not a font")
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "fake.ttf"))):
        load_dataset(DataConfig(source="emoji", channels=3, emoji_font=str(tmp_path / "fake.ttf")))


@needs_font
def test_emoji_source() -> None:
    cfg = DataConfig(source="emoji", channels=3, image_size=32, limit=24)
    d = load_dataset(cfg)
    assert d.images.shape == (24, 3, 32, 32) and d.labels is None
    assert len(d.captions) == 24 and all(c and c == c.lower() for c in d.captions)
    assert (d.images[:, 0].int() - d.images[:, 2].int()).abs().float().mean() > 5  # colour, not grey
    assert load_dataset(cfg).fingerprint == d.fingerprint  # deterministic
    test = load_dataset(DataConfig(source="emoji", channels=3, image_size=32, split="test", limit=24))
    assert not set(test.captions) & set(d.captions)
    plain = DataConfig(source="emoji", channels=3, image_size=8, limit=2, captions="ignore")
    assert load_dataset(plain).captions is None
    everything = dict((c, e) for e, c in emoji.emoji_list(FONT))
    assert len(everything) > 1000 and "grinning face" in everything and "red apple" in everything
    # The grinning face renders yellow (R, G high; B low) on a white background.
    face = emoji.render_emoji([everything["grinning face"]], FONT, 16)[0].astype(int)
    r, g, b = face[:, 8, 8]
    assert r > 200 and g > 150 and b < 100 and face[:, 0, 0].min() > 240
