"""The demo page (`demo/app.py`) in a real browser: headless Chromium (Debian's chromium and chromium-driver, through
selenium) drives each tab as a person would, and the numbers shown must be the library's. Saves a screenshot per tab
(also to $FLAIR_DEMO_SCREENSHOTS when set, which is how the manual's pictures were made). Through its API (gradio's
own client and raw HTTP) the page serves nothing from the server but the operator's gallery, and stays correct under
concurrent clients."""

import importlib.util
import json
import os
import re
import resource
import shutil
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
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

EXAMPLES = ROOT / "demo" / "examples"  # held-out mosaics for the bundled model, which serves the page here
IMAGE = EXAMPLES / "mosaic-000000.png"
CAPTIONS = ["A large yellow pullover at the top", "A small red dress at the bottom", "A large orange coat at the bottom right"]
CLASSES = ["pullover", "dress", "coat"]
QUERY = "A small white sneaker on the right"  # an item of mosaic-000001.png


GALLERY = ("mosaic-000000.png", "mosaic-000001.png", "mosaic-000002.png", "mosaic-000003.png")


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    """The operator's gallery: the four example mosaics and one file that is not an image."""
    folder = tmp_path_factory.mktemp("gallery")
    for name in GALLERY:
        shutil.copy(EXAMPLES / name, folder / name)
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def served(gallery_dir):
    model, processor, bundled = app.load(None)
    gallery = app.index_images(model, processor, app.gallery_paths(str(gallery_dir), app.GALLERY_LIMIT))
    page = app.build(model, processor, bundled, gallery)
    port = free_port()
    app.serve(page, port, prevent_thread_lock=True, quiet=True)
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
    type_lines(browser, "#classify-text textarea", CLASSES)
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
    assert set(shown) == set(CLASSES)
    screenshot(browser, "classify", tmp_path)


