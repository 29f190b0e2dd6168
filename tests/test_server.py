"""The web app's JSON API through FastAPI's TestClient, with a tiny trained model."""

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from latentdiff.data.images import make_grid, read_png_settings, upscale_nearest  # noqa: E402
from latentdiff.pipelines.generate import SEED_MAX, Pipeline  # noqa: E402
from latentdiff.server import Limits, create_app, load_models  # noqa: E402

LONG = 1000  # steps of a job that is still running when we cancel it (= the schedule's T)
MAX_STEPS = 2 * LONG


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from latentdiff.training.config import load_config
    from latentdiff.training.diffusion_trainer import DiffusionTrainer

    cfg = load_config("digits-tiny", ["train.steps=4", "train.grid_samples=4", "train.grid_steps=2", "data.limit=32"])
    out = tmp_path_factory.mktemp("runs") / "tiny"
    DiffusionTrainer(cfg, out, progress=False).run()
    return out


@pytest.fixture(scope="module")
def models(run_dir):
    return load_models([run_dir])


def client(models, tmp_path, **kwargs):
    limits = Limits(max_steps=MAX_STEPS, max_size=64, max_batch=4, queue=kwargs.pop("queue", 4),
                    preview_every=kwargs.pop("preview_every", 0), keep_jobs=kwargs.pop("keep_jobs", 200))
    return TestClient(create_app(models, limits, tmp_path / "outputs", **kwargs))


def events(c, job_id):
    """The job's server-sent events, parsed, until its last one."""
    out = []
    with c.stream("GET", f"/api/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


def wait_for(c, job_id, status, timeout=60):
    t0 = time.time()
    while (job := c.get(f"/api/jobs/{job_id}").json())["status"] != status:
        assert time.time() - t0 < timeout, job
        time.sleep(0.02)
    return job


def test_generate_streams_progress_and_serves_pngs_with_settings(models, tmp_path):
    with client(models, tmp_path) as c:
        assert [m["id"] for m in c.get("/api/models").json()] == ["tiny"]
        r = c.post("/api/jobs", json={"model": "tiny", "sampler": "DDIM", "steps": 4, "seed": 7, "n_samples": 3,
                                      "batch_size": 2})
        assert r.status_code == 202, r.text
        job = r.json()
        evs = events(c, job["id"])
        assert [e["event"] for e in evs] == ["queued", "started"] + ["progress"] * 8 + ["done"]
        assert [(e["done"], e["total"]) for e in evs[2:-1]] == [(i, 8) for i in range(1, 9)]  # 2 chunks x 4 steps
        status = c.get(f"/api/jobs/{job['id']}").json()
        assert status["status"] == "done" and status["images"] == evs[-1]["images"] and len(status["images"]) == 3
        direct = Pipeline.load(models["tiny"].path).generate(3, 2, 4, "ddim", 7, spacing="trailing")
        for i, url in enumerate(status["images"]):
            png = c.get(url)
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            path = tmp_path / f"{i}.png"
            path.write_bytes(png.content)
            s = read_png_settings(path)
            got = (s["seed"], s["sampler"], s["spacing"], s["steps"], s["sampler_name"])
            assert got == (7 + i, "ddim", "trailing", 4, "DDIM")
            served = torch.from_numpy(np.array(Image.open(path))).int()
            assert (served - direct[i, 0].int()).abs().max() <= 1  # the same image the Python API draws
        # outputs: one folder per job, named by the server's id, and no temporary files left behind
        assert [p.name for p in (tmp_path / "outputs").iterdir()] == [job["id"]]
        assert sorted(p.name for p in (tmp_path / "outputs" / job["id"]).iterdir()) == \
            ["000007.png", "000008.png", "000009.png", "grid.png"]


def _png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _served(c, url) -> torch.Tensor:
    r = c.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    a = np.array(Image.open(io.BytesIO(r.content)))
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).int()


