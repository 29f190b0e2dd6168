"""Fit a 10-step σ grid on the sampler certificate (the 'fitted' spacing), Align-Your-Steps style.

    OMP_NUM_THREADS=1 python benchmarks/fit_sigma_grid.py

The grid is 11 fractions u_k of the log-σ range (u_0 = 0 at σ_max, u_10 = 1 at σ_min, the last step then
lands on 0), parametrised by softmax-like positive increments so it stays monotone. Other step counts
stretch it log-linearly (latentdiff.diffusion.sigmas.loglinear_resample), as AYS does. Loss: the sum of
log errors of dpmpp_2m, unipc_bh2, deis and lms at 5 and 10 steps on the certificate's two data sets
(Gaussian W2, mixture sliced W2), linear schedule, exact denoiser, 2048 quasi-random starting points from
a different seed than the certificate's 8192 (so the certificate is not the fitting set itself). Nelder-Mead
from the exponential grid (u even). Prints the fractions to paste into FITTED_LOG_FRACTIONS and writes
benchmarks/results/fit_sigma_grid.md: errors at 5 and 10 steps on the certificate's points.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name  # benchmarks/machine.py, beside this script
from scipy.optimize import minimize

from latentdiff.diffusion import SAMPLERS, Schedule, sigmas_for
from latentdiff.diffusion.exact import GAUSSIAN, MIXTURE, qmc_normal
from latentdiff.diffusion.samplers import Monitor
from latentdiff.diffusion.schedule import abar_from_sigma
from latentdiff.diffusion.sigmas import FITTED_LOG_FRACTIONS, Denoiser, loglinear_resample

LINEAR = Schedule.from_name("linear")
LO, HI = float(LINEAR.sigmas[0]), float(LINEAR.sigmas[-1])
FIT_SAMPLERS = ("dpmpp_2m", "unipc_bh2", "deis", "lms")
SHOWN = FIT_SAMPLERS + ("unipc", "dpmpp_3m_sde")
DATA = {"gauss": (GAUSSIAN, GAUSSIAN.w2, 3), "mixture": (MIXTURE, MIXTURE.sliced_w2, 2)}


def grid(u: np.ndarray, steps: int) -> list[float]:
    """The σ grid of fractions u (of log σ_max → log σ_min) stretched to ``steps`` steps, ending in 0."""
    return loglinear_resample(torch.tensor(np.exp(math.log(HI) + u * (math.log(LO) - math.log(HI)))), steps).tolist()


def error(sampler: str, sigmas: list[float], dist: str, noise: torch.Tensor) -> float:
    """The certificate's distribution error of one deterministic run on a given σ grid."""
    data, metric, _ = DATA[dist]
    x = noise / abar_from_sigma(sigmas[0]) ** 0.5
    with torch.no_grad():
        x0 = SAMPLERS[sampler](Denoiser(data.eps_fn(LINEAR), LINEAR), x, sigmas, torch.Generator().manual_seed(1),
                               Monitor())
    e = metric(x0)
    return e if math.isfinite(e) else 1e3


def fractions(p: np.ndarray) -> np.ndarray:
    inc = np.exp(p)
    return np.concatenate([[0.0], np.cumsum(inc) / inc.sum()])


def main() -> None:
    torch.set_num_threads(1)
    fit_noise = {d: qmc_normal(2048, dim, seed=5) for d, (_, _, dim) in DATA.items()}

    def loss(p: np.ndarray) -> float:
        u = fractions(p)
        return sum(math.log(error(s, grid(u, n), d, fit_noise[d])) for n in (5, 10) for s in FIT_SAMPLERS
                   for d in DATA)

    t0 = time.perf_counter()
    res = minimize(loss, np.zeros(10), method="Nelder-Mead", options={"maxfev": 1500, "xatol": 1e-3, "fatol": 1e-3})
    u = np.round(fractions(res.x), 4)
    fit_s = time.perf_counter() - t0
    print(f"loss {loss(np.zeros(10)):.2f} -> {res.fun:.2f} in {res.nfev} evaluations, {fit_s:.0f} s")
    print("FITTED_LOG_FRACTIONS =", tuple(float(v) for v in u))
    if not np.allclose(u, FITTED_LOG_FRACTIONS, atol=1e-4):
        print("note: differs from latentdiff.diffusion.sigmas.FITTED_LOG_FRACTIONS; the table uses the library's")

    noise = {d: qmc_normal(8192, dim) for d, (_, _, dim) in DATA.items()}  # the certificate's points
    spacings = ("karras", "exponential", "ays", "fitted")
    lines = ["# A σ grid fitted on the sampler certificate", "",
             f"machine: {cpu_name()} (shared with other jobs), 1 thread, torch {torch.__version__}  ",
             f"command: `OMP_NUM_THREADS=1 python {' '.join(sys.argv)}` (fit: {res.nfev} loss evaluations, "
             f"{fit_s:.0f} s)", "",
             "Gaussian W2 / mixture sliced W2 (floors 0.003 / ~0.015), linear schedule, exact denoiser, the "
             "certificate's 8192 quasi-random points (the fit used 2048 others). `fitted` was fitted on "
             f"{', '.join(FIT_SAMPLERS)} at 5 and 10 steps; unipc and dpmpp_3m_sde were not in the fit.", "",
             "| steps | spacing | σ grid |", "|---|---|---|"]
    for n in (5, 10):
        for sp in spacings:
            lines.append(f"| {n} | {sp} | " + ", ".join(f"{v:.3g}" for v in sigmas_for(LINEAR, n, sp).tolist()) + " |")
    lines += ["", "| sampler | steps | " + " | ".join(spacings) + " |", "|---|---|" + "---|" * len(spacings)]
    for s in SHOWN:
        for n in (5, 10):
            cells = [" / ".join(f"{error(s, sigmas_for(LINEAR, n, sp).tolist(), d, noise[d]):.4f}" for d in DATA)
                     for sp in spacings]
            lines.append(f"| {s} | {n} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    (Path(__file__).parent / "results" / "fit_sigma_grid.md").write_text(text)


if __name__ == "__main__":
    main()
