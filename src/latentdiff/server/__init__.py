"""The local web app (``latentdiff serve``): a FastAPI JSON API over one generation queue, and a page."""

from latentdiff.server.app import Limits, create_app, load_models
from latentdiff.server.schemas import GenerateRequest

__all__ = ["GenerateRequest", "Limits", "create_app", "load_models"]
