"""The web app: a JSON API (OpenAPI at /docs and /openapi.json) over the generation queue, and the page at /.

Clients name models, jobs and runs only by ids this server made; no client string becomes a path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError

from latentdiff.data.decode import read_image
from latentdiff.data.images import make_grid, upscale_nearest
from latentdiff.data.masks import read_mask
from latentdiff.diffusion.names import PRESETS, one_step_names
from latentdiff.diffusion.samplers import SAMPLERS
from latentdiff.diffusion.sigmas import SPACINGS
from latentdiff.errors import SettingError, UserError
from latentdiff.models.concat import ConcatKind
from latentdiff.models.conditioning import CondKind
from latentdiff.models.settings import DEFAULT_SAMPLER, SampleSettings, Task
from latentdiff.pipelines.generate import Pipeline
from latentdiff.server import runs as run_folders
from latentdiff.server.jobs import FINISHED, Job, JobQueue, QueueFull
from latentdiff.server.schemas import (ERRORS, MAX_UPLOAD_SIDE, GenerateRequest, JobInfo, ModelInfo, Problem,
                                       RunInfo, SamplersInfo)

STATIC = Path(__file__).parent / "static"
SSE_POLL_S = 0.05


@dataclass
class Limits:
    """What one request may ask for, and how many jobs may wait."""

    max_steps: int = 150
    max_size: int = 1024
    max_batch: int = 8
    queue: int = 8
    preview_every: int = 5  # decode the predicted x0 every this many steps for the page (0: never)
    keep_jobs: int = 200  # finished jobs remembered (their PNGs stay on disk); older ones answer 404


def slug(name: str) -> str:
    """A URL-safe id from a file or folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def load_models(paths: list[Path], device: str = "cpu") -> dict[str, Pipeline]:
    """Load model folders and SD checkpoints, keyed by unique ids made from their names."""
    from latentdiff.pipelines.stable_diffusion import load_any

    models: dict[str, Pipeline] = {}
    for path in paths:
        base = slug(Path(path).stem if Path(path).is_file() else Path(path).name)
        key, n = base, 2
        while key in models:
            key, n = f"{base}-{n}", n + 1
        models[key] = load_any(path, device)
    return models


def describe_model(key: str, pipe: Pipeline) -> dict[str, Any]:
    """What the model picker needs: conditioning kind, classes, sizes, default guidance."""
    m = pipe.manifest
    return {"id": key, "name": Path(pipe.path).name, "kind": pipe.cond.kind.value, "class_names": pipe.class_names,
            "num_classes": pipe.unet.config.num_classes if pipe.cond.kind is CondKind.CLASS else 0,
            "image_size": m.image_size, "size_multiple": pipe.size_multiple,
            "resizable": pipe.concat_kind is not ConcatKind.LOW_RES, "tasks": [t.value for t in pipe.tasks],
            "low_res_size": m.low_res_size, "channels": m.channels, "default_guidance": m.guidance,
            "source": m.source or "latentdiff model folder"}


def _bad(message: str, status: int = 422) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def validate(req: GenerateRequest, models: dict[str, Pipeline], limits: Limits) -> tuple[SampleSettings, Task]:
    """The job's settings and task: this server's limits and the request's shape here, everything a model
    cannot take from the core's checks (Pipeline.check); any refusal is a 422 naming the field."""
    if req.model not in models:
        raise _bad(f"model: unknown model {req.model!r}; this server has {', '.join(models) or 'none'}")
    pipe, task = models[req.model], Task(req.task)
    if req.steps > limits.max_steps:
        raise _bad(f"steps: {req.steps} is over this server's limit of {limits.max_steps}")
    batch_size = req.batch_size or req.n_samples
    for name, v in (("n_samples", req.n_samples), ("batch_size", batch_size)):
        if v > limits.max_batch:
            raise _bad(f"{name}: {v} is over this server's limit of {limits.max_batch}")
    sides = {k: v for k, v in (("size", req.size), ("width", req.width), ("height", req.height)) if v is not None}
    if "size" in sides and len(sides) > 1:
        raise _bad("size: give size (a square) or width and height, not both")
    for name, v in sides.items():
        if v > limits.max_size:
            raise _bad(f"{name}: {v} is over this server's limit of {limits.max_size}")
    if not sides and pipe.manifest.image_size > limits.max_size:
        raise _bad(f"size: the model's {pipe.manifest.image_size} px is over this server's limit of {limits.max_size}")
    for name, used in (("image", task is not Task.TXT2IMG), ("mask", task is Task.INPAINT),
                       ("strength", task in (Task.IMG2IMG, Task.INPAINT)), ("resample", task is Task.INPAINT)):
        given = getattr(req, name) not in (None, 1) if name == "resample" else getattr(req, name) is not None
        if given and not used:
            raise _bad(f"{name}: not used by task {task}")
        if used and name in ("image", "mask") and not given:
            raise _bad(f"{name}: task {task} needs an input {name} (base64)")
    if req.steps * req.resample > limits.max_steps:
        raise _bad(f"resample: {req.steps} steps x {req.resample} resamples is over this server's limit of "
                   f"{limits.max_steps} steps")
    settings = SampleSettings(
        req.n_samples, batch_size, req.steps, req.sampler, secrets.randbelow(2**32) if req.seed is None else req.seed,
        spacing=req.spacing, guidance=req.guidance, guidance_max_t=req.guidance_max_t, class_label=req.class_label,
        prompt=req.prompt, negative_prompt=req.negative_prompt,
        strength=task.default_strength if req.strength is None else req.strength,
        resample=req.resample, width=req.width or req.size, height=req.height or req.size)
    try:
        return pipe.check(settings, task), task
    except SettingError as e:  # the request's own name for a side given as size
        field = "size" if req.size is not None and e.field in ("width", "height") else e.field
        raise _bad(f"{field}: {e.problem}") from None


