"""Sampler certificate: error against network evaluations (NFE) for every sampler, on data whose exact
denoiser is known (latentdiff.diffusion.exact: a 3-D Gaussian and a 2-D two-component mixture).

    OMP_NUM_THREADS=1 python benchmarks/sampler_certificate.py

Two errors, both against the linear DDPM schedule (T = 1000):
- distribution: W2 of the fitted Gaussian (Gaussian data) and sliced W2 to the exact mixture, 8192
  quasi-random starting points, at 5/10/20/50/100 steps, on the 'trailing' and 'karras' spacings and the
  few-step grids 'exponential', 'ays' and 'fitted' (the last fitted on 2048 other points of the same data
  sets, benchmarks/fit_sigma_grid.py: in-sample in the data, not in the points);
- deterministic: mean distance, at σ_min before the last denoising step, to the exact flow (Gaussian)
  or a 1000-step heun solution (mixture) from the same 1024 starting points, on Karras grids. Its
  log-log slope against NFE over 10-80 steps is the measured order.
Also the largest difference to diffusers' schedulers on 20 steps (the peer, run in the same process).
Writes benchmarks/results/sampler_certificate.md and docs/sampler_certificate.png.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from latentdiff.diffusion import SAMPLERS, Schedule, sample
from latentdiff.diffusion.exact import GAUSSIAN, MIXTURE, qmc_normal
from latentdiff.diffusion.samplers import DETERMINISTIC

ROOT = Path(__file__).resolve().parents[1]
LINEAR = Schedule.from_name("linear")
STEPS = (5, 10, 20, 50, 100)
GRIDS = ("trailing", "karras", "exponential", "ays", "fitted")
ORDER_STEPS = (10, 20, 40, 80)
NFE = {"heun": "2N-1"}  # every other fixed-step sampler: N
ADAPTIVE = [("web UIs' (0.05, 0.0078)", {"rtol": 0.05, "atol": 0.0078}), ("1e-2", {"rtol": 1e-2, "atol": 1e-2}),
            ("defaults (1e-3)", {}), ("1e-4", {"rtol": 1e-4, "atol": 1e-4})]
ODE = {"dpmpp_3m_sde": {"eta": 0.0}}  # deterministic variants measured for order
DISTS = {"gauss": (GAUSSIAN, 3, GAUSSIAN.w2), "mixture": (MIXTURE, 2, MIXTURE.sliced_w2)}


def run(dist: str, name: str, steps: int, spacing: str, noise: torch.Tensor, **opts):
    """(x0, NFE, z at σ_min) for one sampler run; z is the state entering the final denoising step."""
    data, seen = DISTS[dist][0], []
    x, nfe = sample(data.eps_fn(LINEAR), noise, LINEAR, name, steps, generator=torch.Generator().manual_seed(1),
                    spacing=spacing, callback=lambda i, t, z, x0: seen.append(z), return_nfe=True, **opts)
    return x, nfe, seen[-2]


def distribution_errors(dist: str, spacing: str) -> dict[str, list[tuple[int, float]]]:
    noise, metric = qmc_normal(8192, DISTS[dist][1]), DISTS[dist][2]
    out = {}
    for name in SAMPLERS:
        if name != "dpm_adaptive":
            out[name] = [(nfe, metric(x)) for x, nfe, _ in (run(dist, name, n, spacing, noise) for n in STEPS)]
    if spacing == "trailing":  # dpm_adaptive uses only the grid's first σ (σ_max for both spacings)
        out["dpm_adaptive"] = [(nfe, metric(x)) for x, nfe, _ in (run(dist, "dpm_adaptive", 20, spacing, noise, **o)
                                                                  for _, o in ADAPTIVE)]
    return out


def deterministic_errors(dist: str) -> dict[str, list[tuple[int, float]]]:
    noise = qmc_normal(1024, DISTS[dist][1], seed=1)
    s_max, s_min = float(LINEAR.sigmas[-1]), float(LINEAR.sigmas[0])
    if dist == "gauss":
        ref = GAUSSIAN.flow(noise * (1 + s_max**2) ** 0.5, s_max, s_min) / (1 + s_min**2) ** 0.5
    else:
        ref = run(dist, "heun", 1000, "karras", noise)[2]
    err = lambda z: float((z - ref).norm(dim=1).mean())  # noqa: E731 (mean distance: robust to mode switches)
    out = {}
    for name in DETERMINISTIC + tuple(ODE):
        if name == "dpm_adaptive":
            runs = [run(dist, name, 10, "karras", noise, **o) for _, o in ADAPTIVE]
        else:
            runs = [run(dist, name, n, "karras", noise, **ODE.get(name, {})) for n in (5,) + ORDER_STEPS + (160,)]
        out[name] = [(nfe, err(z)) for _, nfe, z in runs]
    return out


def order(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of -log(error) against log(NFE) over the ORDER_STEPS runs."""
    pts = points[1:1 + len(ORDER_STEPS)]
    ln = torch.tensor([math.log(n) for n, _ in pts])
    le = torch.tensor([math.log(e) for _, e in pts])
    return -float(((ln - ln.mean()) * (le - le.mean())).sum() / ((ln - ln.mean()) ** 2).sum())


