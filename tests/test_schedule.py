"""The forward process, posterior and parameterisations against formulas and Monte-Carlo estimates."""

import pytest
import torch

from latentdiff.diffusion import Schedule, diffusion_loss, loss_weight, posterior_between
from latentdiff.errors import UserError


def test_abar_T_reported_for_each_schedule():
    abar_T = {n: float(Schedule.from_name(n).alphas_cumprod[-1]) for n in ("linear", "cosine", "scaled_linear")}
    print("abar_T:", abar_T)  # linear 4.0e-5, cosine ~2e-9, scaled_linear 4.7e-3 (SD is not quite N(0, I) at T)
    assert 3.9e-5 < abar_T["linear"] < 4.2e-5
    assert abar_T["cosine"] < 1e-8
    assert 4.6e-3 < abar_T["scaled_linear"] < 4.7e-3


@pytest.mark.parametrize("name,kw", [("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
                                     ("linear", dict(beta_start=1e-4, beta_end=0.02)),
                                     ("squaredcos_cap_v2", {})])
def test_schedules_equal_diffusers(name, kw):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kw)
    ours = Schedule.from_name({"squaredcos_cap_v2": "cosine"}.get(name, name))
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_stable_diffusion_values():
    s = Schedule.from_name("scaled_linear")
    assert float(s.betas[0]) == pytest.approx(0.00085, rel=1e-12)
    assert float(s.betas[-1]) == pytest.approx(0.012, rel=1e-12)
    # the well-known SD numbers: sqrt(abar_999) and the sigma range used by k-diffusion
    assert float(s.sigmas[0]) == pytest.approx(0.0292, abs=1e-4)
    assert float(s.sigmas[-1]) == pytest.approx(14.6146, abs=1e-3)
    torch.testing.assert_close(s.log_snr, torch.log(s.sigmas ** -2))


def test_q_sample_moments_monte_carlo():
    s = Schedule.from_name("linear")
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([1.5, -0.7], dtype=torch.float64)
    for t in (0, 100, 500, 999):
        noise = torch.randn(200_000, 2, generator=g, dtype=torch.float64)
        z = s.q_sample(x.expand(200_000, 2), torch.full((200_000,), t), noise)
        a = s.alphas_cumprod[t]
        torch.testing.assert_close(z.mean(0), a.sqrt() * x, atol=0.01, rtol=0)
        torch.testing.assert_close(z.var(0), (1 - a).expand(2), atol=0.01, rtol=0.01)


def test_stepwise_forward_process_matches_closed_form():
    """Chaining (20.3) t times has the moments of the kernel (20.6)."""
    s = Schedule.from_name("cosine", num_timesteps=50)
    g = torch.Generator().manual_seed(1)
    n, x = 100_000, 0.8
    z = torch.full((n, 1), x, dtype=torch.float64)
    for t in range(30):
        z = s.q_step_sample(z, torch.full((n,), t), torch.randn(n, 1, generator=g, dtype=torch.float64))
    a = s.alphas_cumprod[29]
    assert float(z.mean()) == pytest.approx(float(a.sqrt() * x), abs=0.01)
    assert float(z.var()) == pytest.approx(float(1 - a), abs=0.01)


def test_posterior_is_the_product_of_gaussians():
    """q(z_{t-1}|z_t,x) ∝ q(z_t|z_{t-1}) q(z_{t-1}|x): precision and mean of the product, in closed form."""
    s = Schedule.from_name("linear")
    x = torch.tensor([0.3, -1.0], dtype=torch.float64)
    zt = torch.tensor([0.5, 0.2], dtype=torch.float64)
    for t in (1, 10, 400, 999):
        b, a_prev = s.betas[t], s.alphas_cumprod[t - 1]
        prec = (1 - b) / b + 1 / (1 - a_prev)
        mean = ((1 - b).sqrt() * zt / b + a_prev.sqrt() * x / (1 - a_prev)) / prec
        m, v = s.posterior(x[None], zt[None], torch.tensor([t]))
        torch.testing.assert_close(m[0], mean)
        torch.testing.assert_close(v[0], (1 / prec).expand(2))


