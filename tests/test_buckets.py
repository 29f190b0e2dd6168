"""Aspect-ratio buckets: sizes within a pixel budget, the nearest bucket per image, one bucket per batch (resumable),
and a diffusion model trained on mixed aspects that samples at its trained sizes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from latentdiff.data import DataConfig, open_dataset
from latentdiff.data.buckets import assign_buckets, parse_buckets
from latentdiff.data.pack import pack_folder
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_json
from latentdiff.pipelines.generate import Pipeline
from latentdiff.training import make_trainer
from latentdiff.training.batches import Batches
from latentdiff.training.config import load_config

SIZES = "24x12,16x16,12x24"  # width x height; 288, 256 and 288 pixels


def test_auto_buckets_keep_the_pixel_budget_and_explicit_ones_parse():
    auto = parse_buckets("auto", 512, 64)
    assert (512, 512) in auto and all(h * w <= 512 * 512 and h % 64 == 0 == w % 64 for h, w in auto)
    assert (384, 640) in auto and (640, 384) in auto and len(auto) >= 7  # 5:3 both ways, 1:2 .. 2:1
    aspects = [w / h for h, w in auto]
    assert aspects == sorted(aspects) and 1 / 2.25 <= min(aspects) and max(aspects) <= 2.25  # 320x704: 2.2
    assert parse_buckets(SIZES, 16, 8) == [(24, 12), (16, 16), (12, 24)]  # (h, w), by aspect
    for bad in ("24by12", "0x12", ""):
        with pytest.raises(UserError, match="data.buckets"):
            parse_buckets(bad, 16, 8)
    with pytest.raises(UserError, match="data.bucket_step=64 is larger"):
        parse_buckets("auto", 32, 64)
    with pytest.raises(UserError, match="embedded set 'digits' is square"):
        DataConfig(source="digits", buckets="auto")


def test_images_go_to_the_nearest_aspect_and_small_buckets_merge():
    buckets = [(24, 12), (16, 16), (12, 24)]  # aspects 1/2, 1, 2
    w = np.array([10, 30, 40, 16, 17, 20, 20, 20])
    h = np.array([20, 31, 20, 16, 15, 11, 10, 9])
    assert assign_buckets(w, h, buckets, 1).tolist() == [0, 1, 2, 1, 1, 2, 2, 2]
    # bucket 0 holds one image, fewer than a batch of 2: it joins its nearest neighbour, the square one
    assert assign_buckets(w, h, buckets, 2).tolist() == [1, 1, 2, 1, 1, 2, 2, 2]
    assert assign_buckets(w, h, buckets, 100).tolist() == [2] * 8  # nothing fills a batch: all in one


def test_bucketed_batches_hold_one_bucket_cover_each_epoch_and_resume_exactly():
    groups = np.repeat([0, 1, 2], [13, 20, 7])
    b = Batches(40, 4, seed=5, groups=groups)
    first = [b.next() for _ in range(9)]  # 3 + 5 + 1 whole batches per epoch; the rest waits
    assert all(len(set(groups[x.numpy()])) == 1 for x in first)
    counts = np.bincount(groups[torch.cat(first).numpy()], minlength=3)
    assert counts.tolist() == [12, 20, 4] and len(set(torch.cat(first).tolist())) == 36
    assert [x.tolist() for x in b.upcoming()] == []  # the epoch is used up
    saved = {k: v.clone() for k, v in b.state().items()}
    later = [b.next() for _ in range(12)]
    again = Batches(40, 4, seed=5, groups=groups)
    again.load(saved)
    assert all(torch.equal(x, y) for x, y in zip(later, [again.next() for _ in range(12)]))
    mid = Batches(40, 4, seed=5, groups=groups)
    mid.next()
    assert all(torch.equal(x, y) for x, y in zip(mid.upcoming(), first[1:]))  # what the loader is told comes next
    plain = Batches(40, 4, seed=5)
    assert torch.equal(plain.next(), torch.randperm(40, generator=torch.Generator().manual_seed(5))[:4])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """36 captioned drawings, a third each tall, square and wide, packed into shards."""
    base = tmp_path_factory.mktemp("mixed")
    folder, lines = base / "folder", []
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(36):
        w, h = [(20, 40), (32, 32), (40, 20)][i % 3]
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 255, 3)))
        ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(255, 255, 255))
        img.save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": ["tall", "square", "wide"][i % 3]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    pack_folder(folder, base / "shards", 12)
    return base / "shards"


def test_a_model_trained_on_buckets_samples_at_its_trained_sizes(mixed, tmp_path):
    d = open_dataset(DataConfig(source=str(mixed), image_size=16, channels=3, buckets=SIZES, split="train"),
                     min_bucket=4)
    expect = {"tall": (24, 12), "square": (16, 16), "wide": (12, 24)}
    assert [d.size_of(i) for i in range(len(d))] == [expect[c] for c in d.captions]
    wide = [i for i, c in enumerate(d.captions) if c == "wide"][:2]
    assert d.batch(torch.tensor(wide)).shape == (2, 3, 12, 24)
    cfg = load_config("digits-tiny", [f"data.source={mixed}", "data.channels=3", f"data.buckets={SIZES}",
                                      "unet.in_channels=3", "unet.out_channels=3", "train.batch_size=4",
                                      "train.steps=4", "train.checkpoint_every=0", "train.grid_samples=2",
                                      "train.grid_steps=2", "data.hflip=true"])
    trainer = make_trainer(cfg, tmp_path, device="cpu", progress=False)
    shapes = []
    draw = trainer.draw
    trainer.draw = lambda: (lambda b: shapes.append(tuple(b["eps"].shape[-2:])) or b)(draw())
    trainer.run()
    assert set(shapes) <= {(24, 12), (16, 16), (12, 24)} and len(set(shapes)) >= 2  # batches of several sizes
    assert load_json(tmp_path / "model_index.json")["buckets"] == [[12, 24], [16, 16], [24, 12]]
    pipe = Pipeline.load(tmp_path)  # at a trained wide size: 24 wide, 12 high
    assert pipe.generate(n_samples=2, batch_size=2, steps=2, width=24, height=12).shape == (2, 3, 12, 24)
    with pytest.raises(UserError, match="data.buckets: 12x24, 24x12 must have sides divisible by 8"):
        make_trainer(load_config("digits-tiny", [f"data.source={mixed}", f"data.buckets={SIZES}",
                                                 "unet.channel_mult=[1,2,2,2]", "unet.attention_resolutions=[]"]),
                     tmp_path / "deep")
    with pytest.raises(UserError, match="autoencoder training takes one image size"):
        make_trainer(load_config("ae-mnist", [f"data.source={mixed}", f"data.buckets={SIZES}"]), tmp_path / "ae")
