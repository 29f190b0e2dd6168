"""latentdiff viz: forward strips, reverse trajectories (strip + GIF) and schedule plots."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from latentdiff.diffusion import Schedule
from latentdiff.errors import UserError
from latentdiff.pipelines.generate import Pipeline
from latentdiff.pipelines.viz import (forward_strip, noised_images, reverse_trajectory, save_gif, schedule_plots,
                                      trajectory)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from latentdiff.training.config import load_config
    from latentdiff.training import make_trainer

    torch.set_num_threads(2)
    cfg = load_config("digits-tiny", ["train.steps=3", "train.grid_samples=2", "train.grid_steps=2", "data.limit=32"])
    out = tmp_path_factory.mktemp("viz_run")
    make_trainer(cfg, out, progress=False).run()
    return Pipeline.load(out)


def _digit() -> torch.Tensor:
    """A 28-px uint8 (1, H, W) test image: a bright ring on black."""
    yy, xx = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    r = ((yy - 13.5) ** 2 + (xx - 13.5) ** 2).sqrt()
    return (((r > 6) & (r < 10)).to(torch.uint8) * 255)[None]


def _tile(img: Image.Image, row: int, col: int) -> torch.Tensor:
    box = next(b for r, c, b in img.info["tiles"] if (r, c) == (row, col))
    return torch.from_numpy(np.asarray(img.crop(box)).copy())


def _down(tile: torch.Tensor, size: int) -> torch.Tensor:
    """Undo a nearest-neighbour integer upscale."""
    f = tile.shape[-1] // size
    return tile[..., ::f, ::f]


def test_forward_strip_starts_at_the_image_and_gets_noisier():
    img, sched = _digit(), Schedule.from_name("linear")
    ts = [0, 100, 250, 500, 750, 999]
    strip = forward_strip(img, sched, ts, seed=3)
    assert len(strip.info["tiles"]) == len(ts) and strip.mode == "L"
    first = _down(_tile(strip, 0, 0), 28).float()
    # ᾱ_0 = 1 - 1e-4: z_0 = x + 0.01 ε, i.e. about 1.3 grey levels of noise
    assert first.shape == (28, 28) and (first - img[0].float()).abs().mean() < 3
    assert (first - img[0].float()).abs().max() < 12
    z = noised_images(img, sched, ts, seed=3).float()
    assert torch.equal(_down(_tile(strip, 0, 5), 28).float(), z[-1, 0])
    # distance from the clean image grows with t, and the last tile has forgotten the image
    dev = [(zi[0] - img[0].float()).pow(2).mean().item() for zi in z]
    assert all(a < b for a, b in zip(dev, dev[1:])), dev
    inside, outside = img[0] > 0, img[0] == 0
    assert z[-1, 0][inside].mean() - z[-1, 0][outside].mean() < 40  # ring and background look alike
    assert z[1, 0].std() > 0 and z[1, 0][inside].mean() > z[1, 0][outside].mean() + 150


def test_forward_strip_reads_files_and_rejects_bad_timesteps(tmp_path):
    p = tmp_path / "ring.png"
    Image.fromarray(_digit()[0].numpy()).save(p)
    strip = forward_strip(p, Schedule.from_name("cosine", 100), [0, 50, 99], image_size=16)
    assert len(strip.info["tiles"]) == 3
    with pytest.raises(UserError, match="0..99"):
        forward_strip(p, Schedule.from_name("cosine", 100), [0, 100])
    with pytest.raises(UserError, match="missing.png: file not found"):
        forward_strip(tmp_path / "missing.png", Schedule.from_name("linear"), [0])


def test_reverse_trajectory_matches_generate(pipe, tmp_path):
    steps = 4
    strip, frames = reverse_trajectory(pipe, "ddim", steps, seed=5)
    assert len(frames) == steps
    rows = {r for r, _, _ in strip.info["tiles"]}
    assert rows == {0, 1}
    final = pipe.generate(1, 1, steps, "ddim", seed=5)[0]
    traj = trajectory(pipe, "ddim", steps, seed=5)
    assert traj["x0"].shape == (steps, *final.shape) and len(traj["t"]) == steps
    assert torch.equal(traj["x0"][-1], final)
    assert torch.equal(traj["x_t"][-1], final)  # after the last step z is the sample itself
    size = final.shape[-1]
    last_col = max(c for r, c, _ in strip.info["tiles"] if r == 1)
    assert torch.equal(_down(_tile(strip, 1, last_col), size), final[0])
    T = pipe.diffusion.build_schedule().num_timesteps
    assert traj["t"] == sorted(traj["t"], reverse=True) and traj["t"][0] == T - 1

    gif = save_gif(frames, tmp_path / "sub" / "r.gif", duration_ms=50)
    with Image.open(gif) as im:
        assert sum(1 for _ in ImageSequence.Iterator(im)) == steps
    assert [p.name for p in gif.parent.iterdir()] == ["r.gif"]  # no temp file left behind


def test_reverse_trajectory_every_and_stochastic_sampler(pipe):
    strip, frames = reverse_trajectory(pipe, "ddpm", 4, seed=1, every=2, frame_size=40)
    assert len(frames) == 3  # steps 1, 3 and 4 (the last one is always kept)
    assert frames[0].width >= 2 * 40 and frames[0].height >= 40
    assert torch.equal(trajectory(pipe, "ddpm", 4, seed=1)["x0"][-1], pipe.generate(1, 1, 4, "ddpm", seed=1)[0])
    with pytest.raises(UserError, match="every"):
        reverse_trajectory(pipe, "ddim", 3, every=0)  # checked before sampling


def test_schedule_plots_writes_a_png(tmp_path):
    out = schedule_plots(num_timesteps=200, steps=10, path=tmp_path / "s.png")
    assert out.stat().st_size > 10_000
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height
    with pytest.raises(UserError, match="unknown schedule"):
        schedule_plots(names=("nope",), path=tmp_path / "t.png")
