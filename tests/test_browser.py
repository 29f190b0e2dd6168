"""The web page driven in headless Chromium (Debian's `chromium`, through Playwright's Python package with the
system browser; no browser download): type, generate, watch progress and previews, cancel, paint a mask,
upscale, restore settings from a PNG, see the runs. Each result is checked against the Python API.

Skipped when Chromium or Playwright is missing, unless LATENTDIFF_REQUIRE_BROWSER=1 (CI sets it).
"""

import base64
import io
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = os.environ.get("LATENTDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if os.environ.get("LATENTDIFF_REQUIRE_BROWSER") != "1":
    pytest.importorskip("playwright.sync_api", reason="browser tests need playwright (make setup-test)")
    pytest.importorskip("uvicorn")
    if CHROMIUM is None:
        pytest.skip("browser tests need Chromium (apt-get install chromium)", allow_module_level=True)

import uvicorn  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from latentdiff.data.images import read_png_settings  # noqa: E402
from latentdiff.pipelines.generate import Pipeline  # noqa: E402
from latentdiff.server import Limits, create_app, load_models  # noqa: E402

# what a root process in a closed network needs (no sandbox; no calls home, which this machine refuses)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
LONG = 1000
TIMEOUT_MS = 120_000  # page actions and expect(): a loaded 2-core machine is slow, not broken
expect.set_options(timeout=TIMEOUT_MS)
# record every server-sent event the page receives, without changing the page: wrap EventSource
RECORD_EVENTS = """
window.__events = [];
const Native = window.EventSource;
window.EventSource = class extends Native {
  addEventListener(type, fn, ...rest) {
    return super.addEventListener(type, (ev) => { window.__events.push({type, data: JSON.parse(ev.data)}); fn(ev); }, ...rest);
  }
};
"""
TINY = ["train.steps=3", "train.grid_samples=2", "train.grid_steps=2", "data.limit=32", "train.warmup_steps=1",
        "train.log_every=1", "train.threads=1"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A uvicorn server on loopback with a tiny text-to-image model and a tiny upscaler; the page's URL."""
    from latentdiff.training.config import load_config
    from latentdiff.training import make_trainer

    runs = tmp_path_factory.mktemp("runs")
    make_trainer(load_config("digits-tiny", TINY + [
        "data.source=shapes", "data.channels=3", "data.image_size=16", "unet.in_channels=3", "unet.out_channels=3",
        "unet.context_dim=384", "cond.context_length=16"]), runs / "shapes-text", progress=False).run()
    make_trainer(load_config("digits-tiny", TINY + ["unet.in_channels=2", "cond.concat=low_res",
                                                    "cond.low_res_size=8"]), runs / "digits-sr", progress=False).run()
    models = load_models([runs / "shapes-text", runs / "digits-sr"])
    out = tmp_path_factory.mktemp("outputs")
    app = create_app(models, Limits(max_steps=2 * LONG, max_size=64, max_batch=4, queue=4, preview_every=2), out,
                     [runs])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not server.started:
        assert time.time() - t0 < 60 and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}/", "models": models, "runs": runs}
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1200, "height": 900}, base_url=served["url"])
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.add_init_script(RECORD_EVENTS)
    pg.goto("/")
    expect(pg.locator("#model option")).to_have_count(2)
    yield pg
    context.close()
    assert errors == [], errors  # no uncaught JavaScript error in any test


def image_at(page, url) -> torch.Tensor:
    """A result PNG as the page's origin serves it, as uint8 (C, H, W)."""
    data = page.request.get(url).body()
    a = np.array(Image.open(io.BytesIO(data)))
    return torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1), data


def events(page, kind=None):
    return [e for e in page.evaluate("window.__events") if kind is None or e["type"] == kind]


