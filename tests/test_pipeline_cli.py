"""Generation from a model folder and the command line, including its bad-input contract."""

import subprocess
import sys

import pytest
from PIL import Image
import torch

from latentdiff.data.images import read_png_settings
from latentdiff.pipelines.generate import Pipeline


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "latentdiff", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_chunking_does_not_change_the_images(run_dir):
    pipe = Pipeline.load(run_dir)
    for sampler in ("ddim", "ddpm"):
        a = pipe.generate(n_samples=5, batch_size=5, steps=4, sampler=sampler, seed=11)
        b = pipe.generate(n_samples=5, batch_size=2, steps=4, sampler=sampler, seed=11)
        assert a.shape == (5, 1, 16, 16) and a.dtype == torch.uint8
        assert (a.int() - b.int()).abs().max() <= 1  # same noise per image; only float rounding differs
        c = pipe.generate(n_samples=2, batch_size=2, steps=4, sampler=sampler, seed=14)
        assert (a[3:].int() - c.int()).abs().max() <= 1  # image i uses seed + i


def test_generate_bad_input(run_dir):
    from latentdiff.errors import UserError

    pipe = Pipeline.load(run_dir)
    with pytest.raises(UserError, match="n_samples"):
        pipe.generate(n_samples=0)
    with pytest.raises(UserError, match="not class-conditional"):
        pipe.generate(n_samples=1, class_label=3)
    with pytest.raises(UserError, match="unknown sampler"):
        pipe.generate(n_samples=1, sampler="plms")


def test_progress_callback_counts_all_steps(run_dir):
    seen = []
    Pipeline.load(run_dir).generate(n_samples=3, batch_size=2, steps=3, callback=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 6) for i in range(1, 7)]


def test_cli_sample_writes_pngs_with_settings(run_dir, tmp_path):
    r = cli("sample", run_dir, "--n-samples", 3, "--batch-size", 2, "--steps", 3, "--seed", 5, "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["000005.png", "000006.png", "000007.png", "grid.png"]
    settings = read_png_settings(tmp_path / "s" / "000006.png")
    assert settings["seed"] == 6 and settings["steps"] == 3
    # no --sampler: the one default of the library, the CLI and the web API
    assert (settings["sampler"], settings["spacing"], settings["sampler_name"]) == ("dpmpp_2m", "karras",
                                                                                     "DPM++ 2M Karras")
    r = cli("sample", run_dir, "--sampler", "Euler a", "--n-samples", 1, "--steps", 2, "--out", tmp_path / "ea")
    assert r.returncode == 0 and "euler_ancestral trailing" in r.stdout, r.stderr  # the names users know
    assert read_png_settings(tmp_path / "ea" / "000000.png")["sampler_name"] == "Euler a"
    r = cli("sample", run_dir, "--size", "24x12", "--n-samples", 1, "--steps", 2, "--out", tmp_path / "wide")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "wide" / "000000.png").size == (24, 12)  # WIDTHxHEIGHT, as the web UIs write it


