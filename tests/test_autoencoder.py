"""Autoencoder (SD-shaped VAE), posterior, latent scaling, PatchGAN, LPIPS and the autoencoder loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from latentdiff.data import DataConfig, load_dataset
from latentdiff.errors import UserError
from latentdiff.formats.checkpoint import save_tensors
from latentdiff.models.autoencoder import (Autoencoder, AutoencoderConfig, DiagonalGaussian, IdentityAutoencoder,
                                           measure_scale_factor)
from latentdiff.models.discriminator import NLayerDiscriminator, min_input_size
from latentdiff.models.perceptual import VGG16Features, build_perceptual, load_vgg16
from latentdiff.training.ae_loss import AutoencoderLoss, AutoencoderLossConfig, hinge_d_loss


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: a second thread gains nothing, and on a shared, busy CPU two spinning OpenMP
    # threads made the overfitting test 10-40x slower (measured: ~2 s with one thread, 13-77 s with two).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def digits(n: int = 16, size: int = 16) -> torch.Tensor:
    return load_dataset(DataConfig(source="digits", image_size=size, limit=64)).batch(torch.arange(n))


def diffusers_vae(diffusers, cfg: AutoencoderConfig):
    levels = len(cfg.channel_mult)
    return diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=cfg.num_res_blocks,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult), latent_channels=cfg.embed_dim,
        norm_num_groups=32)


# ------------------------------------------------------------------------------------------ autoencoder


def test_sd_parameter_count_matches_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = Autoencoder(AutoencoderConfig.sd())
        ref = diffusers_vae(diffusers, AutoencoderConfig.sd())
    assert n_params(ours) == n_params(ref) == 83_653_863
    assert AutoencoderConfig.sd().downsample_factor == 8


@pytest.mark.parametrize("mult, blocks", [((1, 2), 1), ((1, 1, 2), 2)])
def test_compvis_keys_convert_to_diffusers_and_outputs_match(mult: tuple[int, ...], blocks: int) -> None:
    """Our state dict, named like an SD single-file checkpoint, goes through diffusers' converter and agrees."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    cfg = AutoencoderConfig(in_channels=2, out_channels=3, base_channels=32, channel_mult=mult, num_res_blocks=blocks)
    ours, ref = Autoencoder(cfg).eval(), diffusers_vae(diffusers, cfg).eval()
    ldm = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    assert len(converted) == len(ldm)  # every tensor mapped
    ref.load_state_dict(converted, strict=True)
    f = cfg.downsample_factor
    x, z = torch.randn(2, 2, 16, 16), torch.randn(2, 4, 16 // f, 16 // f)
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(post.logvar, ref_post.logvar, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("f", [1, 2, 4, 8])
def test_shapes_for_each_downsampling_factor(f: int) -> None:
    levels = int(math.log2(f)) + 1
    cfg = AutoencoderConfig(in_channels=3, out_channels=3, base_channels=8, channel_mult=(1,) * levels, embed_dim=3)
    ae = Autoencoder(cfg)
    assert ae.downsample_factor == cfg.downsample_factor == f and ae.latent_channels == 3
    x = torch.randn(2, 3, 32, 32)
    recon, post = ae(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and post.mean.shape == (2, 3, 32 // f, 32 // f)
    z = ae.encode_latents(x)
    assert z.shape == (2, 3, 32 // f, 32 // f) and ae.decode_latents(z).shape == x.shape
    if f > 1:
        with pytest.raises(UserError, match=rf"divisible by .* {f}, got \(2, 3, 31, 32\)"):
            ae.encode(torch.randn(2, 3, 31, 32))
    with pytest.raises(UserError, match=r"\(B, 3, H, W\).*\(2, 1, 32, 32\)"):
        ae.encode(torch.randn(2, 1, 32, 32))
    with pytest.raises(UserError, match=r"latent must be \(B, 3, h, w\)"):
        ae.decode(torch.randn(2, 4, 4, 4))


def test_deterministic_autoencoder_without_double_z() -> None:
    ae = Autoencoder(AutoencoderConfig(base_channels=8, double_z=False))
    assert ae.encoder.conv_out.out_channels == 4 and ae.quant_conv.out_channels == 4
    post = ae.encode(torch.randn(2, 1, 8, 8))
    assert torch.equal(post.sample(), post.mode()) and torch.equal(post.kl(), torch.zeros(2))


def test_config_round_trip_and_errors() -> None:
    for cfg in (AutoencoderConfig(), AutoencoderConfig.sd(),
                AutoencoderConfig(channel_mult=[1, 2, 4], scale_factor=.5)):
        assert AutoencoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    sd = AutoencoderConfig.sd()
    assert (sd.in_channels, sd.base_channels, sd.channel_mult, sd.num_res_blocks, sd.scale_factor) == (
        3, 128, (1, 2, 4, 4), 2, 0.18215)
    with pytest.raises(UserError, match="ch_mult, z_chan"):
        AutoencoderConfig.from_dict({"z_chan": 4, "ch_mult": [1]})
    with pytest.raises(UserError, match="scale_factor"):
        AutoencoderConfig(scale_factor=0.0)
    with pytest.raises(UserError, match="channel_mult"):
        AutoencoderConfig(channel_mult=())
    for cfg in (AutoencoderLossConfig(), AutoencoderLossConfig(rec_loss="l2", perceptual="vgg16", disc_start=0)):
        assert AutoencoderLossConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="disc_strat"):
        AutoencoderLossConfig.from_dict({"disc_strat": 3})
    with pytest.raises(UserError, match="ae_loss.rec_loss"):
        AutoencoderLossConfig(rec_loss="l3")


# ------------------------------------------------------------------------------------------ posterior


def test_diagonal_gaussian_kl_nll_and_sampling() -> None:
    torch.manual_seed(0)
    params = torch.randn(3, 8, 5, 5)
    post = DiagonalGaussian(params)
    mean, logvar = params[:, :4], params[:, 4:]
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(post.kl(), torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)))
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(post.nll(x), -q.log_prob(x).sum(dim=(1, 2, 3)))
    assert torch.equal(post.mode(), mean)
    # logvar clamped to [-30, 20] as CompVis
    extreme = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 99.0)], 1))
    assert extreme.logvar.item() == 20.0
    # reproducible with a seeded CPU generator; moments match
    s1, s2 = (post.sample(torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(s1, s2) and not torch.equal(s1, post.sample(torch.Generator().manual_seed(8)))
    mean_logvar = [torch.full((4000, 1, 2, 2), 1.5), torch.full((4000, 1, 2, 2), math.log(4.0))]
    wide = DiagonalGaussian(torch.cat(mean_logvar, 1))  # N(1.5, 2²)
    draws = wide.sample(torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 1.5) < 0.05 and abs(draws.std().item() - 2.0) < 0.05


def test_latent_scaling_and_identity_autoencoder() -> None:
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(base_channels=8, scale_factor=0.18215, shift_factor=0.3)).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        mode = ae.encode(x).mode()
        z = ae.encode_latents(x)
        assert torch.equal(z, 0.18215 * (mode - 0.3))  # z = s · (E(x) − shift), DESIGN.md
        torch.testing.assert_close(ae.decode_latents(z), ae.decode(mode), atol=1e-5, rtol=1e-5)  # x̂ = D(z / s + shift)
        ae.config.scale_factor, ae.config.shift_factor = 0.25, 0.0  # a power of two: the round trip is bit-exact
        assert torch.equal(ae.decode_latents(ae.encode_latents(x)), ae.decode(mode))
        g = torch.Generator().manual_seed(3)
        sampled = ae.encode_latents(x, generator=g, sample=True)
        assert torch.equal(sampled, ae.encode_latents(x, generator=torch.Generator().manual_seed(3), sample=True))
        assert not torch.equal(sampled, z)
    latents = 7.0 * torch.randn(64, 4, 4, 4) + 2.0
    s = measure_scale_factor(latents)
    assert abs((s * latents).std().item() - 1.0) < 1e-6 and abs(s - 1 / 7) < 0.01
    with pytest.raises(UserError, match="standard deviation"):
        measure_scale_factor(torch.ones(3, 4))
    ident = IdentityAutoencoder(channels=3)
    x = torch.randn(2, 3, 5, 7)
    assert ident.downsample_factor == 1 and ident.latent_channels == 3 and ident.scale_factor == 1.0
    assert torch.equal(ident.decode_latents(ident.encode_latents(x)), x)
    with pytest.raises(UserError, match=r"\(B, 3, H, W\)"):
        ident.encode_latents(torch.randn(2, 1, 4, 4))


# ------------------------------------------------------------------------------------------ discriminator


def test_patchgan_shapes_init_and_too_small_input() -> None:
    d = NLayerDiscriminator(in_channels=1, ndf=16, n_layers=2)
    assert d(torch.randn(2, 1, 28, 28)).shape == (2, 1, 5, 5)
    assert d(torch.randn(2, 1, 32, 32)).shape == (2, 1, 6, 6)
    assert NLayerDiscriminator(3, 8, 3)(torch.randn(2, 3, 28, 28)).shape == (2, 1, 1, 1)
    assert NLayerDiscriminator(1, 8, 2, norm="group")(torch.randn(1, 1, 12, 12)).shape == (1, 1, 1, 1)
    assert [min_input_size(n) for n in (1, 2, 3)] == [6, 12, 24]
    assert isinstance(d.main[3], nn.BatchNorm2d) and d.main[2].bias is None  # CompVis layout: main.{i}
    big = NLayerDiscriminator(3, 64, 3)
    assert abs(big.main[5].weight.std().item() - 0.02) < 0.002  # weights_init N(0, 0.02)
    with pytest.raises(UserError, match=r"too small for n_layers=3.*>= 24"):
        big(torch.randn(1, 3, 20, 20))


# ------------------------------------------------------------------------------------------ perceptual


def test_random_lpips_properties() -> None:
    lp = build_perceptual()
    assert all(not p.requires_grad for p in lp.parameters())
    lp.train()
    assert not lp.training  # stays a fixed metric
    x = digits(8)
    g = torch.Generator().manual_seed(0)
    noisy = [x + s * torch.randn(x.shape, generator=g) for s in (0.05, 0.1, 0.2)]
    assert torch.equal(lp(x, x), torch.zeros(8))
    torch.testing.assert_close(lp(x, noisy[0]), lp(noisy[0], x))
    d = [lp(x, y).mean().item() for y in noisy]
    assert 0 < d[0] < d[1] < d[2], d
    # deterministic across builds (seeded CPU generator), grey == grey repeated to RGB
    again = build_perceptual("random")
    assert all(torch.equal(a, b) for a, b in zip(lp.state_dict().values(), again.state_dict().values()))
    assert torch.equal(lp(x, noisy[1]), again(x, noisy[1]))
    torch.testing.assert_close(lp(x, noisy[1]), lp(x.repeat(1, 3, 1, 1), noisy[1].repeat(1, 3, 1, 1)))
    # gradients reach the input (it is a loss), not the frozen network
    y = noisy[2].clone().requires_grad_(True)
    lp(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert lp(torch.randn(1, 3, 5, 7), torch.randn(1, 3, 5, 7)).shape == (1,)  # any size works
    with pytest.raises(UserError, match="one shape"):
        lp(x, x[:, :, :8])
    with pytest.raises(UserError, match="unknown perceptual network 'alex'"):
        build_perceptual("alex")
    with pytest.raises(UserError, match="takes no weights file"):
        build_perceptual("random", weights="vgg.pth")
    with pytest.raises(UserError, match="needs a weights file"):
        build_perceptual("vgg16")


class NotATensor:  # a pickled object of this class must be refused by weights_only loading
    pass


def test_vgg16_lpips_weight_files(tmp_path) -> None:
    torch.manual_seed(0)
    state = VGG16Features().state_dict()
    assert list(state)[:2] == ["features.0.weight", "features.0.bias"] and "features.28.weight" in state
    save_tensors(state, tmp_path / "vgg.safetensors")
    torch.save({**state, "classifier.0.weight": torch.zeros(2, 2)}, tmp_path / "vgg.pth")  # classifier ignored
    a = build_perceptual("vgg16", str(tmp_path / "vgg.safetensors"))
    b = build_perceptual("vgg16", str(tmp_path / "vgg.pth"))
    assert torch.equal(a.net.features[28].weight, state["features.28.weight"])
    x, y = digits(2), digits(4)[2:]
    assert torch.equal(a(x, x), torch.zeros(2)) and (a(x, y) > 0).all()
    torch.testing.assert_close(a(x, y), b(x, y))
    # official LPIPS calibration layout: lin{i}.model.1.weight of shape (1, C_i, 1, 1), non-negative
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / "lin.pth")
    c = build_perceptual("vgg16", str(tmp_path / "vgg.pth"), str(tmp_path / "lin.pth"))
    assert torch.equal(c.lins[4].weight, lins["lin4.model.1.weight"])
    assert not torch.allclose(c(x, y), a(x, y))
    # errors: wrong shape names key and shapes; negative lins; pickled non-tensors; small images
    save_tensors({**state, "features.0.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match=r"features\.0\.weight has shape \(32, 3, 3, 3\), expected \(64, 3, 3, 3\)"):
        build_perceptual("vgg16", str(tmp_path / "bad.safetensors"))
    save_tensors({**lins, "lin2.model.1.weight": -torch.ones(1, 256, 1, 1)}, tmp_path / "neg.safetensors")
    with pytest.raises(UserError, match=r"lin2\.model\.1\.weight has negative"):
        c.load_lin_weights(tmp_path / "neg.safetensors")
    torch.save({"features.0.weight": state["features.0.weight"], "x": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match=r"evil\.pth: refused.*weights_only"):
        build_perceptual("vgg16", str(tmp_path / "evil.pth"))
    with pytest.raises(UserError, match="at least 16x16"):
        a(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(UserError, match="missing key features.0.weight"):
        load_vgg16(VGG16Features(), tmp_path / "lin.pth")


# ------------------------------------------------------------------------------------------ loss


def _tiny() -> tuple[Autoencoder, torch.Tensor]:
    torch.manual_seed(0)
    return Autoencoder(AutoencoderConfig(base_channels=8)), torch.rand(2, 1, 16, 16) * 2 - 1


def test_adaptive_weight_matches_hand_computation() -> None:
    ae, x = _tiny()
    loss_fn = AutoencoderLoss(AutoencoderLossConfig(perceptual_weight=0.0, disc_start=0, disc_weight=0.5, disc_ndf=8))
    recon, post = ae(x, generator=torch.Generator().manual_seed(0))
    loss, logs = loss_fn.generator_loss(x, recon, post, step=0, last_layer=ae.last_layer)
    # by hand: L_nll with logvar 0, L_G = −mean D(x̂), λ = 0.5 · ‖∇L_nll‖ / (‖∇L_G‖ + 1e-4) at the last layer
    nll = (x - recon).abs().sum() / 2
    g_loss = -loss_fn.discriminator(recon).mean()
    g_nll, g_g = (torch.autograd.grad(t, ae.last_layer, retain_graph=True)[0] for t in (nll, g_loss))
    lam = 0.5 * (g_nll.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4)
    assert logs["d_weight"] == pytest.approx(lam.item(), rel=1e-5)
    assert logs["disc_factor"] == 1.0 and logs["g_loss"] == pytest.approx(g_loss.item(), rel=1e-5)
    expected = nll + 1e-6 * post.kl().sum() / 2 + lam * g_loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert ae.last_layer.grad is not None
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())  # generator step leaves D alone
    assert all(p.requires_grad for p in loss_fn.discriminator.parameters())


def test_disc_start_perceptual_term_and_hinge() -> None:
    ae, x = _tiny()
    loss_fn = AutoencoderLoss(AutoencoderLossConfig(disc_start=10, disc_ndf=8))
    recon, post = ae(x, sample_posterior=False)
    before, logs = loss_fn.generator_loss(x, recon, post, step=9, last_layer=ae.last_layer)
    assert logs["disc_factor"] == 0.0 and logs["d_weight"] == 0.0 and not loss_fn.discriminator_active(9)
    assert before.item() == pytest.approx(logs["nll"] + 1e-6 * logs["kl"], rel=1e-6)
    _, logs_on = loss_fn.generator_loss(x, recon, post, step=10, last_layer=ae.last_layer)
    assert logs_on["disc_factor"] == 1.0 and logs_on["d_weight"] > 0 and loss_fn.discriminator_active(10)
    # perceptual term: per-sample LPIPS added on every pixel (LDM), so nll grows by C·H·W · mean LPIPS
    no_p = AutoencoderLoss(AutoencoderLossConfig(perceptual_weight=0.0, disc_start=10, disc_ndf=8))
    _, logs_no_p = no_p.generator_loss(x, recon, post, step=0, last_layer=ae.last_layer)
    assert logs["nll"] - logs_no_p["nll"] == pytest.approx(256 * logs["perceptual"], rel=1e-4)
    # discriminator: zero (with zero gradients) before disc_start, hinge afterwards
    d_loss, _ = loss_fn.discriminator_loss(x, recon, step=9)
    d_loss.backward()
    assert d_loss.item() == 0.0 and all(p.grad.abs().sum() == 0 for p in loss_fn.discriminator_parameters())
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    loss_fn.discriminator = nn.Identity()  # the "logits" are the images themselves
    d_loss, logs_d = loss_fn.discriminator_loss(real.view(1, 1, 1, 3), fake.view(1, 1, 1, 3), step=10)
    assert d_loss.item() == pytest.approx(5 / 6) and logs_d["logits_real"] == pytest.approx(0.5)
    assert loss_fn.autoencoder_parameters() == [loss_fn.logvar]


def test_tiny_autoencoder_overfits_digits() -> None:
    """f = 2, 16 digits at 16 px: the full loss (L1 + random LPIPS + KL) reaches > 20 dB PSNR quickly."""
    x = digits(16)
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(base_channels=8, channel_mult=(1, 2)))
    loss_fn = AutoencoderLoss(AutoencoderLossConfig(disc_start=10**9, disc_ndf=8))
    opt = torch.optim.Adam([*ae.parameters(), *loss_fn.autoencoder_parameters()], lr=3e-3)
    g, psnr = torch.Generator().manual_seed(0), 0.0
    for step in range(150):  # ~45 steps are needed
        recon, post = ae(x, generator=g)
        loss, _ = loss_fn.generator_loss(x, recon, post, step, ae.last_layer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 5 == 4:
            with torch.no_grad():
                mse = (ae(x, sample_posterior=False)[0].clamp(-1, 1) - x).square().mean().item()
            psnr = 10 * math.log10(4.0 / mse)  # peak-to-peak 2 for images in [-1, 1]
            if psnr > 20:
                break
    assert psnr > 20, f"PSNR {psnr:.1f} dB after {step + 1} steps"
