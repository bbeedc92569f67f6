"""The web playground in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) against a real ``blipitm serve`` on the tiny checkpoint, with an API key: upload an
image, enter three captions, wait for the results, check the numbers shown equal the API's, click
a word and see its overlay, use it from the keyboard, at phone width, with no console errors
(a Content-Security-Policy violation would be one)."""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from server_helpers import ServerProcess, cli_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KEY = "browser-test-key"
TEXTS = ["a red square", "blue", "a small dog on a large sofa"]
WAIT_S = 60  # generous bounds for a loaded 2-core machine; the test asserts behaviour, not speed


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if not missing:
        return
    reason = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[ServerProcess]:
    _browser_or_skip()
    with cli_server(tiny_ckpt, "--api-key", KEY, "--max-wait-ms", "5") as s:
        yield s


@pytest.fixture()
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    _browser_or_skip()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for downloads
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1000,1400",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    browser.set_page_load_timeout(WAIT_S)
    try:
        yield browser
    finally:
        browser.quit()


def _image(path: Path) -> Path:
    Image.new("RGB", (60, 40), (200, 30, 30)).save(path)
    return path


def test_playground_end_to_end(server: ServerProcess, driver: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT_S)
    image = _image(tmp_path / "red.png")
    driver.get(server.url + "/")
    # The server requires keys: /v1/models answered 401, so the page asks for one.
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-auth") == "key")
    key = driver.find_element(By.ID, "api-key")
    assert key.is_displayed()
    key.send_keys(KEY)
    driver.find_element(By.ID, "file").send_keys(str(image))
    wait.until(ec.visibility_of_element_located((By.ID, "preview")))
    driver.find_element(By.ID, "captions").send_keys("\n".join(TEXTS))
    driver.find_element(By.ID, "run").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results button")) == 3)
    assert driver.execute_script("return sessionStorage.getItem('blipitm-api-key')") == KEY
    assert driver.execute_script("return localStorage.length") == 0

    # The numbers shown are the API's for the same request.
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    api = httpx.post(
        server.url + "/v1/explain",
        json={"image": uri, "texts": TEXTS},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=WAIT_S,
    ).json()["data"]
    rows = driver.find_elements(By.CSS_SELECTOR, "#results button")
    by_prob = sorted(range(3), key=lambda i: -api[i]["itm_probability"])
    assert [int(r.get_attribute("data-index")) for r in rows] == by_prob  # ranked
    for rank, row in enumerate(rows):
        d = api[int(row.get_attribute("data-index"))]
        assert row.find_element(By.CLASS_NAME, "text").text == d["text"]
        assert row.find_element(By.CLASS_NAME, "rank").text == str(rank + 1)
        assert row.find_element(By.CLASS_NAME, "prob").text == f"{d['itm_probability']:.4f}"
        assert row.find_element(By.CLASS_NAME, "cos").text == f"{d['itc_cosine']:.4f}"
        assert float(row.get_attribute("data-itm-probability")) == d["itm_probability"]
        assert float(row.get_attribute("data-itc-cosine")) == d["itc_cosine"]

    # Click a word: its map appears over the image.
    best = api[by_prob[0]]
    words = driver.find_elements(By.CSS_SELECTOR, "#tokens button")
    assert [w.text for w in words] == best["tokens"]
    words[0].click()
    overlay = driver.find_element(By.ID, "overlay")
    wait.until(lambda d: overlay.get_attribute("data-shown") == f"token:{by_prob[0]}:0")
    assert overlay.is_displayed()
    assert "word" in driver.find_element(By.ID, "shown").text
    # Drawn: the canvas holds the jet-coloured blend, not the plain red image.
    coloured = driver.execute_script(
        "const c = document.getElementById('overlay');"
        "const p = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < p.length; i += 4) if (p[i + 2] > 60) n++; return n;"
    )
    assert coloured > 0
    driver.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 1000

    # Keyboard: Tab reaches a result, Enter selects it.
    second = rows[1]
    second.send_keys(Keys.ENTER)
    wait.until(lambda d: second.get_attribute("aria-pressed") == "true")
    assert overlay.get_attribute("data-shown") == f"caption:{by_prob[1]}"

    # Phone width: nothing wider than the screen.
    driver.set_window_size(390, 844)
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    # The only error allowed is the 401 of the key probe that made the page ask for the key.
    assert all("v1/models" in e["message"] and "401" in e["message"] for e in errors), errors


def test_no_key_field_when_the_server_needs_none(tiny_ckpt: Path, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with cli_server(tiny_ckpt) as open_server:
        driver.get(open_server.url + "/playground")
        body = driver.find_element(By.TAG_NAME, "body")
        WebDriverWait(driver, WAIT_S).until(lambda d: body.get_attribute("data-auth") == "open")
        assert not driver.find_element(By.ID, "api-key").is_displayed()
        assert not driver.find_element(By.ID, "overlay").is_displayed()  # nothing to show yet
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
