"""latentdiff: latent diffusion you can read in an afternoon."""

__version__ = "0.1.0"
