"""The web API's request and answer schemas: what /openapi.json documents and FastAPI checks both ways."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from latentdiff.models.conditioning import CondKind
from latentdiff.models.settings import DEFAULT_SAMPLER, REPLACE_SAMPLER, SEED_MAX, SampleSettings, Task

TASKS = tuple(t.value for t in Task)
KINDS = tuple(k.value for k in CondKind)
MAX_UPLOAD_CHARS = 16_000_000  # base64 of a ~12 MB image file
MAX_UPLOAD_SIDE = 4096  # an uploaded image is refused before decoding past this (memory)
MAX_RESAMPLE = 20


class GenerateRequest(BaseModel):
    """A generation job (txt2img, img2img, inpaint or upscale); unset fields take the model's defaults."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = Field(description="a model id from GET /api/models")
    task: Literal[TASKS] = Field("txt2img", description="what to do; GET /api/models lists each model's tasks")
    image: Optional[str] = Field(None, max_length=MAX_UPLOAD_CHARS, description=(
        "base64 image file (PNG, JPEG, ...; a data: URL too): the input of img2img and inpaint (centre-cropped "
        "to the job's aspect ratio, resized to its width x height), the low-resolution image of upscale "
        "(exactly low_res_size)"))
    mask: Optional[str] = Field(None, max_length=MAX_UPLOAD_CHARS,
                                description="base64 image, inpaint only: white = redraw, black = keep")
    strength: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False,
                                      description="img2img: how far to noise the input (default 0.6)")
    resample: int = Field(SampleSettings.resample, ge=1, le=MAX_RESAMPLE,
                          description="inpaint (not inpainting models): RePaint repeats")
    prompt: Optional[str] = Field(None, max_length=2000)
    negative_prompt: Optional[str] = Field(None, max_length=2000)
    class_label: Optional[int] = Field(None, ge=0)
    sampler: Optional[str] = Field(None, description=f"a name from GET /api/samplers (UI name or ours); default "
                                                     f"{DEFAULT_SAMPLER}, {REPLACE_SAMPLER} to inpaint by replacement")
    spacing: Optional[str] = Field(None, description="timestep/σ spacing; default: the sampler preset's")
    steps: int = Field(SampleSettings.steps, ge=1)
    guidance: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    guidance_max_t: Optional[float] = Field(None, ge=0, allow_inf_nan=False,
                                            description="guide only steps with t <= this; default the model's")
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX, description="null: a random seed (returned in settings)")
    n_samples: int = Field(SampleSettings.n_samples, ge=1)
    batch_size: Optional[int] = Field(None, ge=1, description="images per network call; default n_samples")
    size: Optional[int] = Field(None, ge=8, description="image side of a square; default the model's")
    width: Optional[int] = Field(None, ge=8, description="image width (instead of size); default the model's")
    height: Optional[int] = Field(None, ge=8, description="image height (instead of size); default the model's")


class Problem(BaseModel):
    """Every error answer: one line naming the field or id and what is wrong with it."""

    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such job, image, preview or run"},
    422: {"model": Problem, "description": "invalid input: the detail names the field and the allowed values"}}


class ModelInfo(BaseModel):
    """A model the server can sample, with what the page needs to build its form."""

    model_config = ConfigDict(protected_namespaces=())
    id: str
    name: str
    kind: Literal[KINDS] = Field(description="conditioning")
    class_names: list[str]
    num_classes: int
    image_size: int = Field(description="the model's default side")
    size_multiple: int = Field(description="widths and heights must be multiples of this")
    resizable: bool
    tasks: list[Literal[TASKS]]
    low_res_size: Optional[int] = Field(description="side of an upscaler's input")
    channels: Optional[int]
    default_guidance: float
    source: str


class SamplersInfo(BaseModel):
    """Sampler names and the server's limits."""

    presets: dict[str, dict[str, str]] = Field(description="UI name -> {sampler, spacing}")
    default: str
    inpaint: list[str] = Field(description="UI names that inpainting by replacement can use")
    samplers: list[str]
    spacings: list[str]
    limits: dict[str, int]


class JobInfo(BaseModel):
    """A job's status, settings and results (images and preview by URL)."""

    model_config = ConfigDict(protected_namespaces=())
    id: str
    model: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    done: int
    total: int
    settings: dict[str, Any]
    error: Optional[str]
    created: float
    finished: Optional[float]
    images: list[str]
    preview: Optional[str]


class RunInfo(BaseModel):
    """A training run folder: its last step and loss, its grid and metrics by URL."""

    id: str
    name: str
    steps: Optional[int]
    loss: Optional[float]
    has_model: bool
    grid: Optional[str]
    metrics: str