def test_generate_shows_progress_previews_and_the_image(page, served, tmp_path):
    page.select_option("#model", "shapes-text")
    expect(page.locator("#tab-txt2img")).to_have_attribute("aria-selected", "true")
    page.fill("#prompt", "a small red circle")
    page.fill("#negative_prompt", "blue")
    page.select_option("#sampler", "DPM++ 2M Karras")
    page.fill("#steps", "6")
    page.fill("#guidance", "2")
    page.fill("#seed", "11")
    page.fill("#n_samples", "2")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text("Done (seed 11).")
    assert [e["type"] for e in events(page)] == ["started"] + ["progress", "progress", "preview"] * 3 + ["done"]
    assert [e["data"]["done"] for e in events(page, "progress")] == list(range(1, 7))
    assert [e["data"]["done"] for e in events(page, "preview")] == [2, 4, 6]
    expect(page.locator("#progress")).to_have_js_property("value", 6)
    imgs = page.locator("#gallery img")
    expect(imgs).to_have_count(2)
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete)")  # loaded
    assert page.evaluate("[...document.querySelectorAll('#gallery img')].map(i => i.naturalWidth)") == [16, 16]
    ref = Pipeline.load(served["models"]["shapes-text"].path).generate(
        2, 2, 6, "dpmpp_2m", 11, prompt="a small red circle", negative_prompt="blue", guidance=2.0, spacing="karras")
    for i, url in enumerate(events(page, "done")[0]["data"]["images"]):
        got, data = image_at(page, url)
        assert (got.int() - ref[i].int()).abs().max() <= 1
        (tmp_path / "x.png").write_bytes(data)
        assert read_png_settings(tmp_path / "x.png")["prompt"] == "a small red circle"
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    pixels = np.array(Image.open(shot).convert("L"))
    assert pixels.shape[1] == 1200 and pixels.std() > 10  # a rendered page, not a blank one
    if os.environ.get("LATENTDIFF_SCREENSHOT"):  # docs/web_app.png is refreshed this way (docs/server.md)
        shutil.copy(shot, os.environ["LATENTDIFF_SCREENSHOT"])


def test_cancel_stops_a_long_job(page, served):
    page.select_option("#model", "shapes-text")
    page.select_option("#sampler", "DDIM")
    page.fill("#steps", str(LONG))
    page.fill("#seed", "1")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text(f"/ {LONG}")
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("Cancelled.")
    expect(page.locator("#generate")).to_be_enabled()
    job = page.request.get("/api/jobs").json()[0]
    assert job["status"] == "cancelled" and 1 <= job["done"] < LONG and job["images"] == []
    assert events(page)[-1]["type"] == "cancelled"