def test_previews_of_x0_arrive_every_n_steps(models, tmp_path):
    seen = []
    direct = Pipeline.load(models["tiny"].path).generate(2, 2, 4, "ddim", 5, preview_every=2,
                                                         preview=lambda k, x: seen.append((k, x.clone())))
    assert [k for k, _ in seen] == [2, 4] and seen[-1][1].shape == direct.shape
    with client(models, tmp_path, preview_every=2) as c:
        job = c.post("/api/jobs",
                     json={"model": "tiny", "sampler": "DDIM", "steps": 4, "seed": 5, "n_samples": 2}).json()
        assert c.get(f"/api/jobs/{job['id']}/preview").status_code in (404, 200)
        evs = events(c, job["id"])
        assert [e["event"] for e in evs] == ["queued", "started", "progress", "progress", "preview", "progress",
                                             "progress", "preview", "done"]
        assert [e["done"] for e in evs if e["event"] == "preview"] == [2, 4]
        served = _served(c, evs[-2]["url"])  # the latest preview: step 4's x0 of both samples, as a grid
        grid = torch.from_numpy(np.array(make_grid(upscale_nearest(seen[-1][1])))).int()
        assert (served[0] - grid).abs().max() <= 1
        assert c.get(f"/api/jobs/{job['id']}").json()["preview"] == f"/api/jobs/{job['id']}/preview"


def test_img2img_and_inpaint_equal_the_python_api(models, tmp_path):
    pipe = Pipeline.load(models["tiny"].path)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:9] = 255  # white = redraw
    x = torch.from_numpy(image)[None, None]
    keep = torch.from_numpy((mask == 0).astype(np.float32))
    with client(models, tmp_path) as c:
        a = c.post("/api/jobs", json={"model": "tiny", "task": "img2img", "image": _png_b64(image), "strength": 0.5,
                                      "sampler": "DDIM", "steps": 6, "seed": 3}).json()
        b = c.post("/api/jobs", json={"model": "tiny", "task": "inpaint", "image": "data:image/png;base64,"
                                      + _png_b64(image), "mask": _png_b64(mask), "resample": 2, "sampler": "DDIM",
                                      "steps": 4, "seed": 4}).json()
        img2img = _served(c, wait_for(c, a["id"], "done")["images"][0])
        inpainted = _served(c, wait_for(c, b["id"], "done")["images"][0])
        assert (a["settings"]["task"], a["settings"]["strength"]) == ("img2img", 0.5)
        assert (b["settings"]["task"], b["settings"]["strength"], b["settings"]["resample"]) == ("inpaint", 1.0, 2)
    ref = pipe.img2img(x, strength=0.5, n_samples=1, steps=6, sampler="ddim", seed=3)
    assert (img2img - ref[0].int()).abs().max() <= 1 and (img2img - x[0].int()).abs().float().mean() > 1
    ref = pipe.inpaint(x, keep, resample=2, n_samples=1, steps=4, sampler="ddim", seed=4)
    assert (inpainted - ref[0].int()).abs().max() <= 1
    assert torch.equal(inpainted[0][keep.bool()], x[0, 0][keep.bool()].int())  # kept pixels exactly
    assert not torch.equal(inpainted[0][~keep.bool()], x[0, 0][~keep.bool()].int())


@pytest.fixture(scope="module")
def task_models(run_dir, tmp_path_factory):
    from latentdiff.training.config import load_config
    from latentdiff.training import make_trainer

    root = tmp_path_factory.mktemp("task-models")
    tiny = ["train.steps=3", "train.grid_samples=2", "train.grid_steps=2", "data.limit=32", "train.warmup_steps=1",
            "train.threads=1"]
    for name, extra in (("sr", ["unet.in_channels=2", "cond.concat=low_res", "cond.low_res_size=8"]),
                        ("inp", ["unet.in_channels=3", "cond.concat=inpaint"])):
        make_trainer(load_config("digits-tiny", tiny + extra), root / name, progress=False).run()
    return load_models([run_dir, root / "sr", root / "inp"])


