"""The math of diffusion: schedules, parameterisations, objective, samplers. No networks, no images."""

from latentdiff.diffusion.objective import WEIGHTINGS, diffusion_loss, loss_weight
from latentdiff.diffusion.samplers import SAMPLERS, SPACINGS, NonFiniteError, as_eps_fn, sample, timesteps_for
from latentdiff.diffusion.schedule import PREDICTIONS, SCHEDULES, Schedule, posterior_between

__all__ = ["Schedule", "sample", "diffusion_loss", "loss_weight", "timesteps_for", "posterior_between",
           "NonFiniteError", "as_eps_fn", "SAMPLERS", "SPACINGS", "SCHEDULES", "PREDICTIONS", "WEIGHTINGS"]
