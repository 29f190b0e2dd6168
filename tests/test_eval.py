"""Sample-quality and reconstruction metrics: closed forms, references, the Inception port, shipped classifiers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.linalg
import torch

from latentdiff.data import DataConfig, load_dataset
from latentdiff.errors import UserError
from latentdiff.eval import (
    DomainFeatures,
    build_extractor,
    evaluate,
    feature_stats,
    fid_from_features,
    frechet_distance,
    mmd_rbf,
    precision_recall,
    psnr,
    reconstruction_report,
    ssim,
)
from latentdiff.eval.features import accuracy
from latentdiff.formats.checkpoint import save_tensors
from latentdiff.models.inception import FIDInceptionV3, load_fid_inception


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ------------------------------------------------------------------------------------------- FID


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_sqrtm_reference():
    rng = np.random.default_rng(1)
    for d in (3, 16, 64):
        mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), random_spd(rng, d), random_spd(rng, d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert isinstance(got, float)
        assert got == pytest.approx(ref, rel=1e-6)


def test_fid_self_zero_and_grows_with_mean_shift():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((500, 8))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-9)
    fids = [fid_from_features(f, f + s) for s in (0.5, 1.0, 2.0)]
    assert fids[0] < fids[1] < fids[2]
    assert fids[2] == pytest.approx(8 * 4.0, rel=1e-9)  # a pure shift adds exactly ‖δ‖²


def test_feature_stats_and_bad_shapes():
    mu, sigma = feature_stats(np.arange(12.0).reshape(4, 3))
    assert mu.shape == (3,) and sigma.shape == (3, 3)
    with pytest.raises(UserError, match=r"\(N, D\)"):
        fid_from_features(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(UserError, match="width"):
        fid_from_features(np.zeros((5, 3)), np.zeros((5, 2)))


# ------------------------------------------------------------------------------------- MMD, P/R


def test_mmd_unbiased_near_zero_same_distribution_positive_when_shifted():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((400, 4)), rng.standard_normal((400, 4))
    same = mmd_rbf(x, y, sigma=1.0)
    shifted = mmd_rbf(x, y + 1.0, sigma=1.0)
    # Closed form for N(0, I) vs N(δ, I) in d dims with σ = 1: MMD² = 2·3^(-d/2)·(1 - exp(-‖δ‖²/6)).
    exact = 1000 * 2 * 3.0**-2 * (1 - np.exp(-4 / 6))
    assert abs(same) < 5 and shifted == pytest.approx(exact, rel=0.2)
    assert mmd_rbf(x, y, sigma=1.0) == same  # deterministic


def blobs(rng: np.random.Generator, centres: list[int], n: int) -> np.ndarray:
    means = np.array([[0, 0], [0, 20], [20, 0], [20, 20]])[centres]  # far-apart 2-d modes
    return np.concatenate([m + rng.standard_normal((n, 2)) for m in means])


def test_precision_recall_identical_and_half_modes():
    rng = np.random.default_rng(4)
    real = blobs(rng, [0, 1, 2, 3], 250)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    fake = blobs(rng, [0, 1], 500)  # covers half the real modes, and only real ones
    p, r = precision_recall(real, fake, k=3)
    assert p > 0.9
    assert 0.4 < r <= 0.5
    with pytest.raises(UserError, match="k"):
        precision_recall(real[:3], fake[:3], k=3)


# ------------------------------------------------------------------------------------ PSNR, SSIM


def test_psnr_known_value():
    a = torch.zeros(2, 1, 8, 8)
    b = torch.full((2, 1, 8, 8), 10.0)
    assert psnr(a, b, 255.0) == pytest.approx(10 * np.log10(255.0**2 / 100.0))
    assert psnr(a, a, 1.0) == float("inf")


def ssim_numpy(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Direct formula: each valid 11x11 window, Gaussian weights σ = 1.5, population moments."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_identical_and_matches_formula():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (16, 14)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 30, x.shape), 0, 255)
    t = lambda a: torch.from_numpy(a)[None, None]  # noqa: E731
    assert ssim(t(x), t(x), 255.0) == pytest.approx(1.0, abs=1e-12)
    assert ssim(t(x), t(y), 255.0) == pytest.approx(ssim_numpy(x, y, 255.0), rel=1e-9)
    rgb = torch.from_numpy(rng.integers(0, 256, (2, 3, 12, 12)).astype(np.uint8))
    assert ssim(rgb, rgb, 255.0) == pytest.approx(1.0)
    with pytest.raises(UserError, match="window"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 1.0)


# ------------------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> str:
    """Random FID-Inception weights saved the way pytorch-fid's file is keyed (plus its fc head)."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    path = tmp_path_factory.mktemp("inception") / "random.pth"
    torch.save(state, path)
    return str(path)


def test_inception_random_weights_shapes_deterministic_and_round_trip(inception_file, tmp_path):
    ext = build_extractor("inception", inception_file)
    imgs = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f1 = ext(imgs)
    assert f1.shape == (2, 2048) and f1.dtype == np.float64 and np.isfinite(f1).all()
    assert np.array_equal(f1, ext(imgs))
    # The same weights through safetensors: an identical network (so identical features).
    st = tmp_path / "inception.safetensors"
    save_tensors(ext.model.state_dict(), st)
    again = load_fid_inception(st).state_dict()
    assert all(torch.equal(again[k], v) for k, v in ext.model.state_dict().items())
    # torchvision's Inception3 has 27,161,264 parameters; without AuxLogits (3,326,696) and fc (2,049,000):
    assert sum(p.numel() for p in ext.model.parameters()) == 21_785_568


