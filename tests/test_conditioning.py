"""Class and text conditioning: guidance as a denoiser wrapper, condition dropout, prompts end to end."""

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.training.config import load_config
from latentdiff.diffusion import classifier_free_guidance
from latentdiff.errors import UserError
from latentdiff.models.settings import SampleSettings
from latentdiff.pipelines.generate import Pipeline
from latentdiff.training.diffusion_trainer import DiffusionTrainer


def test_guidance_formula_and_one_batched_call():
    calls = []

    def model(x, t, context):
        calls.append(x.shape[0])
        t = torch.as_tensor(t).float().expand(len(x))
        return x * context.mean(dim=(1, 2))[:, None, None, None] + t[:, None, None, None]

    x, t = torch.randn(3, 2, 4, 4), torch.tensor(7)
    cond, uncond = {"context": torch.full((3, 5, 8), 2.0)}, {"context": torch.full((3, 5, 8), -1.0)}
    e_c, e_u = model(x, t.expand(3), **cond), model(x, t.expand(3), **uncond)
    calls.clear()
    for w in (0.0, 1.0, 2.5, 8.0):
        out = classifier_free_guidance(model, cond, uncond, w)(x, t)
        torch.testing.assert_close(out, e_u + w * (e_c - e_u))
    assert calls == [3, 3, 6, 6]  # w = 0 and 1 need one pass; otherwise cond and uncond share one batch
    with pytest.raises(UserError, match="guidance"):
        classifier_free_guidance(model, cond, uncond, -1.0)
    # A limited interval: steps with t > max_t get the conditional prediction, in one pass.
    calls.clear()
    torch.testing.assert_close(classifier_free_guidance(model, cond, uncond, 2.5, max_t=6)(x, t), e_c)
    guided = classifier_free_guidance(model, cond, uncond, 2.5, max_t=7)
    torch.testing.assert_close(guided(x, t), e_u + 2.5 * (e_c - e_u))
    assert calls == [3, 6]
    mixed = torch.tensor([3, 7, 9])  # per-sample timesteps (training-style): guided where t <= 7
    want = model(x, mixed, **uncond) + 2.5 * (model(x, mixed, **cond) - model(x, mixed, **uncond))
    want[2] = model(x, mixed, **cond)[2]
    torch.testing.assert_close(guided(x, mixed), want)
    with pytest.raises(UserError, match="max_t"):
        classifier_free_guidance(model, cond, uncond, 2.5, max_t=-1)


def test_regional_guidance_formula():
    """ε̃ = ε(∅) + w Σ m_i (ε(c_i) − ε(∅)) in one batched call; one full region is plain guidance."""
    from latentdiff.diffusion import regional_guidance

    calls = []

    def model(x, t, context):
        calls.append(x.shape[0])
        return x * context.mean(dim=(1, 2))[:, None, None, None] + torch.as_tensor(t).float()[:, None, None, None]

    x, t = torch.randn(2, 3, 4, 4), torch.tensor(700)
    c = {n: {"context": torch.full((2, 5, 8), v)} for n, v in (("u", -1.0), ("a", 2.0), ("b", 0.5))}
    e = {n: model(x, t.expand(2), **c[n]) for n in c}
    full = torch.ones(2, 1, 4, 4)
    torch.testing.assert_close(regional_guidance(model, [(c["a"], full)], c["u"], 2.5)(x, t),
                               classifier_free_guidance(model, c["a"], c["u"], 2.5)(x, t))
    top = torch.zeros(2, 1, 4, 4)
    top[:, :, :2] = 1.0
    calls.clear()
    out = regional_guidance(model, [(c["a"], top), (c["b"], 1 - top)], c["u"], 2.5)(x, t)
    assert calls == [6]  # ∅ and both regions as one batch
    want = e["u"] + 2.5 * (top * (e["a"] - e["u"]) + (1 - top) * (e["b"] - e["u"]))
    torch.testing.assert_close(out, want)
    high = regional_guidance(model, [(c["a"], top), (c["b"], 1 - top)], c["u"], 2.5, max_t=500)(x, t)
    torch.testing.assert_close(high, top * e["a"] + (1 - top) * e["b"])  # unguided above max_t: w = 1


