"""The demo page (`demo/app.py`) in a real browser: headless Chromium (Debian's chromium and chromium-driver, through
selenium) drives each tab as a person would, and the numbers shown must be the library's. Saves a screenshot per tab
(also to $FLAIR_DEMO_SCREENSHOTS when set, which is how the README's pictures were made)."""

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FIXTURES, ROOT, free_port
from flair_hf import FlairScorer

spec = importlib.util.spec_from_file_location("demo_app", ROOT / "demo" / "app.py")
app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app)

IMAGE = FIXTURES / "images" / "puppy.jpg"
CAPTIONS = ["a small white puppy", "a red ladybug on green beads", "a white door"]


@pytest.fixture(scope="module")
def served(tiny_dir):
    model, processor, random_weights = app.load(str(tiny_dir))
    page = app.build(model, processor, random_weights)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}", model, processor
    page.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium")
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def find(driver, css, timeout=120):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))


def wait_for_text(driver, text, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element("tag name", "body").text)


def open_tab(driver, url, name):
    from selenium.webdriver.common.by import By

    driver.get(url)
    find(driver, "#captions-image")
    next(button for button in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if button.text.strip() == name).click()
    time.sleep(0.5)


def upload(driver, tab, path):
    find(driver, f"#{tab}-image input[type=file]").send_keys(str(path))
    find(driver, f"#{tab}-image img")  # the preview: the upload reached the server


def type_lines(driver, css, lines):
    from selenium.webdriver.common.keys import Keys

    box = find(driver, css)
    for index, line in enumerate(lines):
        box.send_keys(line)
        if index < len(lines) - 1:
            box.send_keys(Keys.ENTER)


def rows(driver, table_id):
    from selenium.webdriver.common.by import By

    table = find(driver, f"#{table_id}")
    return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")]


def screenshot(driver, name, tmp_path):
    path = tmp_path / f"demo-{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("FLAIR_DEMO_SCREENSHOTS"):
        shutil.copy(path, os.path.join(os.environ["FLAIR_DEMO_SCREENSHOTS"], path.name))
    assert path.stat().st_size > 10_000


def test_captions_tab_shows_score_logits_and_heatmaps(served, browser, tmp_path):
    url, model, processor = served
    open_tab(browser, url, "Captions")
    upload(browser, "captions", IMAGE)
    type_lines(browser, "#captions-text textarea", CAPTIONS)
    find(browser, "#captions-run").click()
    shown = {caption: (float(flair), float(sigmoid), float(clip)) for caption, flair, sigmoid, clip in rows(browser, "caption-scores")}
    expected = FlairScorer(model, processor).score(str(IMAGE), CAPTIONS)
    assert set(shown) == set(CAPTIONS)
    for index, caption in enumerate(CAPTIONS):
        assert shown[caption][0] == pytest.approx(expected["logits"][0, index].item(), abs=1e-4)
        assert shown[caption][1] == pytest.approx(expected["sigmoid_probs"][0, index].item(), abs=1e-4)
    assert [float(r[1]) for r in rows(browser, "caption-scores")] == sorted((v[0] for v in shown.values()), reverse=True)
    from selenium.webdriver.common.by import By

    find(browser, "#captions-maps img")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#captions-maps img")) >= len(CAPTIONS)
    screenshot(browser, "captions", tmp_path)


def test_classify_tab_shows_flair_and_clip_scores(served, browser, tmp_path):
    url, model, processor = served
    open_tab(browser, url, "Classify")
    upload(browser, "classify", IMAGE)
    type_lines(browser, "#classify-text textarea", ["dog", "ladybug", "door"])
    find(browser, "#classify-run").click()
    shown = {name: (float(flair), float(clip)) for name, flair, clip in rows(browser, "class-scores")}
    # independent: each class's 80 prompts embedded one class at a time (normalise, average, normalise), then the
    # global cosine and the cosine of the class-conditioned pooled image embedding
    templates = [t for t in (ROOT / "src" / "flair_hf" / "data" / "openai_imagenet_templates.txt").read_text().splitlines() if t.strip()]
    with torch.no_grad():
        image_embeds, tokens = model.get_image_and_token_features(processor(images=Image.open(IMAGE))["pixel_values"])
        for name, (flair, clip) in shown.items():
            prompts = processor(text=[t.replace("{}", name) for t in templates])["input_ids"]
            query = F.normalize(F.normalize(model.get_text_embeds(prompts), dim=-1).mean(0), dim=0)
            pooled = model.text_conditioned_pooling(query[None], tokens)[0][0, 0]
            assert flair == pytest.approx(F.cosine_similarity(pooled, query, dim=0).item(), abs=1e-4), name
            assert clip == pytest.approx(F.cosine_similarity(image_embeds[0], query, dim=0).item(), abs=1e-4), name
    assert set(shown) == {"dog", "ladybug", "door"}
    screenshot(browser, "classify", tmp_path)