def decode_inputs(req: GenerateRequest, pipe: Pipeline, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The job's input images as Pipeline.run takes them, or a 422 naming the field and the problem."""
    channels, inputs, task = pipe.manifest.channels, {}, Task(req.task)
    try:
        if task in (Task.IMG2IMG, Task.INPAINT):
            inputs["images"] = read_image(_upload(req.image, "image")[0], size, channels, name="image")[None]
        if task is Task.INPAINT:
            inputs["mask"] = read_mask(_upload(req.mask, "mask")[0], size, name="mask")
        if task is Task.UPSCALE:
            low, (data, (w, h)) = pipe.manifest.low_res_size, _upload(req.image, "image")
            if (w, h) != (low, low):
                raise _bad(f"image: {w}x{h}; model {req.model!r} upscales {low}x{low} images")
            inputs["low_res"] = read_image(data, low, channels, name="image")[None]
    except UserError as e:
        raise _bad(str(e)) from None
    return inputs


def _upload(text: str, name: str) -> tuple[bytes, tuple[int, int]]:
    """An image field's bytes and (width, height) from base64 or a data: URL; past MAX_UPLOAD_SIDE refused undecoded."""
    try:
        data = base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError, IndexError):
        raise _bad(f"{name}: not base64 (send the image file's bytes base64-encoded, or a data: URL)") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise _bad(f"{name}: cannot read image ({e})") from None
    if max(w, h) > MAX_UPLOAD_SIDE:
        raise _bad(f"{name}: {w}x{h} is larger than this server takes ({MAX_UPLOAD_SIDE} px a side)")
    return data, (w, h)


def make_runner(models: dict[str, Pipeline], outputs: Path,
                preview_every: int = 0) -> Callable[[Job, Callable[[int, int], None]], list[Path]]:
    """The queue's worker function: run the job's settings, write PNGs under outputs/<job id>/, preview x0.

    Each job carries its own settings (size included) into Pipeline.run: the shared model is never changed.
    """
    def run(job: Job, progress: Callable[[int, int], None]) -> list[Path]:
        pipe, inputs = models[job.model], dict(job.inputs)
        settings = inputs.pop("settings")

        def preview(done: int, images: torch.Tensor) -> None:
            buf = io.BytesIO()
            make_grid(upscale_nearest(images)).save(buf, format="PNG")
            job.preview = buf.getvalue()
            job.emit("preview", done=done, url=f"/api/jobs/{job.id}/preview?step={done}")

        images = pipe.run(settings, callback=progress, preview=preview if preview_every else None,
                          preview_every=preview_every or 1, **inputs).images
        paths, _ = pipe.save(images, outputs / job.id, job.settings)
        return paths
    return run


