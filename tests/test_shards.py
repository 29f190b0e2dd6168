"""Streamed data: WebDataset shards (`latentdiff data pack`), lazily read folders, the prefetching loader, exact
resume mid-epoch, and damaged shards (truncated, a caption missing, an image undecodable, a shard deleted)."""

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data import DataConfig, StreamedImages, load_dataset, open_dataset
from latentdiff.data.loader import Prefetcher
from latentdiff.data.pack import MANIFEST, pack_folder, parse_shard_size
from latentdiff.data.tar_shards import index_matches, read_index, scan_shard
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import load_tensors
from latentdiff.training import make_trainer
from latentdiff.training.checkpoints import latest_checkpoint
from latentdiff.training.config import load_config

STEPS = ["train.batch_size=8", "train.checkpoint_every=0", "train.grid_samples=2", "train.grid_steps=2",
         "train.log_every=1", "train.warmup_steps=1", "data.hflip=true", "unet.num_classes=10"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    """48 digits as 16 px PNGs in class sub-folders, with captions, and the same folder packed in shards of 10."""
    base = tmp_path_factory.mktemp("digits")
    d = load_dataset(DataConfig(source="digits", image_size=16, limit=48))
    folder, lines = base / "folder", []
    for i in range(48):
        label = int(d.labels[i])
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(d.images[i, 0].numpy()).save(folder / str(label) / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{label}/{i:03d}.png", "text": f"a handwritten {label}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    pack_folder(folder, base / "shards", 10)
    return folder, base / "shards"


def weights(run: Path, group: str = "model") -> dict[str, torch.Tensor]:
    return load_tensors(latest_checkpoint(run / "checkpoints") / f"{group}.safetensors")


def train(out: Path, source: Path, steps: int, extra: list[str] = (), resume: bool = False):
    cfg = load_config("digits-tiny", STEPS + [f"data.source={source}", f"train.steps={steps}", *extra])
    trainer = make_trainer(cfg, out, resume=resume, device="cpu", progress=False)
    trainer.run()
    return trainer


def test_pack_writes_webdataset_shards_that_decode_to_the_folders_pixels(digits):
    folder, shards = digits
    manifest = json.loads((shards / MANIFEST).read_text())
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 10, 10, 8] and manifest["class_names"][0] == "0"
    with tarfile.open(shards / "000000.tar") as tar:  # WebDataset layout: a sample's files share a key, in a row
        names = tar.getnames()
    assert names[:4] == ["000000000.png", "000000000.json", "000000000.txt", "000000000.cls"]
    # the index beside each shard is what reading the tar's headers gives
    for rec in manifest["shards"]:
        path = shards / rec["name"]
        scanned, problems = scan_shard(path, "text")
        assert index_matches(path, path.stat().st_size)
        stored = read_index(path)
        assert problems == [] and all(np.array_equal(a, b) for a, b in zip(scanned.digest_arrays(),
                                                                             stored.digest_arrays()))
    for split in ("train", "test"):  # the same hash split, the same pixels, labels and captions
        mem = load_dataset(DataConfig(source=str(folder), image_size=16, split=split))
        for source, stream in ((shards, None), (folder, True)):
            s = open_dataset(DataConfig(source=str(source), image_size=16, split=split, stream=stream))
            assert isinstance(s, StreamedImages) and len(s) == len(mem)
            assert torch.equal(s.batch(torch.arange(len(s))), mem.batch(torch.arange(len(mem))))
            assert torch.equal(s.labels, mem.labels) and list(s.captions) == mem.captions
    assert parse_shard_size("500MB") == (1 << 62, 500 * 10**6) and parse_shard_size("64") == (64, None)


def test_training_from_shards_and_a_streamed_folder_equals_training_in_memory(digits, tmp_path):
    folder, shards = digits
    reference = weights(train(tmp_path / "memory", folder, 4).out)
    for name, source, extra in [("folder", folder, ["data.stream=true", "data.workers=2"]),
                                ("shards", shards, ["data.workers=0"])]:
        trainer = train(tmp_path / name, source, 4, extra)
        assert isinstance(trainer.data, StreamedImages)
        got = weights(trainer.out)
        assert all(torch.equal(got[k], reference[k]) for k in reference), name


def test_resume_mid_epoch_from_shards_is_exact(digits, tmp_path):
    """Batch 8: 5 batches an epoch; stop after 3, resume to 6 (past the epoch's end), with 2 workers."""
    _, shards = digits
    train(tmp_path / "straight", shards, 6)
    train(tmp_path / "split", shards, 3)
    trainer = train(tmp_path / "split", shards, 6, resume=True)
    assert len(trainer.data) // 8 == 5 and trainer.batches.pos == 8  # a batch into the second epoch
    assert trainer._streamed is None  # the run stopped its workers
    for group in ("model", "ema"):
        a, b = weights(tmp_path / "straight", group), weights(tmp_path / "split", group)
        assert all(torch.equal(a[k], b[k]) for k in a), group


def test_the_loader_follows_the_plan_and_restarts_when_asked_for_something_else(digits):
    _, shards = digits
    data = open_dataset(DataConfig(source=str(shards), image_size=16))
    plan = [torch.tensor([3, 1, 4]), torch.tensor([15, 9, 2]), torch.tensor([6, 5, 35])]
    loader = Prefetcher(data, workers=2)
    try:
        for k, want in enumerate(plan):
            got = loader.get(want, plan[k + 1:])
            assert torch.equal(got["idx"], want) and torch.equal(got["pixels"], data.rows(want.tolist())["pixels"])
        assert loader.restarts == 1
        other = torch.tensor([7, 8])  # not the plan's next: start over
        assert torch.equal(loader.get(other, [])["idx"], other) and loader.restarts == 2
    finally:
        loader.close()


def _copy(shards: Path, to: Path) -> Path:
    shutil.copytree(shards, to)
    return to


def test_a_truncated_shard_loses_its_tail_counted_or_refused(digits, tmp_path, caplog):
    shards = _copy(digits[1], tmp_path / "shards")
    tar = shards / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:6000])  # cut inside the third sample
    with caplog.at_level(logging.WARNING):
        d = open_dataset(DataConfig(source=str(shards), image_size=16, split="train"))
    assert "left out 9 damaged sample(s); first: 000001.tar: unreadable after byte" in caplog.text
    whole = open_dataset(DataConfig(source=str(digits[1]), image_size=16, split="train"))
    lost = set(whole.index.names) - set(d.index.names)
    in_shard_1 = [whole.index.names[i] for i in np.flatnonzero(whole.index.shard == 1)]
    assert lost == set(in_shard_1[1:]) and len(d) == len(whole) - len(lost)  # its first sample is whole
    with pytest.raises(UserError, match=r"000001.tar: unreadable after byte \d+ .*9 sample\(s\) lost"):
        open_dataset(DataConfig(source=str(shards), image_size=16, on_bad_file="fail"))


