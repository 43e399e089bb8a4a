"""The page of `emotr serve` in a real browser (Debian's chromium, headless, driven by selenium)
against a running application on the shared local Ray, and /explain's overlays against `emotr
explain`'s for the same image and version."""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from emotr.deploy.predict import open_predictor
from emotr.insight.explain import explain_paths
from tests.integration.test_serve import pyfunc_rows, served_model

pytestmark = pytest.mark.slow

MODEL = "emotr-page"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def page_served(tmp_path_factory, ray_local, mlflow_server):
    with served_model(tmp_path_factory.mktemp("page"), mlflow_server, MODEL) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    """Headless chromium as this machine's network allows it: nothing of Google's called."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (.ci/run)")
    profile = tempfile.mkdtemp(prefix="emotr-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1100,900",
    ):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def demo_faces(running, n: int) -> list[Path]:
    """Demo JPEGs the fixture's run wrote (real files, made by the tests)."""
    return sorted(Path(running.cfg.data.root).rglob("*.jpg"))[:n]


def upload(driver, path: Path) -> None:
    driver.find_element(By.ID, "files").send_keys(str(path))


def card(driver, name: str, wanted: str, timeout: float = 90):
    """The card of file `name` once its result holds `wanted` (a CSS selector)."""
    selector = f'.card[data-file="{name}"] {wanted}'
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, selector))
    return driver.find_element(By.CSS_SELECTOR, f'.card[data-file="{name}"]')


def requested_urls(driver) -> list[str]:
    """Every URL the page asked the network for (Chrome's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_the_page_shows_the_emotion_bars_and_heatmap_of_an_upload(page_served, browser):
    url = page_served.started.url
    face, other = demo_faces(page_served, 2)
    browser.get(f"{url}/")
    WebDriverWait(browser, 60).until(lambda d: "version 1" in d.find_element(By.ID, "serving").text)

    upload(browser, face)
    shown = card(browser, face.name, ".result .label")

    expected = pyfunc_rows(page_served.tracker, "1", [face.read_bytes()], MODEL).iloc[0]
    assert shown.find_element(By.CSS_SELECTOR, ".label").text == expected["label"]
    bars = shown.find_elements(By.CSS_SELECTOR, ".bar")
    assert [bar.get_attribute("data-class") for bar in bars] == ["negative", "positive"]
    for bar in bars:
        printed = float(bar.find_element(By.CSS_SELECTOR, ".value").text)
        assert printed == pytest.approx(expected[f"p_{bar.get_attribute('data-class')}"], abs=1e-4)
    heatmap = shown.find_element(By.CSS_SELECTOR, "img.heatmap")
    assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", heatmap) > 0
    assert "version 1 (champion)" in shown.text

    # A text file renamed .jpg shows its reason in place; the page goes on answering.
    notes = Path(tempfile.mkdtemp()) / "notes.jpg"
    notes.write_text("a text file renamed .jpg\n")
    upload(browser, notes)
    bad = card(browser, notes.name, ".error")
    assert "not an image" in bad.find_element(By.CSS_SELECTOR, ".error").text
    upload(browser, other)
    assert card(browser, other.name, ".result .label").find_element(By.CSS_SELECTOR, ".label")

    origin = url.rstrip("/")
    network = [u for u in requested_urls(browser) if u.startswith(("http", "ws"))]
    assert network and all(u.startswith(origin) for u in network), network


def test_the_page_compares_the_challenger_and_fits_a_phone(page_served, browser):
    face = demo_faces(page_served, 3)[2]
    browser.get(f"{page_served.started.url}/")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "options").is_displayed())
    browser.find_element(By.ID, "compare").click()

    upload(browser, face)
    shown = card(browser, face.name, '.result[data-model="challenger"] .label')

    boxes = shown.find_elements(By.CSS_SELECTOR, ".result")
    assert [box.get_attribute("data-model") for box in boxes] == ["champion", "challenger"]
    assert "version 1 (challenger)" in boxes[1].text
    browser.set_window_size(390, 800)
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    browser.set_window_size(1100, 900)
    assert overflow <= 0


def test_explain_overlays_equal_emotr_explains_for_the_same_image_and_version(
    page_served, tmp_path
):
    running = page_served
    face = demo_faces(running, 4)[3]
    answer = requests.post(
        f"{running.started.url}/explain",
        files={"file": (face.name, face.read_bytes(), "image/jpeg")},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    row = answer.json()["rows"][0]
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["overlay"].split(",")[1]))))

    predictor = open_predictor(running.cfg, running.tracker, f"models:/{MODEL}/1")
    summary = explain_paths(running.cfg, predictor, [str(face)], tmp_path, progress=False)
    assert summary.n_overlays == 1
    (written,) = tmp_path.glob(f"{face.stem}_*.png")
    offline = np.asarray(Image.open(written).convert("RGB"))

    assert served.shape == offline.shape
    difference = np.abs(served.astype(int) - offline.astype(int))
    assert difference.max() <= 2, f"max pixel difference {difference.max()}"
