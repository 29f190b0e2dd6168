"""Every sampler against data whose exact denoiser is known in closed form: a Gaussian and a mixture.

The certificate (docs/samplers.md): each sampler's samples approach the data distribution as steps grow
and are within a measured tolerance at 100 steps; the deterministic solvers show their order against a
reference solution from the same noise; the adaptive solver meets its tolerance with fewer network
evaluations (NFE) than a fixed-step solver; the samplers agree with diffusers' schedulers.

Noise for the distribution tests is quasi-random (scrambled Sobol, moment-matched), so a deterministic
sampler's error is its discretisation error rather than Monte-Carlo error.
"""

import inspect
import math

import pytest
import torch

from latentdiff.diffusion import SAMPLERS, SPACINGS, NonFiniteError, Schedule, sample, sigmas_for, timesteps_for
from latentdiff.diffusion.exact import GAUSSIAN, MIXTURE, qmc_normal
from latentdiff.errors import UserError

LINEAR = Schedule.from_name("linear")
STOCHASTIC = ("ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde")
FEW_STEP = ("lcm",)  # needs a consistency model, not a denoiser: its own certificate below
FIXED_STEP = [s for s in SAMPLERS if s != "dpm_adaptive" and s not in FEW_STEP]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # small float64 batches: one thread is as fast and leaves the other cores alone


# The data: x ~ N(μ, diag s²) in 3-D and a 2-component Gaussian mixture in 2-D, their exact ε-models
# (closed-form E[x | z_t], then (20.8)) and distances in latentdiff.diffusion.exact.
MU, SD = GAUSSIAN.mu, GAUSSIAN.sd
W, M = MIXTURE.weights, MIXTURE.means
exact_eps = GAUSSIAN.eps_fn
w2, sliced_w2, mode_stats = GAUSSIAN.w2, MIXTURE.sliced_w2, MIXTURE.mode_stats
NOISE = {"gauss": qmc_normal(8192, 3), "mixture": qmc_normal(8192, 2)}
EPS = {"gauss": GAUSSIAN.eps_fn, "mixture": MIXTURE.eps_fn}


def test_exact_denoisers_are_posterior_means():
    """ε̂ = E[ε | z_t] exactly when the residual ε - ε̂(z_t) is orthogonal to every function of z_t:
    checked by Monte-Carlo on a few functions (within 4.5 standard errors) at three noise levels."""
    one = type(MIXTURE)(W[:1] / W[:1], M[:1], MIXTURE.sds[:1])  # one component: the Gaussian's ε̂
    z, t = torch.randn(64, 2, dtype=torch.float64), torch.full((64,), 400, dtype=torch.long)
    torch.testing.assert_close(one.eps_fn(LINEAR)(z, t), type(GAUSSIAN)(M[0], MIXTURE.sds[0]).eps_fn(LINEAR)(z, t))
    g = torch.Generator().manual_seed(0)
    n = 50_000
    gauss_x = MU + SD * torch.randn(n, 3, generator=g, dtype=torch.float64)
    for data, x in ((GAUSSIAN, gauss_x), (MIXTURE, MIXTURE.sample(n, g))):
        for t in (100, 400, 700):
            a, eps = LINEAR.alphas_cumprod[t], torch.randn(x.shape, generator=g, dtype=torch.float64)
            z = a.sqrt() * x + (1 - a).sqrt() * eps  # (20.8)
            r = eps - data.eps_fn(LINEAR)(z, torch.full((n,), t, dtype=torch.long))
            phi = torch.cat([torch.ones(n, 1, dtype=torch.float64), z, z.tanh(), z**2], 1)
            prod = r[:, :, None] * phi[:, None, :]
            assert bool((prod.mean(0).abs() < 4.5 * prod.std(0) / n**0.5).all()), (type(data).__name__, t)
    # the exact quantiles behind the sliced distance: the empirical CDF of 200 000 samples at them (KS)
    proj = (MIXTURE.sample(200_000, g) @ MIXTURE.directions().T).T.sort(1).values.contiguous()  # (12, N)
    levels = torch.searchsorted(proj, MIXTURE.quantiles(64).T.contiguous()).T.double() / proj.shape[1]
    assert float((levels - (torch.arange(64, dtype=torch.float64)[:, None] + 0.5) / 64).abs().max()) < 0.006