def test_posterior_monte_carlo():
    """Draw (z_{t-1}, z_t) from the forward process; regress z_{t-1} on z_t: slope, offset, residual."""
    s = Schedule.from_name("linear")
    g = torch.Generator().manual_seed(2)
    n, x, t = 400_000, 0.9, 300
    z_prev = s.q_sample(torch.full((n, 1), x, dtype=torch.float64), torch.full((n,), t - 1),
                        torch.randn(n, 1, generator=g, dtype=torch.float64))
    z_t = s.q_step_sample(z_prev, torch.full((n,), t), torch.randn(n, 1, generator=g, dtype=torch.float64))
    A = torch.cat([z_t, torch.ones_like(z_t)], 1)
    coef = torch.linalg.lstsq(A, z_prev).solution.squeeze()
    resid = (z_prev - A @ coef[:, None]).var()
    # the posterior mean is linear in z_t: m = c_x x + c_z z_t; read c_z and c_x off (20.14)
    m0, var = s.posterior(torch.tensor([[x]]), torch.tensor([[0.0]]), torch.tensor([t]))
    m1, _ = s.posterior(torch.tensor([[x]]), torch.tensor([[1.0]]), torch.tensor([t]))
    assert float(coef[0]) == pytest.approx(float(m1 - m0), abs=5e-3)
    assert float(coef[1]) == pytest.approx(float(m0), abs=5e-3)
    assert float(resid) == pytest.approx(float(var), rel=0.02)


