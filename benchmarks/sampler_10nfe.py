"""Samplers at 10 network evaluations (NFE) on the certificate's data, against diffusers' schedulers.

    OMP_NUM_THREADS=1 python benchmarks/sampler_10nfe.py

Gaussian W2 and mixture sliced W2 (latentdiff.diffusion.exact: exact denoisers, linear schedule, 8192
quasi-random starting points) for our multistep samplers on three σ grids, and for diffusers' schedulers
with their defaults (plus DEIS order 3) driven by their own set_timesteps/scale_model_input/step loop
with the same exact ε-model, in the same process. Writes benchmarks/results/sampler_10nfe.md.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

from latentdiff.diffusion import Schedule, sample  # noqa: E402
from latentdiff.diffusion.exact import GAUSSIAN, MIXTURE, qmc_normal  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LINEAR = Schedule.from_name("linear")
DATA = {"gauss": (GAUSSIAN, qmc_normal(8192, 3), GAUSSIAN.w2),
        "mixture": (MIXTURE, qmc_normal(8192, 2), MIXTURE.sliced_w2)}
OURS = ["lms", "dpmpp_2m", "unipc", "unipc_bh2", "deis", "dpmpp_3m_sde"]
SPACINGS = ["trailing", "karras", "exponential"]


def ours(dist: str, name: str, spacing: str, steps: int = 10) -> float:
    data, noise, metric = DATA[dist]
    x = sample(data.eps_fn(LINEAR), noise, LINEAR, name, steps, generator=torch.Generator().manual_seed(1),
               spacing=spacing)
    return metric(x)


def theirs(dist: str, scheduler, steps: int = 10) -> float:
    """diffusers' own loop; fractional timesteps reach the ε-model as floats, integer ones as longs."""
    data, noise, metric = DATA[dist]
    eps = data.eps_fn(LINEAR)
    scheduler.set_timesteps(steps)
    x = noise * (1 + float(scheduler.sigmas.max()) ** 2) ** 0.5 if scheduler.init_noise_sigma != 1.0 else noise.clone()
    g = torch.Generator().manual_seed(3)
    for t in scheduler.timesteps:
        tt = float(t)
        t_in = torch.full((len(x),), tt, dtype=torch.float64 if tt != round(tt) else torch.long)
        kw = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
        x = scheduler.step(eps(scheduler.scale_model_input(x, t), t_in), t, x, **kw).prev_sample
    return metric(x)


def diffusers_cases():
    import diffusers as d
    b = LINEAR.betas.numpy()
    grid = {"trailing": {"timestep_spacing": "trailing"}, "karras": {"use_karras_sigmas": True}}
    for label, cls, opts in [("LMSDiscreteScheduler", d.LMSDiscreteScheduler, {}),
                             ("DPMSolverMultistepScheduler", d.DPMSolverMultistepScheduler, {}),
                             ("DPMSolverMultistepScheduler 3M SDE", d.DPMSolverMultistepScheduler,
                              {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
                             ("UniPCMultistepScheduler", d.UniPCMultistepScheduler, {}),
                             ("DEISMultistepScheduler", d.DEISMultistepScheduler, {}),
                             ("DEISMultistepScheduler order 3", d.DEISMultistepScheduler, {"solver_order": 3}),
                             ("EulerDiscreteScheduler", d.EulerDiscreteScheduler, {}),
                             ("HeunDiscreteScheduler (5 steps, 9 NFE)", d.HeunDiscreteScheduler, {})]:
        for spacing, g in grid.items():
            yield label, spacing, lambda cls=cls, opts=opts, g=g: cls(trained_betas=b, **g, **opts)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    command = "OMP_NUM_THREADS=1 python benchmarks/sampler_10nfe.py"
    machine = f"{cpu_name()} ({os.cpu_count()} cores), 1 thread"
    lines = ["# Samplers at 10 NFE", "", f"machine: {machine}  ", f"command: `{command}`  ",
             "Gaussian W2 / mixture sliced W2 (floors: 0.003 / ~0.015), linear schedule, 8192 quasi-random "
             "starting points; diffusers run in the same process with the same exact ε-model.", "",
             "| ours, 10 steps | " + " | ".join(SPACINGS) + " |", "|---" * (len(SPACINGS) + 1) + "|"]
    for name in OURS:
        cells = [f"{ours('gauss', name, sp):.4f} / {ours('mixture', name, sp):.4f}" for sp in SPACINGS]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", "| diffusers, 10 steps | trailing | karras |", "|---|---|---|"]
    rows: dict[str, list[str]] = {}
    for label, spacing, make in diffusers_cases():
        steps = 5 if label.startswith("Heun") else 10
        rows.setdefault(label, []).append(f"{theirs('gauss', make(), steps):.4f} / "
                                          f"{theirs('mixture', make(), steps):.4f}")
    for label, cells in rows.items():
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", "diffusers' UniPC/DEIS/DPMSolver with Karras σ round the network's timestep (ours pass the "
              "fractional one); diffusers' DEIS ends at σ_min without the final denoising step."]
    out = ROOT / "benchmarks" / "results" / "sampler_10nfe.md"
    out.write_text("\n".join(lines) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