def run(sampler, steps, n=20_000, seed=0, schedule=None, **opts):
    """Pseudo-random noise and the Gaussian (the original harness)."""
    s = schedule or LINEAR
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return sample(exact_eps(s), noise, s, sampler=sampler, steps=steps, generator=g, **opts)


def run_on(dist, sampler, steps, spacing="trailing", noise=None, callback=None, **opts):
    """Sample ``dist`` ('gauss' or 'mixture') from quasi-random noise; returns (x0, NFE)."""
    noise = NOISE[dist] if noise is None else noise
    return sample(EPS[dist](LINEAR), noise, LINEAR, sampler, steps, generator=torch.Generator().manual_seed(1),
                  spacing=spacing, callback=callback, return_nfe=True, **opts)


# ---- distributions: every sampler, two spacings -------------------------------------------------
# Measured at 100 steps, linear schedule, 8192 samples (trailing / karras):
#   sampler          Gaussian W2     mixture sliced W2   mixture |Δweight|  |Δmean|
#   ddpm, euler_a    0.060 / 0.069   0.083 / 0.087       0.007              0.018
#   ddim, euler      0.027 / 0.032   0.023 / 0.041       0.003              0.020
#   heun             0.0054 / 0.0035 0.019 / 0.019       0.001              0.001
#   lms              0.0032 / 0.0047 0.017 / 0.016       0.001              0.001
#   dpmpp_2m         0.0041 / 0.0035 0.015 / 0.014       0.001              0.001
#   dpmpp_2m_sde     0.012 / 0.014   0.029 / 0.030       0.002              0.013
#   dpmpp_3m_sde     0.014 / 0.014   0.030 / 0.027       0.002              0.014
# Floors: 0.003 for the Gaussian (ᾱ_T > 0, so x_T is not quite pure noise); ~0.015 for the deterministic
# samplers' quasi-random mixture samples. The sliced W2 of 8192 i.i.d. exact mixture samples spans
# 0.012-0.092 over 20 seeds (median 0.045): a weight error δ moves a fraction δ of the mass between the
# modes, so it grows like √δ; the noisy samplers' values are draws from that spread, and their
# tolerance is its top. First-order samplers carry a visible bias at 100 steps (the ancestral ones
# shrink the spread).
FIRST_ORDER = ("ddpm", "euler_ancestral", "ddim", "euler")
GAUSS_TOL = {"ddpm": 0.085, "euler_ancestral": 0.085, "ddim": 0.04, "euler": 0.04, "heun": 0.007, "lms": 0.007,
             "dpmpp_2m": 0.007, "dpmpp_2m_sde": 0.018, "dpmpp_3m_sde": 0.018}
MIX_TOL = {"ddpm": 0.11, "euler_ancestral": 0.11, "ddim": 0.05, "euler": 0.05, "heun": 0.024, "lms": 0.024,
           "dpmpp_2m": 0.024, "dpmpp_2m_sde": 0.09, "dpmpp_3m_sde": 0.09}


def wobble(sampler):
    """How much more steps may fail to lower an error that already sits at its floor (lms by 20 steps)."""
    return 0.02 if sampler in STOCHASTIC else 0.002


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
@pytest.mark.parametrize("sampler", FIXED_STEP)
def test_every_sampler_reaches_the_gaussian(sampler, spacing):
    errs = {n: w2(run_on("gauss", sampler, n, spacing)[0]) for n in (5, 20, 100)}
    print(sampler, spacing, "W2 by steps:", errs)
    assert errs[5] > errs[20] > errs[100] - wobble(sampler)
    assert errs[100] < GAUSS_TOL[sampler]


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
@pytest.mark.parametrize("sampler", FIXED_STEP)
def test_every_sampler_reaches_the_mixture(sampler, spacing):
    xs = {n: run_on("mixture", sampler, n, spacing)[0] for n in (5, 20, 100)}
    errs = {n: sliced_w2(x) for n, x in xs.items()}
    weights, means = mode_stats(xs[100])
    print(sampler, spacing, "sliced W2 by steps:", errs, "weights", weights.tolist(), "means", means.tolist())
    assert errs[5] > errs[20] > errs[100] - wobble(sampler)
    assert errs[100] < MIX_TOL[sampler]
    w_tol, m_tol = (0.01, 0.03) if sampler in FIRST_ORDER else (0.005, 0.02) if sampler in STOCHASTIC else (2e-3, 3e-3)
    assert (weights - W).abs().max() < w_tol and (means - M).abs().max() < m_tol