def diffusers_parity() -> list[tuple[str, str, str, float]]:
    """Largest |Δ| to diffusers' scheduler loops on 20 steps, same betas, scaled-linear schedule."""
    try:
        import diffusers as d
    except ImportError:
        return []
    import inspect
    import warnings
    warnings.filterwarnings("ignore")
    schedule = Schedule.from_name("scaled_linear")
    b, eps_fn, noise = schedule.betas.numpy(), GAUSSIAN.eps_fn(schedule), qmc_normal(512, 3).float()
    cases = [("dpmpp_2m", "karras", {}, d.DPMSolverMultistepScheduler(trained_betas=b, use_karras_sigmas=True)),
             ("dpmpp_2m_sde", "karras", {}, d.DPMSolverMultistepScheduler(trained_betas=b, use_karras_sigmas=True,
                                                                         algorithm_type="sde-dpmsolver++")),
             ("dpmpp_3m_sde", "karras", {"eta": 0.0},
              d.DPMSolverMultistepScheduler(trained_betas=b, use_karras_sigmas=True, solver_order=3)),
             ("euler", "trailing", {}, d.EulerDiscreteScheduler(trained_betas=b, timestep_spacing="trailing")),
             ("euler_ancestral", "trailing", {},
              d.EulerAncestralDiscreteScheduler(trained_betas=b, timestep_spacing="trailing")),
             ("heun", "trailing", {}, d.HeunDiscreteScheduler(trained_betas=b, timestep_spacing="trailing")),
             ("lms", "trailing", {}, d.LMSDiscreteScheduler(trained_betas=b, timestep_spacing="trailing"))]
    rows = []
    for name, spacing, opts, sch in cases:
        sch.set_timesteps(20)
        x = noise * (1 + float(sch.sigmas.max()) ** 2) ** 0.5 if sch.init_noise_sigma != 1.0 else noise.clone()
        g = torch.Generator().manual_seed(3)
        for t in sch.timesteps:
            kw = {"generator": g} if "generator" in inspect.signature(sch.step).parameters else {}
            tt = torch.full((len(x),), int(round(float(t))), dtype=torch.long)
            x = sch.step(eps_fn(sch.scale_model_input(x, t), tt), t, x, **kw).prev_sample
        g = torch.Generator().manual_seed(3)
        ours = sample(eps_fn, noise, schedule, name, 20, generator=g, spacing=spacing, **opts)
        label = type(sch).__name__ + ("(use_karras_sigmas=True)" if spacing == "karras" else "(trailing)")
        rows.append((name + (" η=0" if opts else ""), spacing, label, float((ours - x).abs().max())))
    return rows


