"""The sharded latent cache: parts split over processes (2 gloo processes under torchrun), memory-mapped reads,
an encoding killed half-way resumed, and streamed images encoded through the DataLoader workers; and, in the
same torchrun launch, training from shards with 2 processes equals one process."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import streams_worker as worker
from latentdiff.data import DataConfig, open_dataset
from latentdiff.training.distributed import DistEnv
from latentdiff.training.latent_cache import MANIFEST, build_cache, plan_parts
from latentdiff.training.latents import LatentData
from test_distributed import assert_same, initial, single_process, torchrun, weights

TESTS = Path(__file__).parent


def parts(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from latentdiff.formats.checkpoint import load_tensors

    return {p.name: load_tensors(p) for p in sorted(folder.glob("*.safetensors"))}


def same_parts(a: Path, b: Path) -> None:
    pa, pb = parts(a), parts(b)
    assert pa.keys() == pb.keys() and len(pa) == 5
    for name in pa:
        assert pa[name].keys() == pb[name].keys()
        for key in pa[name]:
            assert torch.equal(pa[name][key], pb[name][key]), (name, key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> LatentData:
    torch.set_num_threads(1)  # as the torchrun workers: the same kernels, bit for bit
    data, ae = worker.inputs()
    return LatentData(data, ae, "test-autoencoder", tmp_path_factory.mktemp("one"), hflip=True,
                      device=torch.device("cpu"), part_images=worker.PART_IMAGES)


def test_cache_holds_the_encoders_moments_memory_mapped(one_process):
    data, ae = worker.inputs()
    idx = torch.tensor([0, 9, 17, 33])  # from three parts
    with torch.no_grad():
        q, qf = ae.encode(data.batch(idx)), ae.encode(data.batch(idx).flip(-1))
    mean, std = one_process.moments(idx)
    torch.testing.assert_close(mean, q.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, q.std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_process.moments(idx, mirrored=True)[0], qf.mean, atol=1e-5, rtol=1e-5)
    assert all(isinstance(p["mean"], np.memmap) for p in one_process.cache.parts)  # read as used, not loaded
    assert torch.equal(one_process.used(idx), idx)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """tests/streams_worker.py under torchrun: the cache, and a run from shards of 40 digits."""
    from PIL import Image

    from latentdiff.data.pack import pack_folder

    out = tmp_path_factory.mktemp("torchrun")
    data, _ = worker.inputs()
    for i in range(len(data)):
        (out / "folder" / str(int(data.labels[i]))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i, 0].numpy()).save(out / "folder" / str(int(data.labels[i])) / f"{i:03d}.png")
    pack_folder(out / "folder", out / "shards", 16)
    torchrun([str(TESTS / "streams_worker.py"), str(out)], out)
    return out


def test_two_gloo_processes_build_the_same_cache_each_encoding_its_parts(one_process, two_processes):
    (folder,) = [p.parent for p in (two_processes / "cache").glob(f"*/{MANIFEST}")]
    assert folder.name == one_process.folder.name  # the same fingerprint
    same_parts(folder, one_process.folder)


def test_two_processes_training_from_shards_equal_one_process(two_processes, tmp_path):
    """Each rank decodes only its 4 rows of each batch of 8 (its DataLoader worker), and the step is the same."""
    cfg = worker.shard_run(two_processes / "shards")
    one = single_process(cfg, tmp_path / "one", threads=1)
    for group in ("model", "ema"):
        assert_same(weights(two_processes / "run", group), weights(one, group), initial(cfg, tmp_path, group))
    rank0, rank1 = (json.loads((two_processes / f"decoded.rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["batches"] == rank1["batches"] and len(rank0["batches"]) == 3  # one global order
    for batch, mine, theirs in zip(rank0["batches"], rank0["asked"], rank1["asked"]):
        assert mine == batch[:4] and theirs == batch[4:]  # each rank decodes its half, no image twice


def test_an_encoding_killed_half_way_resumes_with_the_missing_parts(one_process, tmp_path, monkeypatch, capsys):
    import latentdiff.training.latent_cache as lc

    torch.set_num_threads(1)  # as one_process was built
    data, ae = worker.inputs()
    folder = tmp_path / "cache"
    save, written = lc.save_tensors, []

    def killed_after_two(tensors, path, meta):  # KeyboardInterrupt stands in for SIGKILL
        if len(written) == 2:
            (path.parent / f".{path.name}.abcd1234.tmp").write_bytes(b"half")  # as a kill leaves it
            raise KeyboardInterrupt
        save(tensors, path, meta)
        written.append(path.name)

    monkeypatch.setattr(lc, "save_tensors", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_cache(folder, data, ae, True, torch.device("cpu"), DistEnv(), {}, part_images=worker.PART_IMAGES)
    monkeypatch.undo()
    assert not (folder / MANIFEST).exists() and len(list(folder.glob("*.safetensors"))) == 2
    capsys.readouterr()
    build_cache(folder, data, ae, True, torch.device("cpu"), DistEnv(), {}, part_images=worker.PART_IMAGES)
    assert "in 3 of 5 part(s)" in capsys.readouterr().err
    assert not list(folder.glob(".*.tmp")) and (folder / MANIFEST).is_file()
    same_parts(folder, one_process.folder)


def test_ranks_take_turns_and_streamed_images_encode_through_the_workers(one_process, tmp_path):
    """Rank 1 of 2 encodes parts 1 and 3, rank 0 the others and the manifest; from shards, through the loader."""
    from PIL import Image

    from latentdiff.data.pack import pack_folder

    data, ae = worker.inputs()
    for i in range(len(data)):
        Image.fromarray(data.images[i, 0].numpy()).save((tmp_path / f"{i:03d}.png"))
    pack_folder(tmp_path, tmp_path / "shards", 16)
    streamed = open_dataset(DataConfig(source=str(tmp_path / "shards"), image_size=16, split="train", limit=40,
                                       workers=1))
    assert len(streamed) < len(data)  # the folder's own hash split: another set of images than data's
    folder = tmp_path / "cache"
    build_cache(folder, streamed, ae, True, torch.device("cpu"), DistEnv(1, 2), {}, workers=1,
                part_images=worker.PART_IMAGES, collective=False)
    n_parts = len(plan_parts(streamed, worker.PART_IMAGES))
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [f"b00-{k:05d}.safetensors" for k in
                                                                   range(1, n_parts, 2)]
    build_cache(folder, streamed, ae, True, torch.device("cpu"), DistEnv(0, 2), {}, workers=1,
                part_images=worker.PART_IMAGES, collective=False)
    assert (folder / MANIFEST).is_file()
    from latentdiff.training.latent_cache import LatentShards

    cache = LatentShards(folder, len(streamed))
    idx = torch.arange(len(streamed))
    with torch.no_grad():
        mean = torch.cat([ae.encode(streamed.batch(b)).mean for b in idx.split(worker.PART_IMAGES)])
    assert torch.equal(cache.gather("mean", idx), mean)