def test_a_missing_caption_in_a_shard_is_refused_like_a_folders(tmp_path):
    shards = tmp_path / "foreign"  # written as any WebDataset tool would, without our index
    shards.mkdir()
    with tarfile.open(shards / "a.tar", "w") as tar:
        for i in range(6):
            members = {"png": _png(i), **({"txt": f"grey {i}".encode()} if i != 4 else {})}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match=r"1 of 6 images have no caption .*s004"):
        open_dataset(DataConfig(source=str(shards), image_size=8, captions="auto"))
    d = open_dataset(DataConfig(source=str(shards), image_size=8, captions="ignore", split="train"))
    assert d.captions is None and len(d) >= 5


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_an_undecodable_image_in_a_shard_is_replaced_and_counted_or_refused(digits, tmp_path, caplog):
    shards = _copy(digits[1], tmp_path / "shards")
    d = open_dataset(DataConfig(source=str(shards), image_size=16))
    bad = 5
    path, off = d.shards[d.index.shard[bad]], int(d.index.offset[bad])
    raw = bytearray(path.read_bytes())
    raw[off + 40: off + int(d.index.nbytes[bad])] = bytes(int(d.index.nbytes[bad]) - 40)  # same size, no pixels
    path.write_bytes(bytes(raw))
    d = open_dataset(DataConfig(source=str(shards), image_size=16))
    got = d.rows([4, bad, 6])
    assert got["used"].tolist() == [4, bad + 1, 6] and len(got["problems"]) == 1
    assert torch.equal(got["pixels"][1], d.rows([bad + 1])["pixels"][0])  # the next readable image stands in
    loader = Prefetcher(d, workers=1)
    with caplog.at_level(logging.WARNING):
        assert loader.get(torch.tensor([bad]), [])["used"].tolist() == [bad + 1]
    loader.close()
    assert "cannot read image" in caplog.text and d.index.names[bad] in caplog.text
    strict = open_dataset(DataConfig(source=str(shards), image_size=16, on_bad_file="fail"))
    with pytest.raises(UserError, match=rf"{path.name}: '{d.index.names[bad]}': cannot read image"):
        strict.batch(torch.tensor([bad]))


def test_a_shard_deleted_between_runs_is_one_line_and_the_checkpoint_stays(digits, tmp_path):
    shards = _copy(digits[1], tmp_path / "shards")
    out = train(tmp_path / "run", shards, 1).out
    before = latest_checkpoint(out / "checkpoints")
    (shards / "000002.tar").unlink()
    for resume in (True, False):
        with pytest.raises(UserError, match=r"000002.tar: listed in shards.json but missing"):
            train(out if resume else tmp_path / "fresh", shards, 4, resume=resume)
    assert latest_checkpoint(out / "checkpoints") == before and (before / "model.safetensors").is_file()


def test_data_pack_command_reports_and_refuses_in_one_line(digits, tmp_path, monkeypatch, capsys):
    from test_kill_resume import run_cli

    folder = digits[0]
    code, err = run_cli(monkeypatch, capsys, "data", "pack", folder, tmp_path / "out", "--shard-size", "64KB")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["images"] == 48 and len(manifest["shards"]) > 1  # cut by bytes: 64 KB hold ~15 samples
    # a shard closes at the first sample past the bound (one sample of 4 KB), padded to a tar record
    assert all(s["bytes"] <= 64_000 + 4096 + tarfile.RECORDSIZE for s in manifest["shards"])
    for args, says in [(["--shard-size", "1.5"], "--shard-size '1.5': give a number of images"),
                       ([], "exists and is not an empty folder")]:
        code, err = run_cli(monkeypatch, capsys, "data", "pack", folder, tmp_path / "out", *args)
        assert code == 2 and err.count("\n") == 1 and says in err, err
    partly = tmp_path / "partly"
    shutil.copytree(folder, partly)
    (partly / "metadata.jsonl").write_text("\n".join((folder / "metadata.jsonl").read_text().splitlines()[1:]))
    code, err = run_cli(monkeypatch, capsys, "data", "pack", partly, tmp_path / "p")
    assert code == 2 and "1 of 48 images have no caption" in err and not (tmp_path / "p" / MANIFEST).exists()