@pytest.mark.parametrize("args,needle", [
    (["sample", "no/such/dir"], "no/such/dir does not exist: give a latentdiff model folder"),
    (["train", "no-such-preset"], "neither a preset"),
    (["train", "digits-tiny", "train.lr=abc"], "train.lr: expected float"),
    (["train", "digits-tiny", "data.source=/no/such/folder"], "/no/such/folder"),
    (["train", "digits-tiny", "--steps", "0"], "--steps"),
    (["sample", ".", "--seed", "-1"], "--seed"),
    (["sample", ".", "--n-samples", "0"], "--n-samples"),
    (["sample", ".", "--size", "24x7"], "'24x7' is not a size: give a side (512) or WIDTHxHEIGHT (768x512)"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    r = cli(*args, "--out", tmp_path / "o") if args[0] == "train" else cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_sample_wrong_sampler_lists_valid_ones(run_dir):
    r = cli("sample", run_dir, "--sampler", "plms", "--n-samples", 1)
    assert r.returncode == 2 and "ddpm, ddim" in r.stderr and "Traceback" not in r.stderr


def test_cli_help_mentions_every_option():
    r = cli("sample", "--help")
    assert r.returncode == 0
    for opt in ("--n-samples", "--batch-size", "--steps", "--sampler", "--seed", "--out", "--eta"):
        assert opt in r.stdout


def test_cli_any_sampler_and_spacing_reports_nfe(run_dir, tmp_path):
    r = cli("sample", run_dir, "--n-samples", 2, "--steps", 4, "--sampler", "heun", "--spacing", "karras",
            "--out", tmp_path / "h")
    assert r.returncode == 0, r.stderr
    assert "heun karras, 7 network evaluations per image" in r.stdout  # Heun: 2 per step, 1 on the last
    assert read_png_settings(tmp_path / "h" / "000000.png")["nfe"] == 7
    r = cli("sample", run_dir, "--n-samples", 1, "--steps", 3, "--sampler", "DPM++ 2M", "--spacing", "ays",
            "--out", tmp_path / "a")
    assert r.returncode == 0 and "dpmpp_2m ays, 3 network evaluations per image" in r.stdout, r.stderr
    r = cli("sample", run_dir, "--n-samples", 1, "--sampler", "ddpm", "--eta", "0.5")
    assert r.returncode == 2 and "takes no option(s) eta" in r.stderr


def test_img2img_and_inpaint_pipeline(run_dir):
    pipe = Pipeline.load(run_dir)
    src = pipe.generate(n_samples=1, steps=3, seed=9)
    same = pipe.img2img(src, strength=0.0, n_samples=2, steps=10)
    assert torch.equal(same, src.expand(2, -1, -1, -1))  # strength 0 returns the input
    changed = pipe.img2img(src, strength=0.8, n_samples=2, steps=10, seed=1)
    assert not torch.equal(changed[0], changed[1])  # seed + i: two different redraws
    mask = torch.ones(16, 16)
    mask[4:12, 4:12] = 0  # redraw the centre
    out = pipe.inpaint(src, mask, n_samples=2, steps=6, sampler="ddpm", resample=2)
    keep = mask.bool().expand(2, 1, 16, 16)
    assert torch.equal(out[keep], src.expand(2, -1, -1, -1)[keep])  # the known region, exactly
    assert not torch.equal(out[~keep], src.expand(2, -1, -1, -1)[~keep])
    from latentdiff.errors import UserError

    with pytest.raises(UserError, match=r"uint8 \(N, 1, 16, 16\)"):
        pipe.img2img(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(UserError, match="mask must be"):
        pipe.inpaint(src, torch.ones(8, 8))


def test_cli_img2img_and_inpaint(run_dir, tmp_path):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.new("L", (40, 40), 30).save(img)  # any size: resized to the model's
    r = cli("img2img", run_dir, img, "--strength", 0.5, "--steps", 4, "--n-samples", 2, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert read_png_settings(tmp_path / "a" / "000001.png")["strength"] == 0.5
    mask = tmp_path / "mask.png"
    m = Image.new("L", (16, 16), 0)
    m.paste(255, (4, 4, 12, 12))
    m.save(mask)
    r = cli("inpaint", run_dir, img, mask, "--steps", 4, "--sampler", "ddpm", "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    for args, needle in ((("img2img", run_dir, tmp_path / "nope.png"), "file not found"),
                         (("img2img", run_dir, img, "--strength", 1.5), "--strength"),
                         (("inpaint", run_dir, img, img), "marks nothing to redraw"),
                         (("inpaint", run_dir, img, mask, "--sampler", "lms"), "one step at a time")):
        r = cli(*args, "--out", tmp_path / "c")
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = cli("inpaint", run_dir, img, img, "--out", tmp_path / "c")  # warnings read as one line each, like errors
    assert r.stderr.splitlines() == [f"warning: mask {img} is 40x40, resized to 16x16",
                                     f"warning: mask {img} is not black and white; thresholded at 50 %",
                                     f"error: mask {img} marks nothing to redraw (paint the region to redraw white)"]


def test_cli_viz(run_dir, tmp_path):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.new("L", (16, 16), 200).save(img)
    for args in (("forward", img, "--t", "0,500,999", "--out", tmp_path / "f.png"),
                 ("reverse", run_dir, "--steps", 3, "--gif", tmp_path / "r.gif", "--out", tmp_path / "r.png"),
                 ("schedules", "--steps", 5, "--out", tmp_path / "s.png")):
        r = cli("viz", *args)
        assert r.returncode == 0, r.stderr
    assert all((tmp_path / n).stat().st_size > 0 for n in ("f.png", "r.gif", "r.png", "s.png"))
    r = cli("viz", "forward", img, "--t", "0,abc")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_every_cli_option_has_help_text():
    import click

    from latentdiff.cli import cli as group

    def commands(g, prefix=""):
        for name, cmd in g.commands.items():
            if isinstance(cmd, click.Group):
                yield from commands(cmd, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", cmd

    missing = [f"{name} {p.opts[0]}" for name, cmd in commands(group) for p in cmd.params
               if isinstance(p, click.Option) and not p.help and p.opts[0] not in ("--help",)]
    assert not missing, missing
