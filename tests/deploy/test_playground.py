"""The playground page at GET /, driven in a real headless Chromium (Debian's package) by Playwright.

Serve runs a tiny class-conditional checkpoint on 127.0.0.1. The browser loads the page, sets a seed, presses
Generate, waits for the images and checks they decoded; in Edit mode it uploads a PNG, paints a mask stroke and
inpaints; an out-of-range value shows the server's message next to its field; with an API key, the page asks for it
once; a latent model (a U-Net on latents carrying its autoencoder) works in the same page, in pixels; a text model
shows a prompt box in both modes (and no class box), and the image changes with the prompt typed; a whole unCLIP
model (prior + decoder) gets a Variations mode, whose images are the bytes POST variations answers over HTTP, and the
prior's settings. A screenshot is saved under the test's output folder (``tests/output/playground.png``, also used by
README).
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from tests.deploy.text_model import save_text_model
from tests.support import free_port, save_unclip_checkpoint, start_local_ray, wait_http
from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = Path(__file__).resolve().parents[1] / "output"
# Flags for a sandboxed, offline CI machine: no GPU, no background network traffic to Google's services.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
API_KEY = "playground-key-7c1e"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (make test installs it as root)")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    ray = start_local_ray()
    from ray import serve

    from deploy.serve_app import build_app

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("playground") / "ckpt"
    checkpoint.save(path, UNet(UNetConfig.preset("tiny", num_classes=3)), NoiseSchedule.linear(),
                    prediction_type="sample", class_names=["cat", "dog", "owl"])
    latent = save_tiny_latent(tmp_path_factory.mktemp("latent") / "ckpt")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    text = save_text_model(tmp_path_factory.mktemp("text") / "ckpt")
    unclip = save_unclip_checkpoint(tmp_path_factory.mktemp("unclip") / "ckpt")  # prior + decoder, 8x8x1
    # Five apps share the 2-CPU test Ray: at the default 1 CPU per replica the third would wait for a CPU forever.
    share = {"num_cpus": 0.25}
    serve.run(build_app({"model_uri": str(path), "max_cost": 2000, **share}), name="open", route_prefix="/")
    serve.run(build_app({"model_uri": str(path), "api_key": API_KEY, **share}), name="locked",
              route_prefix="/locked")
    serve.run(build_app({"model_uri": str(latent), **share}), name="latent", route_prefix="/latent")
    serve.run(build_app({"model_uri": str(text), **share}), name="text", route_prefix="/text")
    serve.run(build_app({"model_uri": str(unclip), **share}), name="unclip", route_prefix="/unclip")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", timeout=120)
    yield url
    serve.shutdown()
    assert ray.is_initialized()


def save_tiny_latent(path: Path) -> Path:
    """A U-Net on 4x8x8 latents with the ``tiny`` autoencoder (f = 4) it decodes them with into 32x32x3 pixels."""
    from ddpm import Autoencoder, AutoencoderConfig

    torch.manual_seed(1)
    return checkpoint.save(path, UNet(UNetConfig.preset("tiny", in_channels=4)), NoiseSchedule.linear(),
                           prediction_type="sample", autoencoder=Autoencoder(AutoencoderConfig.preset("tiny")),
                           autoencoder_source={"uri": "tiny"})


def paint_stroke(page, upload: Path, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Edit mode: upload ``upload`` and drag the mouse over the mask canvas from ``start`` to ``end``.

    Points are fractions (x, y) of the canvas, kept 5 px inside its border so the stroke starts on the canvas.
    """
    page.click("#mode-edit")
    page.set_input_files("#edit-file", str(upload))
    page.wait_for_function("edit.hasImage", timeout=30_000)
    page.locator("#edit-mask").scroll_into_view_if_needed()  # the mouse works in the viewport's coordinates
    box = page.locator("#edit-mask").bounding_box()

    def at(fx: float, fy: float) -> tuple[float, float]:
        return (box["x"] + min(max(fx * box["width"], 5), box["width"] - 5),
                box["y"] + min(max(fy * box["height"], 5), box["height"] - 5))

    page.mouse.move(*at(*start))
    page.mouse.down()
    page.mouse.move(*at(*end), steps=10)
    page.mouse.up()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_page_generates_images(endpoint, browser):
    page = browser.new_page()
    page.goto(endpoint + "/", timeout=60_000)
    page.wait_for_function("document.getElementById('model').textContent.includes('8×8×1')", timeout=60_000)
    assert page.locator("#class_label option").count() == 4  # "none" + the three class names
    # not unCLIP's decoder: no Variations mode, no prior settings
    assert page.locator("#mode-variations").is_hidden() and page.locator("#prior_steps").is_hidden()
    page.fill("#seed", "1234")
    page.fill("#num_images", "6")
    page.fill("#steps", "5")
    page.select_option("#class_label", "1")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete)", timeout=30_000)
    widths = page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.naturalWidth)")
    assert widths == [8] * 6  # six images, each decoded at the model's 8x8
    titles = page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.title)")
    assert titles[0] == "seed 1234" and titles[5] == "seed 1239"  # image i has seed + i, shown on hover
    assert "6 images in" in page.text_content("#status")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "playground.png"), full_page=True)
    page.close()