# ---- order: deterministic error against a reference from the same noise ----------------------------
# Measured at σ_min, before the last step (the jump σ_min → 0 is one and the same denoising step for
# all of them), on Karras grids, whose steps refine smoothly in log σ. Timestep spacings of the linear
# schedule do not: σ_t ∝ √t near t = 0 keeps the ratio of the last steps fixed as N grows, and the
# final jump errs by ∝ σ_last² ∝ 1/N, which pulls every solver towards order 1 there. Error: mean
# distance per sample (an RMS would be ruled by the few samples that switch modes). Measured slopes
# (Gaussian / mixture): euler = ddim 0.98 / 1.07, heun 2.10 / 2.18, dpmpp_2m 2.08 / 2.10, and over
# 10-40 steps lms 2.79 / 2.65, dpmpp_3m (η = 0) 3.79 / 3.03. Below ~2e-4 the nearest-timestep rounding
# of off-grid σ (sigmas.Denoiser) sets a floor.
ORDER_NOISE = {"gauss": qmc_normal(1024, 3, seed=1), "mixture": qmc_normal(1024, 2, seed=1)}


def state_at_sigma_min(dist, sampler, steps, **opts):
    """(z at σ_min, NFE): the VP latent entering the final denoising step, from the callback."""
    seen = []
    _, nfe = run_on(dist, sampler, steps, "karras", ORDER_NOISE[dist], lambda i, t, z, x0: seen.append(z), **opts)
    return seen[-2], nfe


_REF: dict[str, torch.Tensor] = {}


def reference(dist):
    """The exact flow for the Gaussian; heun with 1000 Karras steps (error ~1e-5) for the mixture."""
    if dist not in _REF:
        s_max, s_min = float(LINEAR.sigmas[-1]), float(LINEAR.sigmas[0])
        x_max = ORDER_NOISE[dist] * (1 + s_max**2) ** 0.5
        _REF[dist] = (GAUSSIAN.flow(x_max, s_max, s_min) / (1 + s_min**2) ** 0.5 if dist == "gauss"
                      else state_at_sigma_min(dist, "heun", 1000)[0])
    return _REF[dist]


def distance(z, dist):
    return float((z - reference(dist)).norm(dim=1).mean())


def measured_order(dist, sampler, steps, **opts):
    runs = [state_at_sigma_min(dist, sampler, n, **opts) for n in steps]
    le = torch.tensor([math.log(distance(z, dist)) for z, _ in runs])
    ln = torch.tensor([math.log(nfe) for _, nfe in runs])
    slope = -float(((ln - ln.mean()) * (le - le.mean())).sum() / ((ln - ln.mean()) ** 2).sum())
    print(dist, sampler, opts, "errors", [f"{math.exp(e):.2e}" for e in le.tolist()], "order", round(slope, 2))
    return slope


@pytest.mark.parametrize("dist", ["gauss", "mixture"])
@pytest.mark.parametrize("sampler,opts,steps,lo,hi", [
    ("euler", {}, (10, 20, 40, 80), 0.85, 1.15),
    ("ddim", {}, (10, 20, 40, 80), 0.85, 1.15),
    ("heun", {}, (10, 20, 40, 80), 1.8, 2.4),
    ("dpmpp_2m", {}, (20, 40, 80, 160), 1.8, 2.4),
    ("lms", {}, (10, 20, 40), 2.4, 4.5),
    ("dpmpp_3m_sde", {"eta": 0.0}, (10, 20, 40), 2.4, 4.5),
])
def test_deterministic_solvers_show_their_order(dist, sampler, opts, steps, lo, hi):
    assert lo < measured_order(dist, sampler, steps, **opts) < hi


@pytest.mark.parametrize("dist", ["gauss", "mixture"])
def test_dpm_adaptive_meets_its_tolerance_with_fewer_nfe(dist):
    """rtol = atol = 1e-3 bounds each step's error estimate; the global error stays within 2× of it.

    Measured: 1.4e-3 / 2.2e-4 with 42 / 66 NFE; dpmpp_2m with 1.5× the NFE: 3.7e-3 / 1.6e-3.
    """
    z, nfe = state_at_sigma_min(dist, "dpm_adaptive", 10, rtol=1e-3, atol=1e-3)
    err = distance(z, dist)
    z_fixed, nfe_fixed = state_at_sigma_min(dist, "dpmpp_2m", math.ceil(1.5 * nfe))
    print(dist, "dpm_adaptive", nfe, "NFE", err, "| dpmpp_2m", nfe_fixed, "NFE", distance(z_fixed, dist))
    assert err < 2e-3
    assert distance(z_fixed, dist) > err
    looser = [state_at_sigma_min(dist, "dpm_adaptive", 10, rtol=tol, atol=tol) for tol in (1e-2, 3e-3)]
    assert looser[0][1] < looser[1][1] < nfe  # a tighter tolerance costs more NFE ...
    assert distance(looser[0][0], dist) > 3 * err  # ... and buys a smaller error (down to the ~2e-4 floor)