def test_upscale_and_inpainting_models(task_models, tmp_path):
    low = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    with client(task_models, tmp_path) as c:
        tasks = {m["id"]: (m["tasks"], m["low_res_size"]) for m in c.get("/api/models").json()}
        assert tasks == {"tiny": (["txt2img", "img2img", "inpaint"], None), "sr": (["upscale"], 8),
                         "inp": (["inpaint"], None)}
        job = c.post("/api/jobs", json={"model": "sr", "task": "upscale", "image": _png_b64(low), "steps": 3,
                                        "sampler": "DDIM", "seed": 2, "n_samples": 2}).json()
        up = [_served(c, u) for u in wait_for(c, job["id"], "done")["images"]]
    ref = task_models["sr"].upscale(torch.from_numpy(low)[None, None], n_samples=2, steps=3, sampler="ddim", seed=2)
    assert all(u.shape == (1, 16, 16) and (u - r.int()).abs().max() <= 1 for u, r in zip(up, ref))


@pytest.mark.parametrize("change, message", [
    ({"image": "AAAA"}, "image: not used by task txt2img"),
    ({"task": "img2img"}, "image: task img2img needs an input image (base64)"),
    ({"task": "img2img", "image": "not base64!"}, "image: not base64"),
    ({"task": "img2img", "image": base64.b64encode(b"GIF89a nonsense").decode()}, "image: cannot read image"),
    ({"task": "img2img", "image": "big"}, "image: 4097x1 is larger than this server takes (4096 px a side)"),
    ({"task": "img2img", "image": "ok", "mask": "ok"}, "mask: not used by task img2img"),
    ({"task": "inpaint", "image": "ok"}, "mask: task inpaint needs an input mask (base64)"),
    ({"task": "inpaint", "image": "ok", "mask": "black"}, "mask marks nothing to redraw"),
    ({"task": "inpaint", "image": "ok", "mask": "ok", "resample": 3, "steps": MAX_STEPS // 2},
     f"resample: {MAX_STEPS // 2} steps x 3 resamples is over this server's limit of {MAX_STEPS} steps"),
    ({"task": "upscale", "image": "ok"}, "task: this model does txt2img, img2img, inpaint, not upscale; it is not a "
                                          "super-resolution model"),
    ({"task": "sketch"}, "task: Input should be 'txt2img', 'img2img', 'inpaint' or 'upscale'"),
    ({"strength": 0.5}, "strength: not used by task txt2img"),
    ({"task": "inpaint", "image": "ok", "mask": "ok", "sampler": "DPM++ 2M Karras"},
     "sampler: inpainting by replacement steps the sampler one step at a time; 'DPM++ 2M Karras' cannot; choose one "
     "of ddpm, ddim, euler, euler_ancestral, heun"),
    ({"task": "img2img", "image": "ok", "strength": 1.5}, "strength: Input should be less than or equal to 1"),
])
def test_invalid_task_inputs_name_the_field(models, tmp_path, change, message):
    uploads = {"ok": _png_b64(np.full((16, 16), 99, np.uint8)), "black": _png_b64(np.zeros((16, 16), np.uint8)),
               "big": _png_b64(np.zeros((1, 4097), np.uint8))}
    body = {"model": "tiny", "steps": 2, "sampler": "DDIM"} | {k: uploads.get(v, v) if isinstance(v, str) else v
                                                               for k, v in change.items()}
    with client(models, tmp_path) as c:
        r = c.post("/api/jobs", json=body)
        assert r.status_code == 422 and message in r.json()["detail"], r.text
        assert c.get("/api/jobs").json() == []


def test_only_the_newest_finished_jobs_are_kept(models, tmp_path):
    with client(models, tmp_path, keep_jobs=2) as c:
        ids = []
        for seed in range(4):
            ids.append(c.post("/api/jobs", json={"model": "tiny", "steps": 1, "seed": seed}).json()["id"])
            wait_for(c, ids[-1], "done")
        assert [j["id"] for j in c.get("/api/jobs").json()] == ids[:1:-1]
        assert c.get(f"/api/jobs/{ids[0]}").status_code == 404
        assert len(list((tmp_path / "outputs").iterdir())) == 4  # forgotten, not deleted


def test_random_seed_is_reported(models, tmp_path):
    with client(models, tmp_path) as c:
        job = c.post("/api/jobs", json={"model": "tiny", "steps": 1}).json()
        assert 0 <= job["settings"]["seed"] < 2**32
        assert wait_for(c, job["id"], "done")["settings"]["seed"] == job["settings"]["seed"]


def test_cancel_a_running_job(models, tmp_path):
    with client(models, tmp_path) as c:
        job = c.post("/api/jobs", json={"model": "tiny", "sampler": "ddim", "steps": LONG, "seed": 1}).json()
        seen = []
        with c.stream("GET", f"/api/jobs/{job['id']}/events") as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["event"] == "progress" and len(seen) == 3:
                        assert c.delete(f"/api/jobs/{job['id']}").status_code == 200
        assert seen[-1]["event"] == "cancelled"
        final = c.get(f"/api/jobs/{job['id']}").json()
        assert final["status"] == "cancelled" and final["images"] == [] and 1 <= final["done"] < LONG
        # the worker is free again: the next job runs to the end
        nxt = c.post("/api/jobs", json={"model": "tiny", "steps": 2, "seed": 0}).json()
        assert wait_for(c, nxt["id"], "done")["done"] == 2


def test_queue_full_is_a_clear_busy_answer(models, tmp_path):
    with client(models, tmp_path, queue=1) as c:
        long = c.post("/api/jobs", json={"model": "tiny", "steps": LONG, "seed": 0}).json()
        wait_for(c, long["id"], "running")
        waiting = c.post("/api/jobs", json={"model": "tiny", "steps": 2, "seed": 0})
        assert waiting.status_code == 202 and waiting.json()["status"] == "queued"
        busy = c.post("/api/jobs", json={"model": "tiny", "steps": 2, "seed": 0})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "5" and "busy" in busy.json()["detail"]
        assert len(c.get("/api/jobs").json()) == 2  # the refused job was never recorded
        # cancelling the waiting job frees its place at once; it never starts
        assert c.delete(f"/api/jobs/{waiting.json()['id']}").json()["status"] == "cancelled"
        again = c.post("/api/jobs", json={"model": "tiny", "steps": 2, "seed": 0})
        assert again.status_code == 202
        c.delete(f"/api/jobs/{long['id']}")
        assert wait_for(c, again.json()["id"], "done")["done"] == 2
        assert c.get(f"/api/jobs/{waiting.json()['id']}").json()["done"] == 0


@pytest.mark.parametrize("change, message", [
    ({"steps": MAX_STEPS + 1}, f"steps: {MAX_STEPS + 1} is over this server's limit of {MAX_STEPS}"),
    ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
    ({"sampler": "plms"}, "sampler: unknown sampler 'plms'; choose one of DDIM, DDPM"),
    ({"sampler": "ddim", "spacing": "random"}, "spacing: unknown spacing 'random'"),
    ({"sampler": "ddim", "steps": LONG + 1}, f"steps: {LONG + 1} is more than the schedule's {LONG} timesteps "
                                             "(spacing trailing); use fewer steps or a sigma spacing"),
    ({"seed": "abc"}, "seed: Input should be a valid integer"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"seed": SEED_MAX, "n_samples": 2}, f"seed: must be in [0, {SEED_MAX - 1}] with n_samples=2"),
    ({"model": "../tiny"}, "model: unknown model '../tiny'; this server has tiny"),
    ({"n_samples": 5}, "n_samples: 5 is over this server's limit of 4"),
    ({"size": 128}, "size: 128 is over this server's limit of 64"),
    ({"size": 17}, "size: 17 does not fit this model: both sides must be multiples of 2"),
    ({"width": 20, "height": 17}, "height: 17 does not fit this model: both sides must be multiples of 2"),
    ({"width": 66}, "width: 66 is over this server's limit of 64"),
    ({"size": 16, "width": 16}, "size: give size (a square) or width and height, not both"),
    ({"prompt": "a cat"}, "prompt: this model was not trained on captions"),
    ({"class_label": 3}, "class_label: this model is not class-conditional"),
    ({"guidance": float("inf")}, "guidance: Input should be a finite number"),
    ({"guidance_max_t": -5}, "guidance_max_t: Input should be greater than or equal to 0"),
    ({"path": "/etc/passwd"}, "path: Extra inputs are not permitted"),
])
def test_invalid_requests_name_the_field(models, tmp_path, change, message):
    with client(models, tmp_path) as c:
        body = json.dumps({"model": "tiny", "steps": 2} | change).replace("Infinity", "1e999")
        r = c.post("/api/jobs", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and message in r.json()["detail"], r.text
        assert c.get("/api/jobs").json() == []


def test_other_sizes_and_presets_run(models, tmp_path):
    with client(models, tmp_path) as c:
        job = c.post("/api/jobs", json={"model": "tiny", "sampler": "DPM++ 2M Karras", "steps": 3, "seed": 2,
                                        "size": 24}).json()
        assert (job["settings"]["sampler"], job["settings"]["spacing"]) == ("dpmpp_2m", "karras")
        done = wait_for(c, job["id"], "done")
        path = tmp_path / "big.png"
        path.write_bytes(c.get(done["images"][0]).content)
        assert Image.open(path).size == (24, 24)
        wide = c.post("/api/jobs", json={"model": "tiny", "sampler": "DDIM", "steps": 3, "seed": 2, "width": 24,
                                         "height": 12}).json()
        assert (wide["settings"]["width"], wide["settings"]["height"]) == (24, 12)
        got = _served(c, wait_for(c, wide["id"], "done")["images"][0])
        assert c.get("/api/models").json()[0]["image_size"] == 16  # the size was this job's only
    direct = Pipeline.load(models["tiny"].path).generate(1, 1, 3, "ddim", 2, width=24, height=12)
    assert got.shape == (1, 12, 24) and (got - direct[0].int()).abs().max() <= 1
    assert models["tiny"].image_hw() == (16, 16) and models["tiny"].manifest.image_size == 16  # the model is unchanged


@pytest.mark.parametrize("url", [
    "/api/jobs/../../etc/passwd/images/0", "/api/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd/images/0",
    "/api/jobs/..%2F..%2Foutputs/images/0", "/api/jobs/{id}/images/-1", "/api/jobs/{id}/images/99",
    "/api/jobs/{id}/images/..%2F..%2F..%2Fetc%2Fpasswd", "/api/runs/..%2F..%2Fetc/grid",
    "/api/runs/runs~..~..~etc/metrics", "/api/jobs/%2Fetc%2Fpasswd", "/api/jobs/{id}/../../../../etc/passwd",
])
def test_client_strings_never_reach_the_filesystem(models, tmp_path, run_dir, url):
    with client(models, tmp_path, runs=[run_dir.parent]) as c:
        job = c.post("/api/jobs", json={"model": "tiny", "steps": 1, "seed": 0}).json()
        wait_for(c, job["id"], "done")
        r = c.get(url.replace("{id}", job["id"]))
        assert r.status_code in (404, 422) and r.headers["content-type"] == "application/json", (url, r.status_code)
        assert "root:" not in r.text


def test_runs_list_their_metrics_and_latest_grid(models, tmp_path, run_dir):
    with client(models, tmp_path, runs=[run_dir.parent]) as c:
        (run,) = c.get("/api/runs").json()
        assert (run["name"], run["steps"], run["has_model"]) == ("tiny", 4, True)
        metrics = c.get(f"/api/runs/{run['id']}/metrics").json()
        rows = (run_dir / "metrics.csv").read_text().splitlines()
        assert metrics["step"][-1] == 4 and len(metrics["loss"]) == len(rows) - 1
        assert metrics["loss"][-1] == pytest.approx(float(rows[-1].split(",")[1])) == run["loss"]
        grid = c.get(run["grid"])
        assert grid.status_code == 200 and grid.content == sorted((run_dir / "samples").glob("*.png"))[-1].read_bytes()


def test_openapi_documents_every_endpoint(models, tmp_path):
    app = create_app(models, Limits(), tmp_path)
    schema = TestClient(app).get("/openapi.json").json()
    routed = {(m.lower(), r.path) for r in app.routes if getattr(r, "include_in_schema", False)
              for m in r.methods - {"HEAD"}}
    documented = {(m, p) for p, ops in schema["paths"].items() for m in ops}
    assert routed == documented == {
        ("get", "/api/models"), ("get", "/api/samplers"), ("post", "/api/jobs"), ("get", "/api/jobs"),
        ("get", "/api/jobs/{job_id}"), ("delete", "/api/jobs/{job_id}"), ("get", "/api/jobs/{job_id}/events"),
        ("get", "/api/jobs/{job_id}/images/{index}"), ("get", "/api/jobs/{job_id}/preview"), ("get", "/api/runs"),
        ("get", "/api/runs/{run_id}/metrics"), ("get", "/api/runs/{run_id}/grid")}
    for method, path in documented:
        assert schema["paths"][path][method]["summary"], (method, path)
    assert "GenerateRequest" in schema["components"]["schemas"]


def test_cors_closed_by_default(models, tmp_path):
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    with client(models, tmp_path) as c:
        r = c.get("/api/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in c.options("/api/jobs", headers=preflight).headers
    with client(models, tmp_path, cors_origins=["http://tool.example"]) as c:
        ok = c.options("/api/jobs", headers=preflight | {"Origin": "http://tool.example"})
        assert ok.headers["access-control-allow-origin"] == "http://tool.example"
        assert "access-control-allow-origin" not in c.options("/api/jobs", headers=preflight).headers


def test_page_has_the_generate_form(models, tmp_path):
    with client(models, tmp_path) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for element in ('id="prompt"', 'id="negative_prompt"', 'id="sampler"', 'id="steps"', 'id="guidance"',
                        'id="seed"', 'id="generate"', 'id="cancel"', 'id="gallery"', "EventSource"):
            assert element in page.text


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's JavaScript")
@pytest.mark.parametrize("chunk", ["tEXt", "iTXt"])  # what save_png writes (ASCII JSON), and UTF-8 text
def test_page_reads_settings_back_from_a_png(tmp_path, chunk):
    from PIL.PngImagePlugin import PngInfo

    from latentdiff.data.images import PNG_KEY, save_png
    from latentdiff.server.app import STATIC

    settings = {"prompt": "ein Käse, 猫 and 🐱", "seed": 12, "sampler": "dpmpp_2m", "spacing": "karras", "steps": 7}
    if chunk == "tEXt":
        save_png(Image.new("L", (4, 4)), tmp_path / "x.png", settings)
    else:
        info = PngInfo()
        info.add_itxt(PNG_KEY, json.dumps(settings, ensure_ascii=False), lang="en", tkey="settings")
        Image.new("L", (4, 4)).save(tmp_path / "x.png", pnginfo=info)
    assert chunk.encode() in (tmp_path / "x.png").read_bytes()
    page = (STATIC / "index.html").read_text()
    parser = re.search(r"^function pngSettings\(bytes\) \{.*?^\}$", page, re.M | re.S).group(0)
    script = parser + f"\nconst b = require('fs').readFileSync({json.dumps(str(tmp_path / 'x.png'))});" \
                      "\nprocess.stdout.write(JSON.stringify(pngSettings(new Uint8Array(b))));"
    r = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == read_png_settings(tmp_path / "x.png") == settings


def test_cli_serve_refuses_a_missing_model():
    r = subprocess.run([sys.executable, "-m", "latentdiff", "serve", "--model", "no/such/model"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: no/such/model does not exist: give a latentdiff model folder, a diffusers folder or a "
        ".safetensors/.ckpt checkpoint"]