def test_the_progress_bar_moves_while_the_sampler_runs(endpoint, browser):
    """The page asks for a stream (``"stream": true``) and moves its bar with the progress events: DDPM-1000 on one
    image takes seconds here, so the bar is seen between its ends before the images arrive; it hides after."""
    page = browser.new_page()
    page.goto(endpoint + "/", timeout=60_000)
    page.wait_for_function("document.getElementById('model').textContent.includes('8×8×1')", timeout=60_000)
    page.fill("#num_images", "1")
    page.select_option("#sampler", "ddpm")
    page.fill("#steps", "1000")
    page.evaluate("window.seen = []; setInterval(() => { const b = document.getElementById('progress'); "
                  "if (!b.hidden) seen.push([b.value, b.max]); }, 10)")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=120_000)
    seen = page.evaluate("seen")
    moving = sorted({value for value, top in seen if top == 1000 and 0 < value < 1000})
    assert len(moving) >= 2, seen[-20:]  # the bar stood at two or more steps before the last one
    assert page.evaluate("document.getElementById('progress').hidden")
    assert "1 images in" in page.text_content("#status")
    page.close()


def test_edit_mode_inpaints_a_painted_stroke(endpoint, browser, tmp_path):
    upload = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(upload)
    page = browser.new_page()
    page.goto(endpoint + "/", timeout=60_000)
    page.wait_for_function("document.getElementById('model').textContent.includes('8×8×1')", timeout=60_000)
    # 16x16 RGB: the page stretches it to the model's 8x8. A vertical stroke down the right side.
    paint_stroke(page, upload, (0.7, 0.0), (0.7, 1.0))
    assert 0 < page.evaluate("edit.mask.reduce((a, b) => a + b, 0)") < 64
    page.fill("#num_images", "2")
    page.fill("#steps", "5")
    page.fill("#resample_times", "2")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete)", timeout=30_000)
    assert page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.naturalWidth)") == [8, 8]
    assert page.text_content(".error[data-for='mask']") == "" and "2 images in" in page.text_content("#status")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "playground-edit.png"), full_page=True)

    # nothing painted and a strength below 1: SDEdit of the whole image (POST /edit without a mask)
    sent = []
    page.on("request", lambda r: sent.append((r.url, r.post_data_json)) if r.method == "POST" else None)
    page.click("#mask-clear")
    page.fill("#strength", "0.6")
    page.fill("#resample_times", "1")
    page.evaluate("document.getElementById('status').textContent = ''")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.includes('2 images in') || "
                           "[...document.querySelectorAll('.error')].some(e => e.textContent)", timeout=120_000)
    assert page.eval_on_selector_all(".error", "es => es.map(e => e.textContent).filter(t => t)") == []
    [(url, body)] = sent
    assert url.endswith("/edit") and "mask" not in body and body["strength"] == 0.6 and body["image"]
    page.close()


def test_out_of_range_value_shows_the_servers_message(endpoint, browser):
    page = browser.new_page()
    page.goto(endpoint + "/", timeout=60_000)
    page.wait_for_function("document.getElementById('model').textContent.includes('version') || "
                           "document.getElementById('model').textContent.includes('8×8')", timeout=60_000)
    page.fill("#steps", "5000")
    page.click("#generate")
    error = page.locator('.error[data-for="steps"]')
    error.wait_for(state="visible", timeout=60_000)
    page.wait_for_function("document.querySelector('.error[data-for=\"steps\"]').textContent.length > 0",
                           timeout=60_000)
    assert "1000" in error.text_content()  # the server's own message, next to the field
    assert page.locator("#gallery img").count() == 0
    page.close()