def test_inception_wrong_shape_names_key(inception_file, tmp_path):
    state = torch.load(inception_file, weights_only=True)
    state["Mixed_6b.branch1x1.conv.weight"] = torch.zeros(192, 768, 3, 3)
    bad = tmp_path / "bad.safetensors"
    save_tensors(state, bad)
    with pytest.raises(UserError, match=r"Mixed_6b\.branch1x1\.conv\.weight.*\(192, 768, 3, 3\).*\(192, 768, 1, 1\)"):
        load_fid_inception(bad)
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head: not FID's network
    save_tensors(state, bad)
    with pytest.raises(UserError, match="fc.weight"):
        load_fid_inception(bad)


class _Exploit:
    """Unpickling this would create a file: weights_only loading must refuse it before that."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pth_with_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"Conv2d_1a_3x3.conv.weight": _Exploit(str(marker))}, f, protocol=2)
    with pytest.raises(UserError, match="evil.pth"):
        load_fid_inception(evil)
    zipped = tmp_path / "evil_zip.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _Exploit(str(marker))}, zipped)  # torch's own zip format
    with pytest.raises(UserError, match="evil_zip.pth"):
        load_fid_inception(zipped)
    assert not marker.exists()
    plain = tmp_path / "list.pth"
    torch.save([1, 2, 3], plain)  # loads under weights_only but is no state dict
    with pytest.raises(UserError, match="state dict"):
        load_fid_inception(plain)
    with pytest.raises(UserError, match="not found"):
        build_extractor("inception", str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------- shipped domain classifiers


@pytest.mark.parametrize("name, minimum", [("fashion-mnist", 0.88), ("mnist5k", 0.95)])
def test_shipped_classifier_accuracy(name, minimum):
    ext = build_extractor(f"domain:{name}")
    assert isinstance(ext, DomainFeatures) and ext.name == f"domain:{name}"
    stated = ext.metrics["test_accuracy"]
    assert stated >= minimum
    test = load_dataset(DataConfig(source=name, split="test", limit=1000))  # mnist5k holds ~500 test images
    acc = accuracy(ext, test.images, test.labels)
    assert acc >= minimum
    if len(test) == ext.metrics["n_test"]:  # the whole split: exactly the stated number
        assert acc == pytest.approx(stated)
    # RGB and larger inputs are converted to what the network was trained on.
    rgb_big = test.images[:8].repeat(1, 3, 1, 1).repeat_interleave(2, -1).repeat_interleave(2, -2)
    feats = ext(rgb_big)
    assert feats.shape == (8, 128) and feats.dtype == np.float64
    assert (ext.logits(rgb_big).argmax(1) == ext.logits(test.images[:8]).argmax(1)).mean() >= 0.75


def test_build_extractor_errors():
    with pytest.raises(UserError, match="domain:fashion-mnist"):
        build_extractor("clip")
    with pytest.raises(UserError, match="shipped"):
        build_extractor("domain:cifar10")
    with pytest.raises(UserError, match="path"):
        build_extractor("inception")


# ---------------------------------------------------------------------------------------- reports


def test_evaluate_deterministic_and_zero_for_copy():
    ext = build_extractor("domain:mnist5k")
    real = load_dataset(DataConfig(source="mnist5k", split="train", limit=300)).images
    other = load_dataset(DataConfig(source="mnist5k", split="test", limit=300)).images
    r1 = evaluate(real, real.clone(), ext)
    assert r1["fid"] == pytest.approx(0.0, abs=1e-6) and (r1["precision"], r1["recall"]) == (1.0, 1.0)
    assert r1["n_real"] == r1["n_fake"] == 300 and r1["feature"] == "domain:mnist5k"
    noisy = (other.float() + 60 * torch.randn(other.shape, generator=torch.Generator().manual_seed(0)))
    noisy = noisy.clamp(0, 255).to(torch.uint8)
    r2, r3 = evaluate(real, noisy, ext), evaluate(real, noisy, ext)
    assert r2 == r3  # bit-identical numbers
    assert r2["fid"] > r1["fid"] + 1 and r2["cmmd"] > 0
    with pytest.raises(UserError, match="uint8"):
        evaluate(real.float(), real, ext)


def test_reconstruction_report():
    imgs = load_dataset(DataConfig(source="mnist5k", split="test", limit=64)).images
    same = reconstruction_report(imgs, imgs.clone(), build_extractor("domain:mnist5k"))
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0)
    assert same["rfid"] == pytest.approx(0, abs=1e-6) and same["feature"] == "domain:mnist5k"
    noisy = (imgs.int() + torch.randint(-20, 21, imgs.shape, generator=torch.Generator().manual_seed(1)))
    r = reconstruction_report(imgs, noisy.clamp(0, 255).to(torch.uint8))
    assert 20 < r["psnr"] < 40 and 0 < r["ssim"] < 1 and "rfid" not in r