def test_segment_tab_shows_a_mask_and_a_legend(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _, _ = served
    open_tab(browser, url, "Segment")
    upload(browser, "segment", IMAGE)
    type_lines(browser, "#segment-text textarea", ["dog", "door", "floor"])
    find(browser, "#segment-run").click()
    legend = find(browser, "#segment-legend")
    items = [item.text for item in legend.find_elements(By.TAG_NAME, "li")]
    assert [item.split(":")[0] for item in items] == ["dog", "door", "floor"]
    assert sum(float(item.split(":")[1].strip().rstrip("%")) for item in items) == pytest.approx(100.0, abs=0.2)
    find(browser, "#segment-mask img")
    screenshot(browser, "segment", tmp_path)


def test_search_tab_reranks_a_folder_by_flair(served, browser, tmp_path):
    url, model, processor = served
    open_tab(browser, url, "Search")
    find(browser, "#search-folder textarea, #search-folder input").send_keys(str(FIXTURES / "images"))
    find(browser, "#search-text textarea, #search-text input").send_keys("a small white puppy")
    find(browser, "#search-run").click()
    shown = rows(browser, "search-results")
    assert len(shown) == min(8, len([p for p in (FIXTURES / "images").iterdir() if p.suffix.lower() in app.IMAGE_SUFFIXES]))
    for name, flair, _ in shown:
        expected = FlairScorer(model, processor).score(str(FIXTURES / "images" / name), ["a small white puppy"])["logits"][0, 0].item()
        assert float(flair) == pytest.approx(expected, abs=1e-4), name
    assert [float(r[1]) for r in shown] == sorted((float(r[1]) for r in shown), reverse=True)
    find(browser, "#search-maps img")
    screenshot(browser, "search", tmp_path)


def test_bad_input_is_a_message_on_the_page(served, browser):
    url, _, _ = served
    open_tab(browser, url, "Segment")
    find(browser, "#segment-run").click()
    wait_for_text(browser, "Upload an image first.")
    upload(browser, "segment", IMAGE)
    find(browser, "#segment-run").click()
    wait_for_text(browser, "Type at least one class name (one per line).")
    open_tab(browser, url, "Search")
    find(browser, "#search-text textarea, #search-text input").send_keys("a dog")
    find(browser, "#search-run").click()
    wait_for_text(browser, "Give a folder of images on the server or upload some images.")


def test_without_a_model_the_page_says_its_weights_are_random():
    model, processor, random_weights = app.load(None)
    assert random_weights and sum(p.numel() for p in model.parameters()) < 5_000_000
    assert app.RANDOM_BANNER in app.build(model, processor, random_weights).config["components"].__repr__()
    assert torch.isfinite(model(**processor(text=["a dog"], images=Image.open(IMAGE))).logits_per_image).all()


def test_readme_command_serves_the_page(tiny_dir):
    """`python demo/app.py --model DIR --port N` as the README gives it: the page is served on 127.0.0.1."""
    section = (ROOT / "README.md").read_text().split("## Demo page", 1)[1].split("\n## ", 1)[0]
    command = next(line for line in section.splitlines() if line.startswith("python demo/app.py")).split("#")[0].split()
    port = free_port()
    command = [sys.executable, *command[1:]]
    command[command.index("--model") + 1], command[command.index("--port") + 1] = str(tiny_dir), str(port)
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read().decode()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()[-3000:] if server.poll() is not None else "timeout"
                time.sleep(1)
        assert "Score captions" in page and app.RANDOM_BANNER not in page
    finally:
        server.terminate()
        server.wait(timeout=30)
