"""The sampler names users know ("DPM++ 2M Karras", "Euler a") as data: each is one of our samplers on a spacing.

Web UIs (A1111, ComfyUI) name a sampler and its σ grid together; diffusers names a scheduler class and
a flag. Both map onto our pure samplers (samplers.py) and spacings (sigmas.py); the command line, the
web API and the Python API resolve names here, and docs/samplers.md's tables are rendered from this data
(tests/test_sampler_names.py checks that they match).
"""

from __future__ import annotations

from typing import Optional

from latentdiff.diffusion.samplers import ONE_STEP, SAMPLERS
from latentdiff.diffusion.sigmas import SPACINGS
from latentdiff.errors import SettingError

# what users type -> (our sampler, spacing); "Karras" is the σ grid of Karras et al. (2022)
PRESETS: dict[str, tuple[str, str]] = {
    "DDIM": ("ddim", "trailing"), "DDPM": ("ddpm", "trailing"), "Euler": ("euler", "trailing"),
    "Euler a": ("euler_ancestral", "trailing"), "Heun": ("heun", "trailing"), "LMS": ("lms", "trailing"),
    "LMS Karras": ("lms", "karras"), "DPM++ 2M": ("dpmpp_2m", "trailing"), "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "trailing"), "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", "trailing"), "DPM++ 3M SDE Karras": ("dpmpp_3m_sde", "karras"),
    "DPM adaptive": ("dpm_adaptive", "trailing"), "LCM": ("lcm", "lcm")}
OWN_SPACING = "trailing"  # the spacing of a sampler named by our own name: always starts at pure noise

# our sampler -> (diffusers scheduler, k-diffusion function, network evaluations for N steps, kind)
EQUIVALENTS: dict[str, tuple[str, str, str, str]] = {
    "ddpm": ("`DDPMScheduler`", "—", "N", "ancestral, 1st order"),
    "ddim": ("`DDIMScheduler` (`eta=`)", "—", "N", "deterministic at η = 0, 1st order"),
    "euler": ("`EulerDiscreteScheduler`", "`sample_euler`", "N", "deterministic, 1st order"),
    "euler_ancestral": ("`EulerAncestralDiscreteScheduler`", "`sample_euler_ancestral`", "N", "ancestral, 1st order"),
    "heun": ("`HeunDiscreteScheduler`", "`sample_heun`", "2N-1", "deterministic, 2nd order"),
    "lms": ("`LMSDiscreteScheduler`", "`sample_lms`", "N", "deterministic, linear multistep (order 4)"),
    "dpmpp_2m": ("`DPMSolverMultistepScheduler` (defaults: `dpmsolver++`, order 2, midpoint)", "`sample_dpmpp_2m`",
                 "N", "deterministic, 2nd order"),
    "dpmpp_2m_sde": ('`DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`', "`sample_dpmpp_2m_sde`",
                     "N", "stochastic, 2nd order"),
    "dpmpp_3m_sde": ("none (`η=0` is `DPMSolverMultistepScheduler(solver_order=3)`)", "`sample_dpmpp_3m_sde`", "N",
                     "stochastic, 3rd-order multistep"),
    "dpm_adaptive": ("none", "`sample_dpm_adaptive`", "chosen by the solver", "deterministic, adaptive 3(2)"),
    "lcm": ("`LCMScheduler` (its timesteps: `spacing=\"lcm\"`)", "`sample_lcm`", "N",
            "consistency model, fresh noise every step")}


def resolve(name: str, spacing: Optional[str] = None) -> tuple[str, str]:
    """(sampler, spacing) for a name users know ("DPM++ 2M Karras", any case) or ours ("dpmpp_2m").

    ``spacing`` overrides the name's own grid; unknown names or spacings raise a SettingError naming them.
    """
    presets = {k.lower(): v for k, v in PRESETS.items()}
    if not isinstance(name, str):
        raise SettingError("sampler", f"expected a sampler name, got {name!r}")
    if name in SAMPLERS:
        sampler, own = name, OWN_SPACING
    elif name.lower() in presets:
        sampler, own = presets[name.lower()]
    else:
        raise SettingError("sampler", f"unknown sampler {name!r}; choose one of {', '.join(PRESETS)} "
                                      f"(web UI names) or {', '.join(SAMPLERS)}")
    spacing = own if spacing is None else spacing
    if spacing not in SPACINGS:
        raise SettingError("spacing", f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return sampler, spacing


def one_step_names() -> list[str]:
    """The names users know of the samplers inpainting by replacement can use (those with no history)."""
    return [k for k, (sampler, _) in PRESETS.items() if sampler in ONE_STEP]


def presets_table() -> str:
    """The markdown table of docs/samplers.md: each name users know and what it runs."""
    rows = [f'| "{k}" | `{s}` | `{sp}` |' for k, (s, sp) in PRESETS.items()]
    return "\n".join(["| name | `sampler=` | `spacing=` |", "|---|---|---|", *rows])


def equivalents_table() -> str:
    """The markdown table of docs/samplers.md: each sampler, the names users know, diffusers and k-diffusion."""
    rows = []
    for sampler, (diffusers, k_diffusion, nfe, kind) in EQUIVALENTS.items():
        names = ", ".join(k for k, (s, _) in PRESETS.items() if s == sampler)
        rows.append(f"| `{sampler}` | {names} | {diffusers} | {k_diffusion} | {nfe} | {kind} |")
    return "\n".join(["| `sampler=` | web UIs (A1111, ComfyUI) | diffusers scheduler | k-diffusion | NFE for N steps "
                      "| kind |", "|---|---|---|---|---|---|", *rows])
