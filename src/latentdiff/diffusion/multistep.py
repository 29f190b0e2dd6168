"""Higher-order multistep solvers of the probability-flow ODE: UniPC (B(h) = bh1, bh2) and DEIS, in the σ view.

Each keeps the last few network outputs and extrapolates them over the next step; like every sampler in
samplers.py it is a pure function ``(model, x, sigmas, generator, callback, **opts)`` with one network
evaluation (NFE) per step, so the one certificate harness (tests/test_samplers.py) checks them too.
The first steps warm up at lower order (one more past output per step) and the step to σ = 0 lands on x̂,
as in every sampler here. The σ view: x = z_t/√ᾱ_t, so that (20.8) reads x = x̂ + σ ε̂ and the
probability-flow ODE is dx/dσ = ε̂ = (x - x̂)/σ. Registered in samplers.SAMPLERS; names users know in names.py.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from numpy.polynomial import polynomial as P
import torch
from torch import Tensor

from latentdiff.diffusion.samplers import Hook, Model, _check, _steps
from latentdiff.errors import SettingError

LOWER_ORDER_FINAL_BELOW = 15  # DEIS: below this many steps the last two steps drop order (diffusers' rule)


def _order(order: float, sampler: str) -> int:
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise SettingError("order", f"{sampler} takes order 1, 2 or 3, got {order!r}")
    return int(order)


def _vander(nodes: list[float], n: int) -> np.ndarray:
    """R[k, j] = nodes[j]^k, k < n: the moment equations of the multistep weights."""
    return np.vander(np.asarray(nodes, dtype=np.float64), n, increasing=True).T


# ---- UniPC (Zhao et al. 2023): predictor UniP, corrector UniC ---------------------------------------
def _phi_b(h: float, order: int, bh2: bool) -> tuple[float, np.ndarray, float]:
    """(h φ₁(h), b, B(h)) of UniPC's data-prediction update over a step h in λ = -log σ.

    h φ₁ = expm1(-h); b_k = k! h φ_{k+1}(h) / B(h) for k = 1 … order, with the exponential integrator's
    φ functions and B(h) = -h (bh1) or expm1(-h) (bh2).
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    b_h = math.expm1(hh) if bh2 else hh
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, np.asarray(b), b_h


def _unipc_step(x: Tensor, s: float, s_next: float, hist: list[tuple[float, Tensor]], order: int, bh2: bool,
                x0_next: Optional[Tensor] = None) -> Tensor:
    """One UniP step of ``order`` from σ = s to s_next, or with ``x0_next`` (x̂ at s_next) the UniC
    correction of that step, one order higher at no extra NFE. hist: (λ, x̂) at s first, then older ones.

    x_next = (σ_next/σ) x - h φ₁ x̂ - B(h) Σ_k ρ_k D_k with D_k = (x̂_k - x̂)/r_k, r_k = (λ_k - λ)/h, and ρ
    solving R ρ = b (UniPC's eq. for the B(h) variants); orders 1 and 2 use ρ = ½ as diffusers does.
    """
    lam, m0 = -math.log(s), hist[0][1]
    h = math.log(s / s_next)
    rks = [(hist[k][0] - lam) / h for k in range(1, order)]
    d1s = [(hist[k][1] - m0) / rk for k, rk in enumerate(rks, start=1)]
    h_phi_1, b, b_h = _phi_b(h, order, bh2)
    x_next = (s_next / s) * x - h_phi_1 * m0
    if x0_next is None:  # UniP: the past outputs only
        if order == 1:
            return x_next
        rhos = [0.5] if order == 2 else np.linalg.solve(_vander(rks, order - 1), b[: order - 1])
        return x_next - b_h * sum(float(r) * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else np.linalg.solve(_vander(rks + [1.0], order), b)
    correction = sum(float(r) * d for r, d in zip(rhos[:-1], d1s)) + float(rhos[-1]) * (x0_next - m0)
    return x_next - b_h * correction


def _unipc(model: Model, x: Tensor, sigmas: list[float], callback: Hook, order: int, bh2: bool) -> Tensor:
    n = len(sigmas) - 1
    hist: list[tuple[float, Tensor]] = []  # (λ, x̂), newest first
    last: Optional[tuple[Tensor, float, int]] = None  # (x before the last prediction, its σ, its order)
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s)
        if last is not None:  # UniC: correct the last prediction with the x̂ just computed at its end
            x = _unipc_step(last[0], last[1], s, hist, last[2], bh2, x0)
        hist = [(-math.log(s), x0)] + hist[: order - 1]
        if s_next == 0:
            x = x0
        else:
            p = min(order, len(hist), n - i)  # warm-up, and diffusers' lower_order_final
            last = (x, s, p)
            x = _unipc_step(x, s, s_next, hist, p, bh2)
        _check(x, i, s, s_next, callback, x0)
    return x


