"""The labelling page in a real browser (headless Chromium via Selenium): keys and clicks append labels, a restarted
server resumes at the first unlabelled prompt, and D3PO trains on the result (tiny SD3).

CI installs Chromium and its driver (.ci/run: `apt-get install chromium chromium-driver`) and Selenium (the `dev`
extra); there the test must run. Elsewhere it is skipped, with the reason, only when they are missing."""

import contextlib
import json
import os
import shutil
import threading

import pytest
from conftest import untrained_lora_parameters

from flowalign import labeling
from flowalign.config import load_config
from flowalign.trainers.d3po import D3POConfig, train_d3po

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow circle", "three red squares"]
# what a fresh profile must not do on a machine without internet (it stalls otherwise)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]  # the last: containers with a small /dev/shm


def _browser_or_skip() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver (chromium-driver)", driver)) if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        msg = f"the browser test needs {', '.join(missing)}; on Debian: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test, but {msg} (.ci/run installs them).")
        pytest.skip(msg)
    return chromium, driver


def _chrome(chromium: str, driver: str, profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = chromium
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    browser.set_page_load_timeout(30)
    return browser


@contextlib.contextmanager
def _serving(folder, port=0):
    server = labeling.make_server(folder, port=port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _wait_for(browser, index: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 15).until(lambda b: b.find_element(By.ID, "prompt").get_attribute("data-index") == index,
                                     message=f"the page never showed prompt {index}")


def _press(browser, key: str, then: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.TAG_NAME, "body").send_keys(key)
    _wait_for(browser, then)


def _lines(folder) -> list[tuple[int, int | None]]:
    records = map(json.loads, (folder / "labels.jsonl").read_text().splitlines())
    return [(r["prompt_index"], r["choice"]) for r in records]


def test_label_in_chromium_resume_after_restart_then_train_d3po(tmp_path):
    chromium, driver = _browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    import flowalign as fa

    folder = labeling.prepare(tmp_path / "pairs", model="tiny-sd3", prompts=PROMPTS, n=2, num_steps=3, progress=False)
    browser = _chrome(chromium, driver, tmp_path / "profile")
    try:
        with _serving(folder) as server:
            port = server.server_address[1]
            browser.get(f"http://127.0.0.1:{port}/")
            _wait_for(browser, "0")
            assert browser.find_element(By.ID, "prompt").text == "1. a red circle"
            WebDriverWait(browser, 15).until(lambda b: b.execute_script(
                "return document.images.length === 2 && [...document.images].every(i => i.complete && "
                "i.naturalWidth === 32)"), message="the two 32x32 samples did not load")
            _press(browser, "1", then="1")                 # key 1: the first image
            _press(browser, Keys.ARROW_RIGHT, then="2")    # right arrow: the right image
            browser.find_elements(By.CSS_SELECTOR, "#images figure")[1].click()  # a click on the second image
            _wait_for(browser, "3")
        assert _lines(folder) == [(0, 0), (1, 1), (2, 1)]  # on disk before the server stopped

        with _serving(folder, port=port):                  # restart on the same port: resume at prompt 3
            browser.get(f"http://127.0.0.1:{port}/")
            _wait_for(browser, "3")
            assert browser.find_element(By.ID, "progress").text == "3 of 5 prompts labelled"
            _press(browser, "0", then="4")                 # 0: no preference
            _press(browser, Keys.BACKSPACE, then="3")      # back to prompt 3 and change the answer
            _press(browser, "2", then="4")                 # -> the first unlabelled prompt
            browser.find_element(By.ID, "tie").click()     # the button records "no preference" for prompt 4 ...
            _wait_for(browser, "done")
            _press(browser, Keys.BACKSPACE, then="4")      # ... and is replaced by a choice
            _press(browser, Keys.ARROW_LEFT, then="done")
            assert browser.find_element(By.ID, "done").is_displayed()
            assert not browser.find_element(By.ID, "error").text
    finally:
        browser.quit()
    assert _lines(folder) == [(0, 0), (1, 1), (2, 1), (3, None), (3, 1), (4, None), (4, 0)]
    labels = labeling.read_labels(folder / "labels.jsonl", labeling.read_manifest(folder))
    assert {i: r["choice"] for i, r in labels.items()} == {0: 0, 1: 1, 2: 1, 3: 1, 4: 0}

    cfg = load_config(D3POConfig, {"model": "tiny-sd3", "reward": "jpeg-compressibility", "eval_prompts": None,
                                   "labels": str(folder), "epochs": 2, "train_batch_size": 4, "lora_rank": 4,
                                   "lr": 1e-2, "out": str(tmp_path / "run"), "progress": False, "log_with": "none"})
    run, unchanged = untrained_lora_parameters(lambda: train_d3po(cfg, model=fa.load_model("tiny-sd3")))
    assert not unchanged, f"parameters that did not train: {unchanged[:5]}"
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/pairs"] for r in rec] == [5, 5] and run.step == 6  # 5 pairs, 2 per step, 2 epochs
    assert rec[0]["train/first_ratio_dev"] < 1e-5