@pytest.mark.parametrize("dist", ["gauss", "mixture"])
def test_dpm_adaptive_reaches_the_distribution(dist):
    x, nfe = run_on(dist, "dpm_adaptive", 20, rtol=1e-3, atol=1e-3)
    err = w2(x) if dist == "gauss" else sliced_w2(x)
    print(dist, "dpm_adaptive", nfe, "NFE", err)  # measured 0.0046 / 0.024 with 47 / 63 NFE
    assert err < (0.008 if dist == "gauss" else 0.03) and nfe < 80


# ---- the same chain written two ways --------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_equivalent_samplers(spacing):
    """Euler in σ is DDIM; Euler ancestral is DDPM's posterior chain; the SDEs at η = 0 are the ODE solvers."""
    def go(name, **o):
        return run_on("gauss", name, 12, spacing, noise=NOISE["gauss"][:500], **o)[0]
    for a, b in [(go("euler"), go("ddim")), (go("euler_ancestral"), go("ddpm")), (go("ddim", eta=1.0), go("ddpm")),
                 (go("dpmpp_2m_sde", eta=0.0), go("dpmpp_2m")), (go("lms", order=1), go("euler")),
                 (go("euler_ancestral", eta=0.0), go("euler"))]:
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_ddim_eta_one_is_ancestral_ddpm():
    """σ² of DDIM with η = 1 is the posterior variance (20.15): same noise draws, same samples."""
    a = run("ddpm", 25, n=500, seed=7)
    b = run("ddim", 25, n=500, seed=7, eta=1.0)
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_ddim_error_falls_with_steps_and_is_first_order():
    errs = {n: w2(run("ddim", n, schedule=Schedule.from_name("cosine"))) for n in (5, 10, 20, 40)}
    print("ddim W2 by steps:", errs)
    assert errs[5] > errs[10] > errs[20] > errs[40]
    # DDIM is a first-order solver of the probability-flow ODE: doubling the steps ~halves the error
    assert 1.5 < errs[10] / errs[20] < 2.6


def test_full_chain_ddpm_is_accurate():
    assert w2(run("ddpm", 1000)) < 0.02  # measured 0.009