def test_page_asks_for_the_api_key_once(endpoint, browser):
    page = browser.new_page()
    page.goto(endpoint + "/locked/", timeout=60_000)
    page.locator("#apikey-box").wait_for(state="visible", timeout=60_000)
    page.fill("#apikey", API_KEY)
    page.click("#apikey-save")
    page.wait_for_function("document.getElementById('model').textContent.includes('8×8×1')", timeout=60_000)
    assert page.evaluate("sessionStorage.getItem('ddpm-api-key')") == API_KEY
    page.fill("#num_images", "2")
    page.fill("#steps", "3")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=120_000)
    assert page.locator("#apikey-box").is_hidden()
    page.close()


def test_a_latent_model_generates_and_inpaints_in_pixels(endpoint, browser, tmp_path):
    """The page knows nothing of latents: it shows and paints the decoded 32x32x3; the server downsamples the mask."""
    upload = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(upload)
    page = browser.new_page()
    page.goto(endpoint + "/latent/", timeout=60_000)
    page.wait_for_function("document.getElementById('model').textContent.includes('32×32×3')", timeout=60_000)
    page.fill("#num_images", "2")
    page.fill("#steps", "3")
    page.click("#generate")
    page.wait_for_selector("#gallery img", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete)", timeout=30_000)
    assert page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.naturalWidth)") == [32, 32]
    paint_stroke(page, upload, (0.0, 0.5), (1.0, 0.5))  # a horizontal stroke across the middle
    assert 0 < page.evaluate("edit.mask.reduce((a, b) => a + b, 0)") < 32 * 32
    page.evaluate("document.getElementById('status').textContent = ''")  # so the wait below sees the new answer
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.includes('2 images in') && "
                           "[...document.querySelectorAll('#gallery img')].every(i => i.complete)", timeout=120_000)
    assert page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.naturalWidth)") == [32, 32]
    assert page.text_content(".error[data-for='mask']") == ""
    page.close()


def test_a_text_model_takes_a_typed_prompt_in_both_modes(endpoint, browser, tmp_path):
    page = browser.new_page()
    page.goto(endpoint + "/text/", timeout=60_000)
    page.wait_for_function("document.getElementById('model').textContent.includes('prompts of up to 8 tokens')",
                           timeout=60_000)
    assert page.locator("#prompt").is_visible() and page.locator("#class_label").is_hidden()
    page.fill("#seed", "3")
    page.fill("#num_images", "2")
    page.fill("#steps", "3")

    def images_for(prompt: str) -> list[str]:
        page.fill("#prompt", prompt)
        page.evaluate("document.getElementById('status').textContent = ''")  # so the wait sees the new answer
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.includes('2 images in') || "
                               "[...document.querySelectorAll('.error')].some(e => e.textContent)", timeout=120_000)
        errors = page.eval_on_selector_all(".error", "es => es.map(e => e.textContent).filter(t => t)")
        assert errors == [], errors
        return page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.src)")

    red, blue = images_for("a small red circle"), images_for("a large blue square")
    assert len(red) == len(blue) == 2 and red != blue  # the typed prompt changes the images
    assert images_for("a small red circle") == red  # and only the prompt: the same prompt and seed, the same bytes
    assert page.text_content("#prompt-warnings") == ""
    images_for("a pink circle")  # a word the tokenizer never saw is reported, not ignored
    assert "unknown word: 'pink'" in page.text_content("#prompt-warnings")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "playground-prompt.png"), full_page=True)

    upload = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 8), dtype=np.uint8)).save(upload)
    paint_stroke(page, upload, (0.55, 0.0), (0.55, 1.0))  # x = 4.4 model pixels: column 4 (a brush of radius 0.5)
    assert 0 < page.evaluate("edit.mask.reduce((a, b) => a + b, 0)") < 64
    assert page.locator("#prompt").is_visible()  # Edit mode keeps the prompt: repaint the mask to it
    repainted = images_for("a large blue square")
    assert len(repainted) == 2 and repainted != red
    page.close()


