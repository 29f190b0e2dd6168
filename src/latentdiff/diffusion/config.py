"""The diffusion process and what the network predicts: the settings a model folder carries."""

from __future__ import annotations

from dataclasses import dataclass

from latentdiff.diffusion.objective import WEIGHTINGS
from latentdiff.diffusion.schedule import PREDICTIONS, SCHEDULES, Schedule
from latentdiff.errors import UserError
from latentdiff.formats.dataclass_io import check_choice, check_positive


@dataclass
class DiffusionConfig:
    """The diffusion process and what the network predicts."""

    schedule: str = "linear"  # linear (DDPM), cosine (improved DDPM) or scaled_linear (Stable Diffusion)
    num_timesteps: int = 1000  # T
    prediction: str = "eps"  # what the UNet outputs: eps, x0 or v
    weighting: str = "uniform"  # λ(t): uniform (DDPM "simple") or min_snr (Min-SNR-γ)
    min_snr_gamma: float = 5.0  # γ of min_snr
    min_snr_offset: float = 0.0  # c of min_snr's x-loss weight min(SNR + c, γ): 1 keeps plain v's weight at high noise
    beta_start: float | None = None  # β_1 and β_T of linear / scaled_linear; None: the schedule's own defaults
    beta_end: float | None = None

    def __post_init__(self) -> None:
        check_choice("diffusion.schedule", self.schedule, SCHEDULES)
        check_choice("diffusion.prediction", self.prediction, PREDICTIONS)
        check_choice("diffusion.weighting", self.weighting, WEIGHTINGS)
        check_positive("diffusion.min_snr_gamma", self.min_snr_gamma)
        if self.min_snr_offset < 0:
            raise UserError(f"diffusion.min_snr_offset must be >= 0, got {self.min_snr_offset}")
        check_positive("diffusion.num_timesteps", self.num_timesteps)

    def build_schedule(self) -> Schedule:
        """The Schedule these settings describe."""
        ends = {k: v for k, v in (("beta_start", self.beta_start), ("beta_end", self.beta_end)) if v is not None}
        return Schedule.from_name(self.schedule, self.num_timesteps, **ends)