def test_layout_plan_places_each_object_in_its_half():
    from latentdiff.data.shapes import POSITIONS, parse_caption
    from latentdiff.pipelines.layout import BASE_SHARE, layout_regions, plan

    rng = np.random.default_rng(0)
    for prompt, first, second in [("a red circle above a large blue square", "top", "bottom"),
                                  ("a small green cross to the right of a white triangle", "right", "left")]:
        sizes, across = set(), set()
        for _ in range(30):
            (pa, ma), (pb, mb), (whole, base) = plan(prompt, (16, 16), rng)
            assert whole == prompt and torch.equal(base, torch.full((16, 16), BASE_SHARE))
            a, b = parse_caption(pa).objects[0], parse_caption(pb).objects[0]
            want = parse_caption(prompt).objects
            assert (a.colour, a.shape, b.colour, b.shape) == (want[0].colour, want[0].shape,
                                                              want[1].colour, want[1].shape)
            assert first in a.position.split() and second in b.position.split() and a.position in POSITIONS
            assert torch.allclose(ma + mb + base, torch.ones(16, 16)) and (ma > 0).sum() == 128
            assert torch.equal(ma + mb, torch.full((16, 16), 1 - BASE_SHARE))
            half = {"top": np.s_[:8, :], "bottom": np.s_[8:, :], "left": np.s_[:, :8], "right": np.s_[:, 8:]}
            assert (ma[half[first]] > 0).all() and (mb[half[second]] > 0).all()
            sizes.add(a.size)
            across.add(a.position)
            assert b.size == (want[1].size or b.size)  # said sizes are kept
        assert sizes == {"small", "large"} or want[0].size is not None  # unsaid sizes vary
        assert len(across) == 3  # both objects at the left, middle or right of their axis
    one = plan("a small red circle at the top left", (16, 16), rng)
    assert len(one) == 1 and one[0][0] == "a small red circle at the top left" and one[0][1].min() == 1
    assert [p for p, _ in layout_regions(["a red circle above a blue square"] * 2, (16, 16), seed=3)[1]] == \
        [p for p, _ in plan("a red circle above a blue square", (16, 16), np.random.default_rng(4))]


def test_class_labels_are_dropped_at_drop_prob(tiny_cfg, tmp_path):
    cfg = load_config("digits-tiny", ["unet.num_classes=10", "cond.drop_prob=0.3", "data.limit=64"])
    trainer = DiffusionTrainer(cfg, tmp_path, progress=False)
    idx = torch.arange(64).repeat(40)
    labels = trainer.condition(idx)["class_labels"].cpu()
    dropped = labels == 10
    assert abs(float(dropped.float().mean()) - 0.3) < 0.03
    assert torch.equal(labels[~dropped], trainer.data.labels[idx][~dropped])


@pytest.fixture(scope="module")
def captioned_run(tmp_path_factory):
    """Eight 16 px images with captions (metadata.jsonl); a text-conditional UNet trained a few steps."""
    root = tmp_path_factory.mktemp("captioned")
    rows = []
    for i in range(8):
        arr = np.zeros((16, 16, 3), np.uint8)
        arr[..., i % 3] = 200
        Image.fromarray(arr).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": ["red", "green", "blue"][i % 3] + " square"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config("digits-tiny", [f"data.source={root}", "data.channels=3", "data.image_size=16",
                                      "unet.in_channels=3", "unet.out_channels=3", "unet.context_dim=384",
                                      "cond.context_length=8", "train.steps=3", "train.grid_samples=2",
                                      "train.grid_steps=2", "train.batch_size=4", "train.warmup_steps=1"])
    out = tmp_path_factory.mktemp("run")
    DiffusionTrainer(cfg, out, progress=False).run()
    return out, cfg


