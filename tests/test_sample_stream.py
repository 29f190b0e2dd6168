"""Streaming generation (pipelines/stream.py, `latentdiff sample`): batches written as they finish, a rerun
after a crash or a kill ends with exactly the images of an uninterrupted run, the grid is bounded."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from latentdiff.data.images import read_png_settings
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import is_temp_file
from latentdiff.models.settings import SampleSettings
from latentdiff.pipelines.generate import Pipeline
from latentdiff.pipelines.stream import GRID_MAX, read_batch, stream_images


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "latentdiff", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)


def pixels(folder):
    """{file name: pixel array} of every image file (PNGs, or the images of .npz shards by seed)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.suffix == ".png":
            out[p.name] = np.asarray(Image.open(p))
        elif p.suffix == ".npz":
            with np.load(p) as z:
                out.update({int(s): im for s, im in zip(z["seeds"], z["images"])})
    return out


class Crash(Exception):
    pass


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_interrupted_then_resumed_equals_uninterrupted(run_dir, tmp_path, fmt):
    """A run that dies after two batches, rerun with the same arguments, ends with the same images, bit for bit
    (a stochastic sampler, so a batch drawn with the wrong seeds would differ)."""
    pipe = Pipeline.load(run_dir)
    s = pipe.check(SampleSettings(n_samples=7, batch_size=2, steps=3, sampler="DPM++ 2M SDE", seed=3))
    meta = pipe.describe(s)
    whole = stream_images(pipe, s, tmp_path / "whole", meta, fmt)
    assert (whole.drawn, whole.reused) == (7, 0)

    calls, run = [], pipe.run

    def dies_on_the_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Crash
        return run(*a, **k)
    pipe.run = dies_on_the_third_batch
    with pytest.raises(Crash):
        stream_images(pipe, s, tmp_path / "resumed", meta, fmt)
    written = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert written == (["000003.png", "000004.png", "000005.png", "000006.png"] if fmt == "png"
                       else ["000003-000004.npz", "000005-000006.npz"])  # two whole batches, no temp files
    pipe.run = run
    again = stream_images(pipe, s, tmp_path / "resumed", meta, fmt)
    assert (again.drawn, again.reused) == (3, 4)
    a, b = pixels(tmp_path / "whole"), pixels(tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) == 8  # 7 images and grid.png
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_killed_cli_run_resumes_to_the_same_images(run_dir, tmp_path):
    """SIGKILL `latentdiff sample` once some images are on disk; the rerun completes the set exactly."""
    args = ["sample", run_dir, "--n-samples", 24, "--batch-size", 2, "--steps", 3, "--sampler", "Euler a", "--seed", 9]
    r = cli(*args, "--out", tmp_path / "whole")
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([sys.executable, "-m", "latentdiff", *map(str, args), "--out", tmp_path / "killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((tmp_path / "killed").glob("0*.png"))) < 4:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done_before = len(list((tmp_path / "killed").glob("0*.png")))
    assert 4 <= done_before < 24, done_before  # killed part-way
    whole_batches = sum(all((tmp_path / "killed" / f"{9 + i + k:06d}.png").exists() for k in (0, 1))
                        for i in range(0, 24, 2))  # a kill between a batch's two PNGs: that batch is redrawn
    r = cli(*args, "--out", tmp_path / "killed")
    assert r.returncode == 0, r.stderr
    assert f"{2 * whole_batches} kept from an earlier run" in r.stdout, r.stdout
    for p in (tmp_path / "killed").iterdir():  # a kill mid-write leaves at most an atomic_write temp file
        assert p.suffix == ".png" or is_temp_file(p), p
    a, b = pixels(tmp_path / "whole"), pixels(tmp_path / "killed")
    assert a.keys() == b.keys() and len(a) == 25 and all(np.array_equal(a[k], b[k]) for k in a)
    assert read_png_settings(tmp_path / "killed" / "000020.png")["seed"] == 20  # named by its seed


def test_grid_holds_at_most_the_first_64(run_dir, tmp_path):
    pipe = Pipeline.load(run_dir)
    s = pipe.check(SampleSettings(n_samples=GRID_MAX + 6, batch_size=35, steps=1, sampler="ddim", seed=0))
    done = stream_images(pipe, s, tmp_path, pipe.describe(s), "npz")
    side = 8 * (64 + 2) + 2  # 8 x 8 tiles of 16-px digits upscaled to 64 px, 2-px padding
    assert Image.open(done.grid).size == (side, side)
    first = read_batch([tmp_path / "000000-000034.npz"], "npz")
    assert first.shape == (35, 1, 16, 16)
    tile = np.asarray(Image.open(done.grid))[2:66, 2:66]
    assert np.array_equal(tile, first[0, 0].numpy().repeat(4, 0).repeat(4, 1))  # the grid starts at image 0


def test_resume_refuses_files_of_other_settings(run_dir, tmp_path):
    pipe = Pipeline.load(run_dir)
    s = pipe.check(SampleSettings(n_samples=2, batch_size=2, steps=2, sampler="ddim", seed=0))
    stream_images(pipe, s, tmp_path, pipe.describe(s))
    other = s.replace(steps=3)
    with pytest.raises(UserError, match="000000.png was drawn with steps=2, not 3: use another --out or --overwrite"):
        stream_images(pipe, other, tmp_path, pipe.describe(other))
    assert stream_images(pipe, other, tmp_path, pipe.describe(other), overwrite=True).drawn == 2
    more = s.replace(n_samples=3)  # more images of the same settings: the first two are kept
    assert (stream_images(pipe, more, tmp_path / "x", pipe.describe(more)).drawn,) == (3,)


@pytest.mark.parametrize("args,needle", [
    (["--format", "tiff"], "--format"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--n-samples", "0"], "--n-samples"),
])
def test_cli_bad_stream_options_are_one_line(run_dir, tmp_path, args, needle):
    r = cli("sample", run_dir, *args, "--out", tmp_path / "o")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_out_that_is_a_file(run_dir, tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    r = cli("sample", run_dir, "--n-samples", 1, "--steps", 1, "--out", f)
    assert r.returncode == 2 and "file.png" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_eval_streams_features(run_dir):
    """eval keeps features, not images: batch by batch they equal the features of a whole run's images."""
    from latentdiff.pipelines.evaluate import stream_features

    pipe = Pipeline.load(run_dir)
    s = pipe.check(SampleSettings(n_samples=5, batch_size=2, steps=2, sampler="DPM++ 2M SDE", seed=1))
    seen = []
    feats, nfe, _ = stream_features(pipe, s, lambda x: x.flatten(1).float(), lambda d, t: seen.append((d, t)))
    whole = pipe.run(s).images
    assert feats.shape == (5, 256) and nfe == 2
    assert bool((feats == whole.flatten(1).float()).all())
    assert seen == [(i, 6) for i in range(1, 7)]
    as_numpy, _, _ = stream_features(pipe, s, lambda x: x.flatten(1).float().numpy())  # extractors give numpy
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, feats.numpy())