# ---- parity with diffusers ------------------------------------------------------------------------
def _diffusers_cases():
    d = pytest.importorskip("diffusers")
    b = Schedule.from_name("scaled_linear").betas.numpy()
    return [
        ("dpmpp_2m", "karras", {}, d.DPMSolverMultistepScheduler(trained_betas=b, use_karras_sigmas=True)),
        ("euler", "trailing", {}, d.EulerDiscreteScheduler(trained_betas=b, timestep_spacing="trailing")),
        # diffusers' Euler passes fractional timesteps for Karras sigmas; an integer-timestep model
        # rounds them, which is what both loops do here (our Denoiser: nearest timestep in log σ)
        ("euler", "karras", {}, d.EulerDiscreteScheduler(trained_betas=b, use_karras_sigmas=True)),
        ("heun", "trailing", {}, d.HeunDiscreteScheduler(trained_betas=b, timestep_spacing="trailing")),
        ("lms", "trailing", {}, d.LMSDiscreteScheduler(trained_betas=b, timestep_spacing="trailing")),
        ("dpmpp_3m_sde", "karras", {"eta": 0.0},
         d.DPMSolverMultistepScheduler(trained_betas=b, use_karras_sigmas=True, solver_order=3)),
        ("euler_ancestral", "trailing", {},
         d.EulerAncestralDiscreteScheduler(trained_betas=b, timestep_spacing="trailing")),
        ("dpmpp_2m_sde", "karras", {},
         d.DPMSolverMultistepScheduler(trained_betas=b, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")),
        ("lcm", "lcm", {}, d.LCMScheduler(trained_betas=b)),
    ]


@pytest.mark.filterwarnings("ignore")
def test_parity_with_diffusers_schedulers():
    """Same betas, 20 steps, diffusers' own set_timesteps/scale_model_input/step loop: max |Δ| < 1e-4.

    Measured 1.2e-6 … 8.6e-6 (diffusers keeps σ and the state in float32). Differences that are
    choices: diffusers' Euler-family start from noise·σ_max on trailing/linspace spacings (k-diffusion
    too); we start from noise·√(1+σ_max²), so that z_T is exactly the noise as in DDIM, and feed
    diffusers that start. The noisy ones match draw for draw with a float32 CPU generator.
    """
    schedule = Schedule.from_name("scaled_linear")
    eps_fn = exact_eps(schedule)
    noise = qmc_normal(512, 3).float()
    for name, spacing, opts, sch in _diffusers_cases():
        sch.set_timesteps(20)
        x = noise * (1 + float(sch.sigmas.max()) ** 2) ** 0.5 if sch.init_noise_sigma != 1.0 else noise.clone()
        g = torch.Generator().manual_seed(3)
        for t in sch.timesteps:
            tt = torch.full((len(x),), int(round(float(t))), dtype=torch.long)
            kw = {"generator": g} if "generator" in inspect.signature(sch.step).parameters else {}
            x = sch.step(eps_fn(sch.scale_model_input(x, t), tt), t, x, **kw).prev_sample
        g = torch.Generator().manual_seed(3)
        ours = sample(eps_fn, noise, schedule, name, 20, generator=g, spacing=spacing, **opts)
        diff = float((ours - x).abs().max())
        print(name, spacing, type(sch).__name__, "max |diff|", diff)
        assert diff < 1e-4, (name, spacing, diff)


# ---- few-step models: LCM ---------------------------------------------------------------------------
def consistency_eps(schedule):
    """The Gaussian's exact consistency function f(x_σ) = the probability-flow map to σ = 0, as an ε-model.

    What an ideal LCM network computes: one deterministic jump along the ODE, so f(x_σ) ~ the data for
    x_σ ~ the marginal at σ. (Its x̂ = x - σ ε̂ is f; c_skip of the timesteps used is below 1e-6.)
    """
    sigmas = schedule.sigmas

    def eps(z, t):
        s = float(sigmas[int(t[0])])
        x = z * (1 + s**2) ** 0.5
        return (x - GAUSSIAN.flow(x, s, 0.0)) / s
    return eps


def test_lcm_with_a_consistency_model_is_exact_in_one_step():
    """The LCM chain: jump to f, re-noise to the next level, jump again. With the exact consistency function
    one step gives the data (W2 0.003, the quasi-random floor) and more steps stay there up to the
    Monte-Carlo error of their fresh noise (the W2 of 8192 i.i.d. exact samples spans 0.006-0.032 over
    20 seeds); with the exact *denoiser* E[x | x_σ] instead the chain loses variance however many steps
    it takes (W2 0.59, 0.42, 0.38 at 4, 20, 50 steps): the bias distillation into a consistency model removes."""
    noise = NOISE["gauss"]
    for steps in (1, 2, 4, 8):
        x = sample(consistency_eps(LINEAR), noise, LINEAR, "lcm", steps, spacing="lcm",
                   generator=torch.Generator().manual_seed(1))
        print("lcm with the consistency function", steps, "steps: W2", w2(x))
        assert w2(x) < (0.006 if steps == 1 else 0.035)
    for steps in (4, 20, 50):
        x = sample(exact_eps(LINEAR), noise, LINEAR, "lcm", steps, spacing="lcm",
                   generator=torch.Generator().manual_seed(1))
        print("lcm with the denoiser", steps, "steps: W2", w2(x))
        assert w2(x) > 0.25
    with pytest.raises(UserError, match="at most 50 steps"):
        timesteps_for(LINEAR, 51, "lcm")


# ---- spacings, NFE, callbacks, errors -------------------------------------------------------------
def test_spacings():
    s = LINEAR
    assert timesteps_for(s, 10, "trailing") == list(range(999, 0, -100))
    assert timesteps_for(s, 10, "leading", offset=1) == list(range(901, 0, -100))
    assert timesteps_for(s, 1000, "linspace") == list(range(999, -1, -1))
    with pytest.raises(UserError, match="steps: 1001 is more than the schedule.s 1000 timesteps"):
        timesteps_for(s, 1001)
    with pytest.raises(UserError, match="positive"):
        timesteps_for(s, 0)
    zero = torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(sigmas_for(s, 10, "trailing"), torch.cat([s.sigmas[timesteps_for(s, 10)], zero]))
    for spacing in ("karras", "exponential"):
        sig = sigmas_for(s, 2000, spacing)  # σ spacings take any number of steps
        assert len(sig) == 2001 and sig[-1] == 0 and bool((sig[:-1] > sig[1:]).all())
        torch.testing.assert_close(sig[[0, -2]], s.sigmas[[-1, 0]])
    log_sig = sigmas_for(s, 10, "exponential")[:-1].log()
    torch.testing.assert_close(log_sig.diff(), log_sig.diff().mean().expand(9))
    ramp = sigmas_for(s, 10, "karras")[:-1] ** (1 / 7)  # linear in σ^(1/ρ), ρ = 7
    torch.testing.assert_close(ramp.diff(), ramp.diff().mean().expand(9))
    torch.testing.assert_close(sigmas_for(s, 1, "karras"), torch.cat([s.sigmas[-1:], zero]))
    with pytest.raises(UserError, match="karras, exponential"):
        sigmas_for(s, 10, "cosine")


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_sampler_takes_every_spacing(spacing):
    for name in SAMPLERS:
        x, nfe = run_on("gauss", name, 7, spacing, noise=NOISE["gauss"][:16])
        assert x.shape == (16, 3) and bool(torch.isfinite(x).all()) and nfe >= 7


def test_nfe_is_counted():
    calls = []
    eps = exact_eps(LINEAR)

    def counting(z, t):
        calls.append(1)
        return eps(z, t)
    for name in SAMPLERS:
        calls.clear()
        _, nfe = sample(counting, NOISE["gauss"][:64], LINEAR, name, 10, return_nfe=True)
        assert nfe == len(calls)
        if name != "dpm_adaptive":  # adaptive: its own count (2 per tried step, 1 per accepted, 1 to start)
            assert nfe == (19 if name == "heun" else 10)  # heun: 2 per step but the last
    assert isinstance(sample(eps, NOISE["gauss"][:4], LINEAR, "euler", 3), torch.Tensor)


def test_seed_reproducible_and_clip():
    a, b = run("ddpm", 10, n=100, seed=3), run("ddpm", 10, n=100, seed=3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    for name in ("ddim", "heun", "dpmpp_2m", "dpm_adaptive"):  # clip_x0 is the denoiser's, so every sampler's
        c = run(name, 10, n=100, clip_x0=0.1)
        assert float(c.abs().max()) <= 0.1 + 1e-9


def test_callback_sees_every_step():
    for name in ("ddim", "heun", "dpmpp_2m"):
        seen = []
        run(name, 7, n=4, callback=lambda i, t, x, x0: seen.append((i, t, x.shape, x0.shape)))
        assert [s[0] for s in seen] == list(range(7))
        assert [s[1] for s in seen] == timesteps_for(LINEAR, 7)
        assert seen[-1][2] == seen[-1][3] == (4, 3)


def test_bad_input():
    s = Schedule.from_name("linear", num_timesteps=10)
    x = torch.randn(2, 3)
    with pytest.raises(UserError, match="ddpm, ddim, euler"):
        sample(exact_eps(s), x, s, sampler="plms", steps=5)
    with pytest.raises(UserError, match="eta"):
        sample(exact_eps(s), x, s, sampler="ddpm", steps=5, eta=0.5)
    with pytest.raises(UserError, match="rtol"):
        sample(exact_eps(s), x, s, sampler="heun", steps=5, rtol=0.5)
    with pytest.raises(UserError, match="spacing"):
        sample(exact_eps(s), x, s, steps=5, spacing="karass")
    for name in SAMPLERS:
        calls = iter(range(100))
        with pytest.raises(NonFiniteError, match="step 2" if name != "dpm_adaptive" else "step"):
            sample(lambda z, t: z * 0 + (float("nan") if next(calls) == (2 if name != "heun" else 4) else 0.0),
                   x, s, name, steps=5)
    with pytest.raises(UserError, match="max_steps"):
        sample(exact_eps(LINEAR), NOISE["gauss"][:64], LINEAR, "dpm_adaptive", 10, rtol=1e-9, atol=1e-9, max_steps=20)