def test_text_conditional_model_samples_from_prompts(captioned_run):
    out, _ = captioned_run
    manifest = json.loads((out / "model_index.json").read_text())
    assert "text_encoder" in manifest["components"] and manifest["conditioning"]["kind"] == "text"
    pipe = Pipeline.load(out)
    a = pipe.generate(n_samples=2, batch_size=2, steps=3, seed=3, prompt="red square", guidance=3.0)
    b = pipe.generate(n_samples=2, batch_size=1, steps=3, seed=3, prompt=["red square"], guidance=3.0)
    assert a.shape == (2, 3, 16, 16) and (a.int() - b.int()).abs().max() <= 1
    # with the negative prompt equal to the prompt, guidance has nothing to amplify: any scale gives w = 1
    same1 = pipe.generate(n_samples=1, steps=3, seed=4, prompt="blue square", negative_prompt="blue square",
                          guidance=1.0)
    same7 = pipe.generate(n_samples=1, steps=3, seed=4, prompt="blue square", negative_prompt="blue square",
                          guidance=7.0)
    assert (same1.int() - same7.int()).abs().max() <= 1
    other = pipe.generate(n_samples=1, steps=3, seed=4, prompt="blue square", guidance=7.0)
    assert not torch.equal(same7, other)


def test_guidance_interval_per_call_overrides_the_models(captioned_run):
    pipe = Pipeline.load(captioned_run[0])
    kw = dict(n_samples=2, batch_size=2, steps=4, sampler="ddim", seed=5, prompt="red square", guidance=5.0)

    def latents(**extra):  # the sampled latents: a 3-step model's guidance moves pixels by under one grey level
        return pipe.sample_latents(SampleSettings.build(**(kw | extra))).z

    every, plain = latents(), latents(guidance=1.0)
    # an interval below every step's t leaves the whole run unguided: the conditional model alone
    assert torch.equal(latents(guidance_max_t=0.5), plain)
    assert torch.equal(latents(guidance_max_t=1000), every)
    partial = latents(guidance_max_t=300)  # DDIM 4 steps: only the last (t < 300) guided
    assert not torch.equal(partial, every) and not torch.equal(partial, plain)
    # the model's own interval (manifest) is the default, and a call's own value replaces it
    pipe.manifest = dataclasses.replace(pipe.manifest, conditioning=dataclasses.replace(
        pipe.manifest.conditioning, guidance_max_t=0.5))
    assert torch.equal(latents(), plain)
    assert torch.equal(latents(guidance_max_t=math.inf), every)


def test_text_bad_input(captioned_run, tmp_path):
    out, cfg = captioned_run
    pipe = Pipeline.load(out)
    with pytest.raises(UserError, match="class"):
        pipe.generate(n_samples=1, steps=2, class_label=1)
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(UserError, match="guidance: must be a finite number >= 0"):
            pipe.generate(n_samples=1, steps=2, prompt="red square", guidance=bad)
    with pytest.raises(UserError, match="finite numbers >= 0"):
        pipe.generate(n_samples=1, steps=2, sampler="ddim", prompt="red square", eta=float("nan"))
    with pytest.raises(UserError, match="one prompt or one per sample"):
        pipe.generate(n_samples=3, steps=2, prompt=["a", "b"])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pipe.generate(n_samples=1, steps=2, prompt="red " * 40)
    assert any("truncated to the context length 8" in str(x.message) for x in w)
    pipe.generate(n_samples=1, steps=2, prompt="")  # empty prompt: the unconditional context, no error
    bad = load_config("digits-tiny", [f"data.source={cfg.data.source}", "data.channels=3", "data.image_size=16",
                                      "unet.in_channels=3", "unet.out_channels=3", "unet.context_dim=64"])
    with pytest.raises(UserError, match="width 384 does not match unet.context_dim 64"):
        DiffusionTrainer(bad, tmp_path / "bad", progress=False)
    digits = load_config("digits-tiny", ["unet.context_dim=384"])
    with pytest.raises(UserError, match="has no captions"):
        DiffusionTrainer(digits, tmp_path / "nocap", progress=False)


def test_unconditional_model_refuses_prompts(tiny_cfg, tmp_path):
    DiffusionTrainer(tiny_cfg, tmp_path, progress=False).run()
    with pytest.raises(UserError, match="takes no prompt"):
        Pipeline.load(tmp_path).generate(n_samples=1, steps=2, prompt="a digit")


def test_captioned_rows_layout():
    from latentdiff.data.images import captioned_rows

    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    grid = captioned_rows(images, ["a red circle", "a blue square"], 3)
    assert grid.height == 2 * (8 + 2) + 2 and grid.width > 3 * (8 + 2)
    with pytest.raises(ValueError):
        captioned_rows(images, ["one caption"], 3)


