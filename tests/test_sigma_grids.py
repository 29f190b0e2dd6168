"""The optimised σ grids: 'ays' (Align Your Steps' SD-1.5 grid) and 'fitted' (fitted on the sampler certificate)."""

from __future__ import annotations

import pytest
import torch

from latentdiff.diffusion import Schedule, sample, sigmas_for
from latentdiff.diffusion.exact import GAUSSIAN, MIXTURE, qmc_normal
from latentdiff.diffusion.names import resolve
from latentdiff.diffusion.schedule import interp_log_sigma
from latentdiff.diffusion.sigmas import AYS_SD15_SIGMAS, loglinear_resample, time_at_sigma
from latentdiff.errors import UserError

LINEAR = Schedule.from_name("linear")


def test_ays_gives_the_published_grid_on_stable_diffusions_schedule():
    sig = sigmas_for(Schedule.from_name("scaled_linear"), 10, "ays")
    torch.testing.assert_close(sig[:-1], torch.tensor(AYS_SD15_SIGMAS[:-1], dtype=torch.float64), rtol=2e-3, atol=0)
    assert sig[-1] == 0  # the last step lands on clean data
    diffusers = pytest.importorskip("diffusers.schedulers")
    torch.testing.assert_close(sig, torch.tensor(diffusers.AysSchedules["StableDiffusionSigmas"], dtype=torch.float64),
                               rtol=2e-3, atol=0)  # diffusers' copy of the grid, which ends in 0 as ours
    sig20 = sigmas_for(Schedule.from_name("scaled_linear"), 20, "ays")
    torch.testing.assert_close(sig20[0:-1:2], sig[:-1])  # 20 steps keep the 10-step points...
    mid = ((sig[:-2].log() + sig[1:-1].log()) / 2).exp()  # ...and add their log-midpoints
    torch.testing.assert_close(sig20[1:-2:2], mid)


@pytest.mark.parametrize("spacing", ["ays", "fitted"])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "scaled_linear"])
def test_optimised_grids_are_monotone_with_the_schedules_endpoints(spacing, schedule):
    s = Schedule.from_name(schedule)
    for steps in (1, 2, 3, 5, 7, 10, 11, 20, 250):
        sig = sigmas_for(s, steps, spacing)
        assert sig.dtype == torch.float64 and len(sig) == steps + 1 and sig[-1] == 0
        assert bool((sig[:-1] > sig[1:]).all()), (steps, sig)
        torch.testing.assert_close(sig[0], s.sigmas[-1])  # starts at σ_max: pure noise
        assert float(sig[-2]) >= float(s.sigmas[0])  # never below σ_min before the final step


def test_loglinear_resample_and_time_at_sigma():
    grid = torch.tensor([8.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(loglinear_resample(grid, 3), torch.tensor([8.0, 2.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(loglinear_resample(grid, 6)[:3], torch.tensor([8.0, 4.0, 2.0], dtype=torch.float64))
    ls = LINEAR.sigmas.log()
    for t in (0.0, 0.25, 17.5, 998.9, 999.0):  # t(σ) inverts σ(t), between the table's timesteps too
        sigma = float(interp_log_sigma(ls, torch.tensor([t], dtype=torch.float64))[0].exp())
        assert time_at_sigma(ls, sigma) == pytest.approx(t, abs=1e-6)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10"])
def test_bad_step_counts_are_one_line_errors(steps):
    for spacing in ("ays", "fitted"):
        with pytest.raises(UserError, match="steps: must be a positive integer") as e:
            sigmas_for(LINEAR, steps, spacing)
        assert "\n" not in str(e.value)


def test_names_take_the_new_spacings():
    assert resolve("DPM++ 2M", "ays") == ("dpmpp_2m", "ays")
    assert resolve("unipc_bh2", "fitted") == ("unipc_bh2", "fitted")


def test_fitted_grid_beats_karras_at_10_steps_on_the_certificate():
    """benchmarks/fit_sigma_grid.py fitted the grid on 2048 other points; here the certificate's 8192 (measured
    at 10 steps, Gaussian W2, karras -> fitted: dpmpp_2m 0.139 -> 0.032, unipc_bh2 0.173 -> 0.0035, the floor
    0.003; mixture sliced W2 unipc_bh2 0.198 -> 0.046). The issue's target: below 0.092 at 10 NFE."""
    def err(data, metric, dim, name, spacing):
        x = sample(data.eps_fn(LINEAR), qmc_normal(8192, dim), LINEAR, name, 10, spacing=spacing)
        return metric(x)
    for name, fitted_max in (("dpmpp_2m", 0.05), ("unipc_bh2", 0.01)):
        karras, fitted = err(GAUSSIAN, GAUSSIAN.w2, 3, name, "karras"), err(GAUSSIAN, GAUSSIAN.w2, 3, name, "fitted")
        print(name, "10 steps Gaussian W2: karras", karras, "fitted", fitted)
        assert fitted < fitted_max < karras
    mix = err(MIXTURE, MIXTURE.sliced_w2, 2, "unipc_bh2", "fitted")
    assert mix < 0.07 < err(MIXTURE, MIXTURE.sliced_w2, 2, "unipc_bh2", "karras")
