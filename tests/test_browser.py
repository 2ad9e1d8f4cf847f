"""The HTML reports in a real browser (headless Chromium from Debian's ``chromium`` and ``chromium-driver``,
installed by .ci/run): every picture loads, nothing is logged to the console, the tables are there. A
screenshot of each page is saved into its run folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from PIL import Image
from pipeline_scripts import load_pipeline

from denseclip.demo import METHODS, DemoConfig, default_training, run_demo
from denseclip.synthetic import write_shards

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000")
BROKEN_IMAGES = "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), \
        "install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def check_page(browser, page: Path, min_tables: int) -> dict:
    """Open ``page``, assert it is whole, save ``screenshot.png`` beside it; returns what the page holds."""
    browser.get_log("browser")  # what earlier pages logged
    browser.get(page.resolve().as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.execute_script(BROKEN_IMAGES) == [], page
    problems = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert problems == [], (page, problems)
    tables = browser.execute_script("return Array.from(document.querySelectorAll('table')).map(t => t.rows.length)")
    assert len(tables) >= min_tables and all(rows >= 2 for rows in tables), (page, tables)
    shot = page.parent / "screenshot.png"
    shot.write_bytes(browser.get_screenshot_as_png())
    assert Image.open(shot).size[0] > 0
    return {"images": browser.execute_script("return document.images.length"),
            "links": browser.execute_script("return Array.from(document.links).map(a => a.href)")}


@pytest.mark.slow
def test_demo_pages_in_a_browser(browser, tmp_path):
    training = dataclasses.replace(default_training(), iterations=2, guided_iterations=1, batch_size=2,
                                   crop_size=64)
    run_demo(DemoConfig(seed=11, num_images=4, train_images=4, training=training, num_overlays=2,
                        monitor_images=0), tmp_path)
    comparison = check_page(browser, tmp_path / "index.html", min_tables=3)
    assert comparison["images"] == 2  # the same two scenes under every method
    assert comparison["links"] == [(tmp_path / m.key / "index.html").as_uri() for m in METHODS]
    method = check_page(browser, tmp_path / "denseclip" / "index.html", min_tables=4)
    assert method["images"] == 3  # confusion matrix and two overlays
    assert (tmp_path / "screenshot.png").stat().st_size > 0


@pytest.mark.slow
def test_evaluation_page_in_a_browser(browser, tmp_path):
    evaluate = load_pipeline("evaluate")
    write_shards(seed=2022, n=4, out=str(tmp_path / "shards"), shard_size=4, size=64)
    out = tmp_path / "eval"
    assert evaluate.main(["--model", "denseclip-tiny-shapes", "--input", str(tmp_path / "shards"), "--classes",
                          "synthetic", "--num-overlays", "2", "--output", str(out)]) == 0
    page = check_page(browser, out / "index.html", min_tables=4)
    assert page["images"] == 3
    assert (out / "screenshot.png").stat().st_size > 0