def test_autoencoder_ceiling_scores_the_reconstructions(monkeypatch):
    """A perfect autoencoder reaches the ceiling 1 (the rendered scenes all pass); one that decodes every
    scene to its mirror image (left and right swapped) fails the scenes placed off the vertical axis."""
    from latentdiff.data.shapes import make_shapes
    from latentdiff.eval.adherence import score
    from latentdiff.pipelines import demo

    class Decoder(torch.nn.Module):
        def __init__(self, mirror: bool):
            super().__init__()
            self.mirror = mirror

        def forward(self, x, sample_posterior=True):
            return (x.flip(-1) if self.mirror else x), None

    monkeypatch.setattr(demo, "load_autoencoder", lambda d: Decoder(False))
    assert demo.autoencoder_ceiling("unused", n=40) == 1.0
    monkeypatch.setattr(demo, "load_autoencoder", lambda d: Decoder(True))
    images, captions = make_shapes(40, "train", seed=123, two_object_fraction=0.0)
    expected = sum(score(x.flip(-1), c)["whole"] for x, c in zip(images, captions)) / 40
    assert demo.autoencoder_ceiling("unused", n=40) == expected < 0.9


@pytest.mark.slow
def test_demo_end_to_end_on_a_small_shapes_set(tmp_path):
    """The main job's three stages, cut to seconds: files, report keys, and a resumed second call."""
    from latentdiff.pipelines.demo import GRID_PROMPTS, GRID_SEEDS, run_demo

    small = ["data.shapes_count=256", "train.batch_size=16", "train.steps=4", "train.warmup_steps=1",
             "train.grid_samples=2", "train.grid_steps=2"]
    summary = run_demo(tmp_path, None, n_eval=2, overrides=small, log=lambda m: None)  # the presets' (4) steps
    assert (tmp_path / "prompts.png").is_file() and (tmp_path / "adherence.md").is_file()
    assert set(summary["groups"]) == {"1 object, seen", "1 object, unseen", "2 objects, seen",
                                      "2 objects, seen, layout"}
    assert all(r["n"] == 2 for r in summary["groups"].values())
    assert 0.0 <= summary["accuracy"]["whole"] <= 1.0
    assert "| prompts | n | matched |" in summary["table"]
    div = summary["diversity"]  # every grid prompt drawn DIVERSITY_SEEDS times; ratios None if too few read right
    assert div["n_prompts"] == len(GRID_PROMPTS) and set(div["groups"]) == {"1 object", "2 objects, layout"}
    ratios = [v["ratio"]["position"] for v in summary["diversity_prompts"].values()]
    assert len(ratios) == len(GRID_PROMPTS) and all(r is None or r >= 0 for r in ratios)
    assert "| prompts | prompts measured |" in summary["diversity_table"]
    assert set(summary["autoencoder_ceilings"]) == {"1 object", "2 objects"}
    assert "Diversity over 16 seeds" in (tmp_path / "adherence.md").read_text()
    from latentdiff.data.images import read_png_settings

    settings = read_png_settings(tmp_path / "prompts.png")
    assert settings["prompts"] == GRID_PROMPTS and settings["seeds"] == list(range(GRID_SEEDS))


@pytest.mark.filterwarnings("ignore:prompt .* truncated")
def test_layout_images_two_passes(captioned_run):
    """Two-object prompts: the first object's half is pass 1's image exactly, the rest is redrawn under the
    regions; one-object prompts are a plain pass; every sample keeps its seed whatever the batch holds."""
    import numpy as np

    from latentdiff.models.settings import SampleSettings
    from latentdiff.pipelines.layout import COMPOSE_BASE_SHARE, layout_images, plan

    pipe = Pipeline.load(captioned_run[0])
    prompts = ("a red circle above a blue square", "a small green cross at the top left",
               "a blue square to the right of a red circle")
    s = SampleSettings(3, 2, 3, "ddim", 7, prompt=prompts, guidance=3.0)
    images = layout_images(pipe, s)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    plain = pipe.generate(1, 1, 3, "ddim", seed=8, prompt=prompts[1], guidance=3.0, guidance_max_t=math.inf)
    assert torch.equal(images[1], plain[0])  # one object: a plain pass at its own seed
    for i, kept in ((0, np.s_[:, :8, :]), (2, np.s_[:, :, 8:])):  # "above": top half kept; "to the right of": right
        first_prompt = plan(prompts[i], (16, 16), np.random.default_rng(7 + i), COMPOSE_BASE_SHARE)[0][0]
        first = pipe.generate(1, 1, 3, "ddim", seed=7 + i, prompt=first_prompt, guidance=3.0)
        assert torch.equal(images[i][kept], first[0][kept])
        assert not torch.equal(images[i], first[0])  # the other half was redrawn
        alone = layout_images(pipe, s.replace(n_samples=1, seed=7 + i, prompt=prompts[i]))
        assert torch.equal(alone[0], images[i])
    with pytest.raises(UserError, match="sampler"):  # pass 2 inpaints by replacement: refused before pass 1
        layout_images(pipe, s.replace(sampler="dpmpp_2m"))