def test_posterior_at_first_step_is_the_data():
    s = Schedule.from_name("linear")
    x, z = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    m, v = s.posterior(x, z, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(m, x)
    assert float(v.abs().max()) == 0.0
    m2, _ = posterior_between(x, z, s.alphas_cumprod[0], 1.0)
    torch.testing.assert_close(m2, x)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
def test_parameterisations_round_trip(name):
    s = Schedule.from_name(name)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1000, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(1000, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (1000,), generator=g)
    z = s.q_sample(x0, t, eps)
    v = s.v_target(x0, t, eps)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.eps_to_x0(z, t, eps), x0, **tol)
    torch.testing.assert_close(s.x0_to_eps(z, t, x0), eps, **tol)
    torch.testing.assert_close(s.v_to_eps(z, t, v), eps, **tol)
    torch.testing.assert_close(s.v_to_x0(z, t, v), x0, **tol)
    for kind, pred in (("eps", eps), ("x0", x0), ("v", v)):
        torch.testing.assert_close(s.to_eps(pred, z, t, kind), eps, **tol)
        torch.testing.assert_close(s.target(x0, t, eps, kind), pred)
    # float32 keeps the conversions to 1e-5 away from the noisiest steps (1/√ᾱ amplifies rounding)
    t32 = t.clamp(max=600)
    z32, e32 = s.q_sample(x0.float(), t32, eps.float()), eps.float()
    torch.testing.assert_close(s.x0_to_eps(z32, t32, s.eps_to_x0(z32, t32, e32)), e32, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_min_snr_weights_agree_across_parameterisations(offset):
    """With λ(t) from loss_weight, the ε-, x0- and v-losses of the same prediction are equal, and the
    x0-loss weight is min(SNR + offset, 5): Min-SNR-γ, or with offset 1 the v-loss capped."""
    s = Schedule.from_name("linear")
    g = torch.Generator().manual_seed(4)
    t = torch.arange(0, 1000, 37)
    x0 = torch.randn(len(t), 5, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 5, generator=g, dtype=torch.float64)
    z = s.q_sample(x0, t, eps)
    eps_hat = eps + 0.1 * torch.randn(len(t), 5, generator=g, dtype=torch.float64)
    preds = {"eps": eps_hat, "x0": s.eps_to_x0(z, t, eps_hat)}
    preds["v"] = s.v_target(preds["x0"], t, eps_hat)
    losses = {k: loss_weight(s, t, k, "min_snr", 5.0, offset).double() * (p - s.target(x0, t, eps, k)).pow(2).mean(1)
              for k, p in preds.items()}
    torch.testing.assert_close(losses["x0"], losses["eps"])
    torch.testing.assert_close(losses["v"], losses["eps"])
    snr = s.snr(t)
    w_x0 = (snr + offset).clamp(max=5).double()
    torch.testing.assert_close(loss_weight(s, t, "x0", "min_snr", 5.0, offset).double(), w_x0, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_weight(s, t, "eps", "min_snr", 5.0, offset).double(), w_x0 / snr, rtol=1e-6, atol=0)
    if offset == 1:  # the noisiest steps keep the plain v-loss's weight 1
        assert loss_weight(s, t[-1:], "v", "min_snr", 5.0, offset).item() == pytest.approx(1.0)


def test_diffusion_loss_of_the_exact_denoiser_is_its_variance():
    """For Gaussian data the exact ε-predictor's loss is E_t[1 - (1-ᾱ)/(ᾱ s² + 1-ᾱ)] (per dim); a wrong one is worse."""
    s = Schedule.from_name("linear", num_timesteps=100)
    g = torch.Generator().manual_seed(5)
    sd, n = 0.5, 200_000
    x0 = sd * torch.randn(n, 1, generator=g)

    def exact(z, t):
        a = s.alphas_cumprod[t].float()[:, None]
        return (1 - a).sqrt() * z / (a * sd**2 + 1 - a)

    a = s.alphas_cumprod.float()
    expected = float((1 - (1 - a) / (a * sd**2 + 1 - a)).mean())
    loss = float(diffusion_loss(exact, x0, s, generator=g))
    assert loss == pytest.approx(expected, rel=0.02)
    assert float(diffusion_loss(lambda z, t: 0.9 * exact(z, t), x0, s, generator=g)) > loss * 1.01


def test_bad_names_are_user_errors():
    with pytest.raises(UserError, match="unknown schedule"):
        Schedule.from_name("quadratic")
    with pytest.raises(UserError, match="betas"):
        Schedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(UserError, match="prediction"):
        Schedule.from_name("linear").to_eps(torch.zeros(1), torch.zeros(1), torch.zeros(1), "score")


def test_abar_at_values_unchanged_and_no_host_read_back(monkeypatch):
    """abar_at (what v and x0 models go through every sampler step) looks ᾱ up where t lives: same values as
    the table and as 1/(1+σ(t)²) between timesteps, and no .cpu()/.item()/bool()/float() on the way (each
    of those is a host sync per step when t is on a GPU; before, the fractional path called t.cpu())."""
    from latentdiff.diffusion.schedule import interp_log_sigma
    s = Schedule.from_name("linear")
    ints, frac = torch.tensor([0, 1, 500, 999]), torch.tensor([0.0, 0.5, 17.25, 998.75], dtype=torch.float64)
    expect_frac = 1 / (1 + interp_log_sigma(s.sigmas.log(), frac).exp() ** 2)  # the formula, from the table
    calls = []
    for name in ("cpu", "item", "__bool__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (calls.append(_n),
                                                                                             _o(self, *a, **k))[1])
    likes = (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 2, 2))
    got = [(s.abar_at(ints, like), s.abar_at(frac, like)) for like in likes]
    monkeypatch.undo()
    assert calls == []
    for like, (got_int, got_frac) in zip(likes, got):
        assert got_int.shape == got_frac.shape == (4,) + (1,) * (like.ndim - 1) and got_int.dtype == like.dtype
        torch.testing.assert_close(got_int.flatten(), s.alphas_cumprod[ints].to(like.dtype), rtol=0, atol=0)
        torch.testing.assert_close(got_frac.flatten(), expect_frac.to(like.dtype), rtol=0, atol=0)
    assert s._tables(torch.device("cpu"))[0] is s._tables(torch.device("cpu"))[0]  # the lookup tables are cached