def unipc(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
          callback: Hook = None, order: int = 3) -> Tensor:
    """UniPC with B(h) = h (bh1; Zhao et al. 2023): a UniP predictor of ``order`` and a UniC corrector that
    reuses the next step's x̂, so order + 1 at one NFE per step. The web UIs' UniPC (A1111 "UniPC",
    ComfyUI "uni_pc"); diffusers ``UniPCMultistepScheduler(solver_type="bh1")``."""
    return _unipc(model, x, sigmas, callback, _order(order, "unipc"), bh2=False)


def unipc_bh2(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
              callback: Hook = None, order: int = 2) -> Tensor:
    """UniPC with B(h) = e^h - 1 (bh2), diffusers' default ``UniPCMultistepScheduler`` (order 2) and
    ComfyUI's "uni_pc_bh2"; recommended by the UniPC authors for guided sampling."""
    return _unipc(model, x, sigmas, callback, _order(order, "unipc_bh2"), bh2=True)


# ---- DEIS (Zhang & Chen 2023): Adams–Bashforth on ε in log ρ -----------------------------------------
def _deis_weights(log_rhos: list[float], rho_next: float) -> list[float]:
    """∫ from ρ to ρ_next of the Lagrange basis ℓ_j(log ρ) dρ, exactly, through the nodes log ρ_k.

    With v = log ρ - log ρ₀ the integral is ρ₀ ∫₀^{v_next} e^v ℓ_j(v) dv, and e^v p(v) has the
    antiderivative e^v (p - p' + p'' - …): no quadrature (diffusers writes orders 2 and 3 out by hand).
    """
    rho_0, nodes = math.exp(log_rhos[0]), [u - log_rhos[0] for u in log_rhos]
    v_next = math.log(rho_next) - log_rhos[0]
    weights = []
    for j, uj in enumerate(nodes):
        others = [u for k, u in enumerate(nodes) if k != j]
        basis = P.polyfromroots(others) / np.prod([uj - o for o in others]) if others else np.ones(1)
        q, term, sign = np.zeros(1), basis, 1.0
        while term.size and np.any(term):
            q = P.polyadd(q, sign * term)
            term, sign = P.polyder(term), -sign
        weights.append(rho_0 * (math.exp(v_next) * float(P.polyval(v_next, q)) - float(P.polyval(0.0, q))))
    return weights


def deis(model: Model, x: Tensor, sigmas: list[float], generator: Optional[torch.Generator] = None,
         callback: Hook = None, order: int = 3) -> Tensor:
    """DEIS (tAB in log ρ, Zhang & Chen 2023): dx/dρ = ε̂ with ρ = σ, ε̂ interpolated by a polynomial in
    log ρ through the last ``order`` outputs and integrated exactly; diffusers' ``DEISMultistepScheduler``.
    Below 15 steps the last two steps drop to orders 1 and 2 (diffusers' lower_order_final)."""
    order = _order(order, "deis")
    n = len(sigmas) - 1
    hist: list[tuple[float, Tensor]] = []  # (log σ, ε̂), newest first
    for i, s, s_next in _steps(sigmas):
        x0 = model(x, s)
        hist = [(math.log(s), (x - x0) / s)] + hist[: order - 1]
        if s_next == 0:
            x = x0
        else:
            p = min(order, len(hist), n - i) if n < LOWER_ORDER_FINAL_BELOW else len(hist)
            w = _deis_weights([u for u, _ in hist[:p]], s_next)
            x = x + sum(wj * e for wj, (_, e) in zip(w, hist))
        _check(x, i, s, s_next, callback, x0)
    return x