def create_app(models: dict[str, Pipeline], limits: Optional[Limits] = None, outputs: Path | str = "outputs",
               runs: Optional[list[Path]] = None, cors_origins: Optional[list[str]] = None) -> FastAPI:
    """The FastAPI app serving ``models`` (id -> Pipeline) under ``limits``; PNGs go to ``outputs``."""
    limits = limits or Limits()
    outputs, run_roots = Path(outputs), [Path(r) for r in runs or []]
    jobs = JobQueue(make_runner(models, outputs, limits.preview_every), limits.queue, limits.keep_jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jobs.start()
        yield
        await asyncio.to_thread(jobs.stop)

    app = FastAPI(title="latentdiff", version="0.1.0", lifespan=lifespan, responses=ERRORS,
                  description="Generate images with latentdiff models and browse training runs.")
    app.state.jobs, app.state.limits = jobs, limits
    if cors_origins:  # closed by default: the page is served from this origin and needs no CORS
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Content-Type", "Last-Event-ID"])

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = [("body: not valid JSON at character {} ({})".format(e["loc"][-1], e.get("ctx", {}).get("error", "?"))
                 if e["type"] == "json_invalid" else
                 ("/".join(str(p) for p in e["loc"] if p != "body") or "body") + f": {e['msg']}") for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(msgs)}, status_code=422)

    def job_or_404(job_id: str) -> Job:
        job = jobs.jobs.get(job_id)
        if job is None:
            raise _bad(f"no job {job_id!r}", 404)
        return job

    def run_or_404(run_id: str) -> Path:
        folder = run_folders.find_runs(run_roots).get(run_id)
        if folder is None:
            raise _bad(f"no run {run_id!r}", 404)
        return folder

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/models", summary="Models this server can sample")
    def list_models() -> list[ModelInfo]:
        return [describe_model(k, p) for k, p in models.items()]

    @app.get("/api/samplers", summary="Sampler names (UI presets and ours) and spacings")
    def list_samplers() -> SamplersInfo:
        return {"presets": {k: {"sampler": s, "spacing": sp} for k, (s, sp) in PRESETS.items()},
                "default": DEFAULT_SAMPLER, "inpaint": one_step_names(),
                "samplers": list(SAMPLERS), "spacings": list(SPACINGS), "limits": vars(limits)}

    @app.post("/api/jobs", status_code=202, summary="Queue a generation job",
              responses={400: {"model": Problem, "description": "the body could not be read as text"},
                         429: {"model": Problem, "description": "busy: the waiting line is full (Retry-After)"}})
    def submit(req: GenerateRequest) -> JobInfo:
        settings, task = validate(req, models, limits)
        pipe = models[req.model]
        inputs = decode_inputs(req, pipe, pipe.image_hw(settings))
        try:
            job = jobs.submit(req.model, pipe.describe(settings, task), {"settings": settings, **inputs})
        except QueueFull as e:
            raise HTTPException(429, detail=str(e), headers={"Retry-After": "5"}) from None
        return job.summary()

    @app.get("/api/jobs", summary="All jobs, newest first")
    def list_jobs() -> list[JobInfo]:
        return [j.summary() for j in sorted(jobs.all(), key=lambda j: -j.created)]

    @app.get("/api/jobs/{job_id}", summary="A job's status and images")
    def get_job(job_id: str) -> JobInfo:
        return job_or_404(job_id).summary()

    @app.delete("/api/jobs/{job_id}", summary="Cancel a job (waiting: never starts; running: stops at its next step)")
    def cancel_job(job_id: str) -> JobInfo:
        return jobs.cancel(job_or_404(job_id).id).summary()

    @app.get("/api/jobs/{job_id}/events", summary="Server-sent events: queued, started, progress per step, "
             "then done, failed or cancelled", response_class=StreamingResponse)
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        job = job_or_404(job_id)
        last = request.headers.get("last-event-id", "")
        start = int(last) + 1 if last.isdigit() else 0

        async def stream() -> AsyncIterator[str]:
            i = start
            while True:
                while i < len(job.events):
                    ev = job.events[i]
                    yield f"id: {i}\nevent: {ev['event']}\ndata: {json.dumps(ev)}\n\n"
                    i += 1
                    if ev["event"] in FINISHED:
                        return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(SSE_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/api/jobs/{job_id}/images/{index}", summary="One result PNG (settings in its metadata)",
             response_class=FileResponse)
    def job_image(job_id: str, index: int) -> FileResponse:
        job = job_or_404(job_id)
        if not 0 <= index < len(job.images):
            raise _bad(f"job {job_id} has {len(job.images)} images; no index {index}", 404)
        return FileResponse(job.images[index], media_type="image/png")

    @app.get("/api/jobs/{job_id}/preview", summary="The latest preview of a running job: its predicted x0, "
             "decoded (a grid of the current chunk)", response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    def job_preview(job_id: str) -> Response:
        job = job_or_404(job_id)
        if job.preview is None:
            raise _bad(f"job {job_id} has no preview yet", 404)
        return Response(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/runs", summary="Training runs (folders with metrics.csv) under the served run folders")
    def list_runs() -> list[RunInfo]:
        return [run_folders.describe(k, p) for k, p in run_folders.find_runs(run_roots).items()]

    @app.get("/api/runs/{run_id}/metrics", summary="A run's metrics.csv as columns (the loss curve)")
    def run_metrics(run_id: str) -> dict[str, list[Optional[float]]]:
        return run_folders.read_metrics(run_or_404(run_id))

    @app.get("/api/runs/{run_id}/grid", summary="A run's latest sample grid", response_class=FileResponse)
    def run_grid(run_id: str) -> FileResponse:
        grid = run_folders.latest_grid(run_or_404(run_id))
        if grid is None:
            raise _bad(f"run {run_id!r} has no sample grid yet", 404)
        return FileResponse(grid, media_type="image/png")

    return app


__all__ = ["Limits", "create_app", "load_models"]
