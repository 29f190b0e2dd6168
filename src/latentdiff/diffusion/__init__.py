"""The math of diffusion: schedules, parameterisations, objective, samplers. No networks, no images."""

from latentdiff.diffusion.guidance import classifier_free_guidance, regional_guidance
from latentdiff.diffusion.objective import WEIGHTINGS, diffusion_loss, draw_t_eps, loss_weight
from latentdiff.diffusion.samplers import SAMPLERS, NonFiniteError, as_eps_fn, sample
from latentdiff.diffusion.schedule import PREDICTIONS, SCHEDULES, Schedule, posterior_between
from latentdiff.diffusion.sigmas import SPACINGS, Denoiser, sigmas_for, timesteps_for

__all__ = ["Schedule", "sample", "diffusion_loss", "draw_t_eps", "loss_weight", "timesteps_for", "sigmas_for",
           "posterior_between",
           "Denoiser", "NonFiniteError", "as_eps_fn", "classifier_free_guidance", "regional_guidance", "SAMPLERS",
           "SPACINGS", "SCHEDULES", "PREDICTIONS", "WEIGHTINGS"]