def test_segment_tab_shows_a_mask_and_a_legend(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _, _ = served
    open_tab(browser, url, "Segment")
    upload(browser, "segment", IMAGE)
    type_lines(browser, "#segment-text textarea", CLASSES)
    find(browser, "#segment-run").click()
    legend = find(browser, "#segment-legend")
    items = [item.text for item in legend.find_elements(By.TAG_NAME, "li")]
    assert [item.split(":")[0] for item in items] == CLASSES
    assert sum(float(item.split(":")[1].strip().rstrip("%")) for item in items) == pytest.approx(100.0, abs=0.2)
    find(browser, "#segment-mask img")
    screenshot(browser, "segment", tmp_path)


def expected_search(model, processor, names, query):
    """Independently: each image's global cosine with the query, and the cosine of its query-conditioned pooled
    embedding (the pooling head called directly) with the query."""
    with torch.no_grad():
        text = model.get_text_embeds(processor(text=[query])["input_ids"])
        scores = {}
        for name in names:
            image_embeds, tokens = model.get_image_and_token_features(processor(images=Image.open(EXAMPLES / name))["pixel_values"])
            pooled = model.text_conditioned_pooling(text, tokens)[0][0, 0]
            scores[name] = (F.cosine_similarity(pooled, text[0], dim=0).item(), F.cosine_similarity(image_embeds[0], text[0], dim=0).item())
    return scores


def assert_search_rows(shown, expected, top):
    by_global = sorted(expected, key=lambda name: expected[name][1], reverse=True)[:top]
    assert sorted(row[0] for row in shown) == sorted(by_global)  # the top by global cosine ...
    assert [float(row[1]) for row in shown] == sorted((float(row[1]) for row in shown), reverse=True)  # ... by FLAIR
    for name, flair, global_cosine in shown:
        assert float(flair) == pytest.approx(expected[name][0], abs=1e-4), name
        assert float(global_cosine) == pytest.approx(expected[name][1], abs=1e-4), name


def test_search_tab_reranks_the_operators_gallery_by_flair(served, browser, tmp_path):
    url, model, processor = served
    open_tab(browser, url, "Search")
    note = find(browser, "#search-gallery-note").text
    assert note.startswith("The gallery holds 4 images (skipped: broken.png (Cannot read broken.png as an image"), note
    find(browser, "#search-text textarea, #search-text input").send_keys(QUERY)
    find(browser, "#search-run").click()
    shown = rows(browser, "search-results")
    assert len(shown) == len(GALLERY)
    assert_search_rows(shown, expected_search(model, processor, GALLERY, QUERY), len(GALLERY))
    find(browser, "#search-maps img")
    screenshot(browser, "search", tmp_path)


def test_search_of_uploads_skips_and_names_an_unreadable_one(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, model, processor = served
    open_tab(browser, url, "Search")
    broken = tmp_path / "notes.png"
    broken.write_bytes(b"not a png")
    uploads = [EXAMPLES / "mosaic-000002.png", EXAMPLES / "mosaic-000003.png", broken]
    find(browser, "#search-uploads input[type=file]").send_keys("\n".join(str(p) for p in uploads))
    next(label for label in browser.find_elements(By.CSS_SELECTOR, "#search-source label") if label.text.strip() == "uploads").click()
    find(browser, "#search-text textarea, #search-text input").send_keys("A large red dress at the bottom")
    time.sleep(1)  # the uploads reach the server
    find(browser, "#search-run").click()
    wait_for_text(browser, "Skipped notes.png (Cannot read notes.png as an image")
    shown = rows(browser, "search-results")
    assert_search_rows(shown, expected_search(model, processor, ["mosaic-000002.png", "mosaic-000003.png"], "A large red dress at the bottom"), 8)


def call_api(url, endpoint, data):
    """One raw call of the page's HTTP API (as any client could make it, no gradio_client): its event stream."""
    request = urllib.request.Request(f"{url}/gradio_api/call/{endpoint}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        event = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    return urllib.request.urlopen(f"{url}/gradio_api/call/{endpoint}/{event}", timeout=60).read().decode()


def test_the_api_reads_nothing_outside_the_gallery(served, tmp_path):
    """A visitor naming server paths (an image, a folder, a missing file) gets the same empty error for each: no
    names, no scores, no image; the file route refuses them; no endpoint takes a folder."""
    url, _, _ = served
    secret = tmp_path / "secret"
    secret.mkdir()
    Image.new("RGB", (64, 64), "red").save(secret / "password.png")
    answers = {
        path: call_api(url, "search", ["uploads", [{"path": str(path), "meta": {"_type": "gradio.FileData"}}], "a dog", 8, "attention"])
        for path in (secret / "password.png", secret, secret / "missing.png", ROOT / "README.md")
    }  # fmt: skip
    assert len(set(answers.values())) == 1, answers  # existing or not, file or folder: one answer
    answer = next(iter(answers.values()))
    assert answer.startswith("event: error") and "password" not in answer and "search-results" not in answer, answer
    for path in (secret / "password.png", secret / "missing.png"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/gradio_api/file={path}", timeout=30)
        assert refused.value.code == 403
    from gradio_client import Client

    api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(api) == {"/captions", "/classify", "/segment", "/search"}
    assert [p["label"] for p in api["/search"]["parameters"]][:2] == ["search", f"your images (up to {app.MAX_UPLOADS})"]


def test_uploads_over_the_caps_are_one_line_messages(served, tmp_path):
    url, _, _ = served
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    big = tmp_path / "big.png"
    Image.new("RGB", (7000, 6000)).save(big)  # 42 million pixels, a small file
    too_many = [handle_file(str(FIXTURES / "images" / "puppy.jpg"))] * (app.MAX_UPLOADS + 1)
    for uploads, message in (
        (too_many, f"{app.MAX_UPLOADS + 1} images uploaded, over the limit of {app.MAX_UPLOADS}: upload fewer."),
        ([handle_file(str(big))], "None of the images could be read: upload JPEG, PNG, WebP or BMP files."),
    ):
        with pytest.raises(Exception) as error:
            client.predict("uploads", uploads, "a dog", 8, "attention", api_name="/search")
        assert str(error.value).strip() == message
    with pytest.raises(Exception) as error:
        client.predict(handle_file(str(big)), "a dog", "attention", api_name="/captions")
    assert str(error.value).strip() == "big.png has over 40 million pixels: upload a smaller image."
    oversized = tmp_path / "oversized.png"
    oversized.write_bytes(b"\0" * (app.MAX_IMAGE_MEGABYTES * 2**20 + 1))
    with pytest.raises(Exception) as error:  # refused by the server's upload limit, before any code of ours
        client.predict(handle_file(str(oversized)), "a dog", "attention", api_name="/captions")
    assert "exceeds" in str(error.value).lower() or "too large" in str(error.value).lower(), str(error.value)


def table_rows(page_html):
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(<td>.*?)</tr>", page_html)]


def test_eight_concurrent_clients_all_get_the_librarys_scores(served):
    """8 gradio clients x 5 requests at once (captions and gallery search in turn): every answer equals the library's,
    and the server's memory stays bounded (the model runs one call at a time)."""
    url, model, processor = served
    from gradio_client import Client, handle_file

    expected_captions = FlairScorer(model, processor).score(str(IMAGE), CAPTIONS)["logits"][0]
    expected_gallery = expected_search(model, processor, GALLERY, QUERY)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    failures, answered = [], []

    def visitor(number):
        client = Client(url, verbose=False)
        for request in range(5):
            try:
                if (number + request) % 2:
                    table = client.predict(handle_file(str(IMAGE)), "\n".join(CAPTIONS), "attention", api_name="/captions")[0]
                    shown = {caption: float(flair) for caption, flair, _, _ in table_rows(table)}
                    assert shown == pytest.approx(dict(zip(CAPTIONS, expected_captions.tolist())), abs=1e-4)
                else:
                    table = client.predict("gallery", None, QUERY, 8, "similarity", api_name="/search")[0]
                    assert_search_rows(table_rows(table), expected_gallery, len(GALLERY))
                answered.append(number)
            except Exception as error:  # noqa: BLE001 (collected, reported below)
                failures.append(f"client {number} request {request}: {error!r}")

    threads = [threading.Thread(target=visitor, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures and len(answered) == 40, failures[:3]
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert growth_mb < 300, growth_mb


def test_bad_input_is_a_message_on_the_page(served, browser):
    url, _, _ = served
    open_tab(browser, url, "Segment")
    find(browser, "#segment-run").click()
    wait_for_text(browser, "Upload an image first.")
    upload(browser, "segment", IMAGE)
    find(browser, "#segment-run").click()
    wait_for_text(browser, "Type at least one class name (one per line).")
    open_tab(browser, url, "Search")
    from selenium.webdriver.common.by import By

    next(label for label in browser.find_elements(By.CSS_SELECTOR, "#search-source label") if label.text.strip() == "uploads").click()
    find(browser, "#search-text textarea, #search-text input").send_keys("a dog")
    find(browser, "#search-run").click()
    wait_for_text(browser, "Upload some images to search.")


def test_without_a_model_the_page_runs_the_bundled_model_and_says_so():
    model, processor, bundled = app.load(None)
    assert bundled and model.config.vision_config.image_size == 96
    assert app.BUNDLED_BANNER in app.build(model, processor, bundled).config["components"].__repr__()
    assert "a small FLAIR trained on Fashion-MNIST mosaics; for photos use a converted release" in app.BUNDLED_BANNER
    assert not app.load(str(app.BUNDLED_MODEL))[2]  # named with --model: no banner


def test_a_page_without_its_bundled_model_or_a_model_says_which_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(app, "BUNDLED_MODEL", tmp_path / "flair-fashion-mosaics")
    with pytest.raises(SystemExit) as error:
        app.load_or_exit(None)
    assert str(error.value) == ("error: the bundled model flair-fashion-mosaics/ is not beside app.py: copy it there, or name a "
                                "model with --model or the FLAIR_MODEL variable")  # fmt: skip


@pytest.mark.parametrize("line", [0, 1])
def test_the_manuals_commands_serve_the_page(line):
    """Each `python demo/app.py ...` line of the Deployment page, as written but for the port: the bundled model, with
    its banner where no --model is named, and the bundled examples as a gallery."""
    from manual import bash_commands, section

    commands = [shlex.split(c) for c in bash_commands(section("deployment.md", "Demo page")) if c.startswith("python demo/app.py")]
    assert len(commands) == 2
    port, command = free_port(), [sys.executable, *commands[line][1:]]
    command = [str(port) if previous == "--port" else word for previous, word in zip([None, *command], command)]
    if "--port" not in command:
        command += ["--port", str(port)]
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
        assert "Score captions" in page and (app.BUNDLED_BANNER in page) == ("--model" not in command)
        assert ("The gallery holds 4 images" in page) == ("--gallery" in command), page[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("case", ["model", "missing-gallery", "empty-gallery", "gallery-over-limit"])
def test_what_an_operator_mistypes_is_one_line(case, tmp_path, gallery_dir):
    """`demo/app.py` with a model that cannot load or a gallery it cannot use: one line on stderr, no server."""
    empty = tmp_path / "empty"
    empty.mkdir()
    args, message = {
        "model": (["--model", str(tmp_path / "no-model")], f"error: --model {tmp_path / 'no-model'}: cannot load a FLAIR model ("),
        "missing-gallery": (["--gallery", str(tmp_path / "none")], f"error: --gallery {tmp_path / 'none'}: no such folder"),
        "empty-gallery": (["--gallery", str(empty)], f"error: --gallery {empty} holds no images (.bmp, .jpeg, .jpg, .png, .webp)"),
        "gallery-over-limit": (["--gallery", str(gallery_dir), "--gallery-limit", "3"],
                               f"error: --gallery {gallery_dir} holds 5 images, over the limit of 3: pass --gallery-limit 5 or a smaller folder"),
    }[case]  # fmt: skip
    result = subprocess.run([sys.executable, str(ROOT / "demo" / "app.py"), *args, "--port", str(free_port())], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})  # fmt: skip
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert result.stderr.strip().startswith(message), result.stderr