def test_an_unclip_model_varies_an_uploaded_image_and_runs_its_prior(endpoint, browser, tmp_path):
    """A whole unCLIP model: Variations mode sends the uploaded image to POST variations and shows the bytes that
    route answers over HTTP for the same settings; a result clicked there is the next image varied; Generate mode
    shows the prior's settings, prefilled with the model's defaults, and sends them with a prompt."""
    pixels = np.full((8, 8), 220, np.uint8)
    pixels[:4, :4] = 10
    upload = tmp_path / "vary.png"  # grey 8x8, the CLIP's own size: the page's canvas keeps its pixels exactly
    Image.fromarray(pixels).save(upload)
    page = browser.new_page()
    sent = []
    page.on("request", lambda r: sent.append((r.url, r.post_data_json)) if r.method == "POST" else None)
    page.goto(endpoint + "/unclip/", timeout=60_000)
    page.wait_for_function("document.getElementById('model').textContent.includes('8×8×1')", timeout=60_000)
    defaults = requests.get(endpoint + "/unclip/v1/model", timeout=30).json()["prior_defaults"]
    assert page.locator("#mode-variations").is_visible() and page.locator("#prior_steps").is_visible()
    assert float(page.input_value("#prior_steps")) == defaults["prior_steps"]
    assert float(page.input_value("#prior_guidance_scale")) == defaults["prior_guidance_scale"]

    def run(expect: str) -> list[str]:
        """Press the main button and return the gallery's images as base64 PNGs, the bytes the server sent."""
        page.evaluate("document.getElementById('status').textContent = ''")  # so the wait sees the new answer
        page.click("#generate")
        page.wait_for_function(f"document.getElementById('status').textContent.includes('{expect}') || "
                               "[...document.querySelectorAll('.error')].some(e => e.textContent)", timeout=120_000)
        errors = page.eval_on_selector_all(".error", "es => es.map(e => e.textContent).filter(t => t)")
        assert errors == [], errors
        return page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.src.split(',')[1])")

    page.click("#mode-variations")
    assert page.text_content("#generate") == "Vary" and page.locator("#edit-file").is_visible()
    for hidden in ("#edit-mask", "#brush", "#mask-clear", "#strength", "#prior_steps"):
        assert page.locator(hidden).is_hidden(), hidden
    page.set_input_files("#edit-file", str(upload))
    page.wait_for_function("edit.hasImage", timeout=30_000)
    settings = {"seed": 7, "num_images": 2, "steps": 3, "sampler": "ddim", "guidance_scale": 2}
    for field in ("seed", "num_images", "steps", "guidance_scale"):
        page.fill("#" + field, str(settings[field]))
    shown = run("2 images in")
    [(url, body)] = sent
    assert url.endswith("/unclip/variations") and body["stream"] is True and body["output"] == "json"
    assert {k: body[k] for k in settings} == settings
    assert not {"prior_steps", "prior_guidance_scale", "strength", "mask", "prompt"} & body.keys()
    r = requests.post(endpoint + "/unclip/variations", timeout=60,
                      json={**settings, "output": "json", "image": base64.b64encode(upload.read_bytes()).decode()})
    assert r.status_code == 200, r.text
    assert shown == r.json()["images"]  # the same PNG bytes as over HTTP: the page sent the image's own pixels
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "playground-variations.png"), full_page=True)

    # a result clicked in Variations mode is the next image varied (drawn onto the canvas once it loads)
    page.evaluate("window.before = document.getElementById('edit-image').toDataURL()")
    page.click("#gallery img >> nth=1")
    page.wait_for_function("document.getElementById('edit-image').toDataURL() !== window.before", timeout=30_000)
    sent.clear()
    again = run("2 images in")
    [(_, body)] = sent

    def grey(b64: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("L"))

    assert np.array_equal(grey(body["image"]), grey(shown[1])) and again != shown

    # Generate mode: a prompt runs through the prior, with the prior's settings from the page
    page.click("#mode-generate")
    page.fill("#prompt", "a small red circle")
    page.fill("#prior_steps", "3")
    sent.clear()
    assert len(run("2 images in")) == 2
    [(url, body)] = sent
    assert url.endswith("/unclip/generate") and body["prompt"] == "a small red circle"
    assert body["prior_steps"] == 3 and body["prior_guidance_scale"] == defaults["prior_guidance_scale"]
    page.close()