def plot(dist_err: dict, det_err: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    color = {name: plt.cm.tab20(k) for k, name in enumerate(SAMPLERS)}
    same = {"euler": "euler = ddim", "euler_ancestral": "euler_ancestral = ddpm"}  # identical maps (tested)
    fig, axes = plt.subplots(3, 2, figsize=(11, 12.5))
    for col, dist in enumerate(DISTS):
        ax = axes[0, col]
        for name, pts in dist_err[(dist, "trailing")].items():
            if name not in ("ddim", "ddpm"):
                label = same.get(name, name) + (" (rtol = atol)" if name == "dpm_adaptive" else "")
                ax.loglog(*zip(*pts), "o-" if name in DETERMINISTIC else "s--", ms=3, color=color[name], label=label)
        ax.set(title=f"{dist}: {'W2' if dist == 'gauss' else 'sliced W2'} to the data (trailing spacing)",
               xlabel="NFE", ylabel="distribution error")
        ax = axes[1, col]  # the optimised grids, for the multistep solvers they were made for
        for name in ("lms", "dpmpp_2m", "unipc", "unipc_bh2", "deis"):
            for spacing, style in (("karras", ":"), ("ays", "--"), ("fitted", "-")):
                ax.loglog(*zip(*dist_err[(dist, spacing)][name]), "o" + style, ms=3, color=color[name],
                          label=f"{name} {spacing}")
        ax.set(title=f"{dist}: karras (dotted), ays (dashed), fitted (solid)", xlabel="NFE",
               ylabel="distribution error")
        ax = axes[2, col]
        for name, pts in det_err[dist].items():
            if name != "ddim":
                label = same.get(name, name) + (" (η=0)" if name in ODE else "")
                ax.loglog(*zip(*pts), "o-", ms=3, color=color[name], label=label)
        n0, e0 = det_err[dist]["euler"][1]
        for p, style in ((1, ":"), (2, "--"), (3, "-.")):  # guides through the 10-step euler point
            ax.loglog([n0, 300], [e0, e0 * (n0 / 300) ** p], "k" + style, lw=0.7, label=f"slope {p}")
        ax.set(title=f"{dist}: distance to the reference flow (karras)", xlabel="NFE", ylabel="mean distance at σ_min")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=6, ncol=3)
    axes[2, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def best_at_few_steps(dist_err: dict, top: int = 6) -> list[str]:
    """Markdown: the lowest distribution errors at 5 and 10 NFE (samplers that take one evaluation a step)."""
    lines = ["## Best at 5 and 10 NFE", "", "Every sampler with N network evaluations for N steps, on every grid "
             f"above; the {top} lowest per column. diffusers at 10 NFE on the Gaussian "
             "([sampler_10nfe.md](sampler_10nfe.md)): 0.083 at best with its schedulers' defaults (LMS, trailing), "
             "0.014 with DEIS order 3 on Karras σ. "
             "`fitted` was fitted on these two data sets (other starting points): an in-sample number; "
             "[fid_vs_nfe.md](fid_vs_nfe.md) is the out-of-sample check on a trained model.", "",
             "| rank | " + " | ".join(f"{d} {n} NFE" for d in DISTS for n in (5, 10)) + " |",
             "|---|" + "---|" * (2 * len(DISTS))]
    cols = []
    for dist in DISTS:
        for k in (0, 1):  # STEPS[0] = 5, STEPS[1] = 10
            cells = [(errs[k][1], name, sp) for (d, sp), table in dist_err.items() if d == dist
                     for name, errs in table.items() if name not in NFE and name != "dpm_adaptive"]
            cols.append(sorted(cells)[:top])
    for r in range(top):
        lines.append(f"| {r + 1} | " + " | ".join(f"{c[r][1]} {c[r][2]} {fmt(c[r][0])}" for c in cols) + " |")
    return lines + [""]


def fmt(e: float) -> str:
    return f"{e:.2g}" if e < 0.01 else f"{e:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sampler_certificate.md")
    p.add_argument("--png", type=Path, default=ROOT / "docs/sampler_certificate.png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    machine = f"{cpu} ({os.cpu_count()} cores), {torch.get_num_threads()} thread(s), " \
              f"python {platform.python_version()}, torch {torch.__version__}"
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = env + "python " + " ".join(sys.argv)
    print(f"# {command}\n# {machine}")
    t0 = time.perf_counter()
    dist_err = {(d, s): distribution_errors(d, s) for d in DISTS for s in GRIDS}
    det_err = {d: deterministic_errors(d) for d in DISTS}
    parity = diffusers_parity()
    elapsed = time.perf_counter() - t0

    lines = ["# Sampler certificate", "", f"machine: {machine}  ", f"command: `{command}`  ",
             f"time: {elapsed:.0f} s. Produced by [`benchmarks/sampler_certificate.py`](../sampler_certificate.py); "
             "plot: [`docs/sampler_certificate.png`](../../docs/sampler_certificate.png).", ""]
    lines += best_at_few_steps(dist_err)
    for dist in DISTS:
        metric = "W2 of the fitted Gaussian" if dist == "gauss" else "sliced W2 to the exact mixture"
        lines += [f"## {'Gaussian (3-D)' if dist == 'gauss' else 'Two-component mixture (2-D)'}: {metric}", "",
                  "Linear schedule, 8192 quasi-random starting points. Floor: " +
                  ("0.003 (ᾱ_T > 0)." if dist == "gauss" else "~0.015 for deterministic samplers; 8192 i.i.d. exact "
                   "samples give 0.012-0.092 (median 0.045), which is where the noisy samplers land.") +
                  " Order: slope of the deterministic error against NFE, Karras grid, 10-80 steps.", "",
                  "| sampler | spacing | NFE | " + " | ".join(f"{n} steps" for n in STEPS) + " | order |",
                  "|---|---|---|" + "---|" * len(STEPS) + "---|"]
        for name in SAMPLERS:
            if name == "dpm_adaptive":
                continue
            for spacing in GRIDS:
                errs = " | ".join(fmt(e) for _, e in dist_err[(dist, spacing)][name])
                o = f"{order(det_err[dist][name]):.2f}" if name in det_err[dist] and spacing == "karras" else ""
                o = o + " (η=0)" if name in ODE and o else o
                lines.append(f"| {name} | {spacing} | {NFE.get(name, 'N')} | {errs} | {o} |")
        lines += ["", "dpm_adaptive (rtol = atol; it starts at σ_max and `steps` = 20 sets only its first step):", "",
                  "| tolerance | NFE | distribution error | NFE | deterministic error |", "|---|---|---|---|---|"]
        for (label, _), (n1, e1), (nd, ed) in zip(ADAPTIVE, dist_err[(dist, "trailing")]["dpm_adaptive"],
                                                  det_err[dist]["dpm_adaptive"]):
            lines.append(f"| {label} | {n1} | {fmt(e1)} | {nd} | {ed:.2g} |")
        lines += ["", "Deterministic error (mean distance at σ_min to the reference) against NFE, Karras grid:", "",
                  "| sampler | " + " | ".join(f"{n} steps" for n in (5,) + ORDER_STEPS + (160,)) + " |",
                  "|---|" + "---|" * (len(ORDER_STEPS) + 2)]
        for name, pts in det_err[dist].items():
            if name != "dpm_adaptive":
                label = name + (" (η=0)" if name in ODE else "")
                lines.append(f"| {label} | " + " | ".join(f"{e:.2g} ({n})" for n, e in pts) + " |")
        lines.append("")
    if parity:
        lines += ["## Parity with diffusers (20 steps, scaled-linear betas, Gaussian ε-model, float32)", "",
                  "| sampler | spacing | diffusers scheduler | max abs difference |", "|---|---|---|---|"]
        lines += [f"| {n} | {s} | `{label}` | {d:.1e} |" for n, s, label, d in parity]
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    plot(dist_err, det_err, args.png)
    print("\n".join(lines))
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