def test_generate_with_regions(captioned_run):
    """One full region is plain guidance; regions steer each prompt to its part; bad masks are refused."""
    pipe = Pipeline.load(captioned_run[0])
    kw = {"guidance": 3.0, "seed": 5}
    plain = pipe.generate(2, 2, 3, "ddim", prompt="green square", **kw)
    full = torch.ones(16, 16)
    one = pipe.generate(2, 2, 3, "ddim", prompt="green square", regions=[[("green square", full)]], **kw)
    assert (plain.int() - one.int()).abs().max() <= 1
    top = torch.zeros(16, 16)
    top[:8] = 1
    settings = SampleSettings.build(1, 1, 3, "ddim", prompt="red square", **kw)  # latents: this 3-step model's
    split = pipe.sample_latents(settings, regions=[[("red square", top), ("blue square", 1 - top)]]).z  # text
    red = pipe.sample_latents(settings).z  # moves pixels by under one grey level
    assert not torch.equal(split, red)
    with pytest.raises(UserError, match="add up to 1"):
        pipe.generate(1, 1, 2, "ddim", prompt="red square", regions=[[("red square", top)]])
    with pytest.raises(UserError, match="16x16"):
        pipe.generate(1, 1, 2, "ddim", prompt="red square", regions=[[("red square", torch.ones(8, 8))]])
    with pytest.raises(UserError, match="one per sample"):
        pipe.generate(3, 3, 2, "ddim", prompt="red square", regions=[[("red square", full)]] * 2)


def test_reverse_trajectory_follows_the_prompt(captioned_run):
    from latentdiff.pipelines.viz import trajectory

    pipe = Pipeline.load(captioned_run[0])
    kw = {"prompt": "green square", "negative_prompt": "red square", "guidance": 4.0}
    final = trajectory(pipe, "ddim", 3, seed=2, **kw)["x0"][-1]
    assert (final.int() - pipe.generate(1, 1, 3, "ddim", seed=2, **kw)[0].int()).abs().max() <= 1


def test_text_contexts_are_cached_only_within_the_memory_budget(captioned_run, tmp_path, monkeypatch):
    import latentdiff.training.diffusion_trainer as dt

    _, cfg = captioned_run
    assert DiffusionTrainer(cfg, tmp_path / "a", progress=False).cond.cache is not None
    monkeypatch.setattr(dt, "CACHE_BYTES", 1000)  # 3 captions x 8 tokens x 384 x 4 bytes do not fit
    trainer = DiffusionTrainer(cfg, tmp_path / "b", progress=False)
    assert trainer.cond.cache is None
    assert trainer.condition(torch.arange(4))["context"].shape == (4, 8, 384)


def test_each_distinct_prompt_is_encoded_once():
    from latentdiff.models.conditioning import Conditioner
    from latentdiff.models.unet import UNetConfig

    seen = []

    class Encoder(torch.nn.Module):
        width, context_length = 4, 3

        def forward(self, prompts):
            seen.extend(prompts)
            return torch.stack([torch.full((3, 4), float(len(p))) for p in prompts])

    cond = Conditioner(UNetConfig(context_dim=4), Encoder())
    ctx = cond.prompts(["a b", "a b", "", "a b"])["context"]
    assert sorted(seen) == ["", "a b"]  # not four encoder rows
    assert ctx.shape == (4, 3, 4) and ctx[:, 0, 0].tolist() == [3.0, 3.0, 0.0, 3.0]