def test_settings_come_back_from_a_png(page, served, tmp_path):
    pipe = served["models"]["shapes-text"]
    settings = {"prompt": "a large blue square, 猫", "negative_prompt": "red", "steps": 7, "seed": 123,
                "sampler": "dpmpp_2m", "spacing": "karras", "guidance": 3.5, "task": "txt2img"}
    pipe.save(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), tmp_path, settings)
    png = tmp_path / "000123.png"
    page.set_input_files("#settings-file", str(png))
    expect(page.locator("#status")).to_have_text("Settings restored from 000123.png.")
    values = {k: page.input_value(f"#{k}") for k in ("prompt", "negative_prompt", "steps", "seed", "guidance", "sampler")}
    assert values == {"prompt": "a large blue square, 猫", "negative_prompt": "red", "steps": "7", "seed": "123",
                      "guidance": "3.5", "sampler": "DPM++ 2M Karras"}
    # the same by dropping the file on the page
    page.fill("#prompt", "something else")
    page.fill("#seed", "")
    page.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)), dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: "image/png"}));
        document.querySelector("main").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    }""", [base64.b64encode(png.read_bytes()).decode(), png.name])
    expect(page.locator("#prompt")).to_have_value("a large blue square, 猫")
    expect(page.locator("#seed")).to_have_value("123")


def test_inpaint_with_a_mask_painted_on_the_canvas(page, served, tmp_path):
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(source).resize((64, 64), Image.Resampling.NEAREST).save(tmp_path / "in.png")  # drawn at 16 px
    page.select_option("#model", "shapes-text")
    page.click("#tab-inpaint")
    assert page.input_value("#sampler") == "DDIM"  # DPM++ cannot inpaint by replacement: the page switched
    assert page.locator("#sampler option[disabled]").count() > 0
    page.set_input_files("#input-file", str(tmp_path / "in.png"))
    page.wait_for_function("document.getElementById('input-canvas').getContext('2d')"
                           ".getImageData(0, 0, 16, 16).data.some((v, i) => i % 4 < 3 && v > 0)")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    mask_url = page.evaluate("maskPNG()")
    mask = np.array(Image.open(io.BytesIO(base64.b64decode(mask_url.split(",")[1]))).convert("L"))
    assert set(np.unique(mask)) == {0, 255} and 10 < (mask == 255).sum() < 200  # a stroke, black and white
    page.fill("#steps", "4")
    page.fill("#seed", "5")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text("Done (seed 5).")
    got, _ = image_at(page, events(page, "done")[0]["data"]["images"][0])
    keep = torch.from_numpy(mask == 0)
    x = torch.from_numpy(source).permute(2, 0, 1)
    assert torch.equal(got[:, keep], x[:, keep])  # unpainted pixels exactly as drawn in the canvas
    assert not torch.equal(got[:, ~keep], x[:, ~keep])
    job = page.request.get("/api/jobs").json()[0]
    assert (job["settings"]["task"], job["settings"]["strength"], job["settings"]["resample"]) == ("inpaint", 1.0, 1)


def test_img2img_from_a_gallery_image_not_square(page, served):
    page.select_option("#model", "shapes-text")
    page.fill("#prompt", "a large green square")
    page.fill("#width", "24")
    page.fill("#height", "16")
    page.fill("#steps", "3")
    page.fill("#seed", "2")
    page.click("#generate")
    expect(page.locator("#gallery figure")).to_have_count(1)
    page.wait_for_function("document.querySelector('#gallery img').complete")
    assert page.evaluate("[document.querySelector('#gallery img').naturalWidth, "
                         "document.querySelector('#gallery img').naturalHeight]") == [24, 16]
    page.click("#gallery figure button")
    expect(page.locator("#tab-img2img")).to_have_attribute("aria-selected", "true")
    assert page.evaluate("[document.getElementById('input-canvas').width, "
                         "document.getElementById('input-canvas').height]") == [24, 16]
    page.fill("#strength", "0.5")
    page.fill("#seed", "3")
    page.click("#generate")
    expect(page.locator("#gallery figure")).to_have_count(2)
    first, second = page.request.get("/api/jobs").json()[1::-1]
    assert second["settings"]["task"] == "img2img" and second["settings"]["strength"] == 0.5
    x, _ = image_at(page, first["images"][0])
    got, _ = image_at(page, second["images"][0])
    pipe = served["models"]["shapes-text"]
    ref = pipe.img2img(x[None], strength=0.5, steps=3, sampler="dpmpp_2m", spacing="karras", seed=3,
                       prompt="a large green square", width=24, height=16)
    assert got.shape == (3, 16, 24) and (got.int() - ref[0].int()).abs().max() <= 1


def test_upscale_tab_for_a_super_resolution_model(page, served, tmp_path):
    page.select_option("#model", "digits-sr")
    assert page.locator("#tabs button").all_inner_texts() == ["Upscale"]
    expect(page.locator("#width")).to_be_disabled()
    expect(page.locator("#height")).to_be_disabled()
    Image.fromarray(np.full((40, 40), 180, np.uint8)).save(tmp_path / "low.png")
    page.set_input_files("#input-file", str(tmp_path / "low.png"))
    page.wait_for_function("document.getElementById('input-canvas').getContext('2d')"
                           ".getImageData(0, 0, 8, 8).data[0] > 0")
    assert page.evaluate("[document.getElementById('input-canvas').width, "
                         "document.getElementById('input-canvas').height]") == [8, 8]
    page.fill("#steps", "3")
    page.fill("#seed", "0")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text("Done (seed 0).")
    got, _ = image_at(page, events(page, "done")[0]["data"]["images"][0])
    low = torch.full((1, 1, 8, 8), 180, dtype=torch.uint8)
    ref = served["models"]["digits-sr"].upscale(low, steps=3, sampler="dpmpp_2m", spacing="karras", seed=0)
    assert got.shape == (1, 16, 16) and (got.int() - ref[0].int()).abs().max() <= 1


def test_runs_show_their_loss_curve_and_latest_grid(page, served):
    runs = page.locator("#runs h3")
    expect(runs).to_have_count(2)
    assert sorted(runs.all_inner_texts())[0].startswith("digits-sr: step 3, loss ")
    rows = (served["runs"] / "shapes-text" / "metrics.csv").read_text().splitlines()
    points = page.evaluate("[...document.querySelectorAll('#runs polyline')].map(p => p.points.length)")
    assert points == [len(rows) - 1] * 2
    expect(page.locator("#runs img")).to_have_count(2)
    page.wait_for_function("[...document.querySelectorAll('#runs img')].every(i => i.complete)")
    assert all(w > 0 for w in page.evaluate("[...document.querySelectorAll('#runs img')].map(i => i.naturalWidth)"))


def test_refused_settings_are_explained(page, served):
    before = page.request.get("/api/jobs").json()
    page.select_option("#model", "shapes-text")
    page.fill("#steps", str(2 * LONG + 1))  # over the server's limit: the form itself refuses it
    page.click("#generate")
    assert page.evaluate("document.getElementById('steps').validity.rangeOverflow")
    page.select_option("#sampler", "DDIM")
    page.fill("#steps", str(LONG + 1))  # within the limit, but more than the model's timesteps: the server says so
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text(f"steps: {LONG + 1} is more than the schedule's {LONG} "
                                                    "timesteps")
    expect(page.locator("#status")).to_have_class("error")
    assert page.request.get("/api/jobs").json() == before  # nothing was queued
