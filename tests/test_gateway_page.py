"""The gateway's page at `/`, used as a person would: in a real headless Chromium (Debian's, driven
through its chromedriver), typing a prompt and two responses, pressing Score, reading the rewards
and the preference, and checking the screenshot's preference bar."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from reward_client import RewardClient, bradley_terry

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
GREEN = (0x1B, 0x7F, 0x3B)  # #bar-a in the page's style

PROMPT = "Explain in one sentence why the sky is blue."
GOOD = "Air molecules scatter short blue wavelengths of sunlight far more than red ones (Rayleigh scattering)."
BAD = "Because it reflects the ocean."


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.geteuid() == 0:  # `make setup` installs them as root: missing means setup is broken
            pytest.fail("chromium and chromedriver are missing although `make setup` installs them")
        pytest.skip("Debian's chromium and chromium-driver are not installed (needs root: make setup)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,1000", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _fill_and_score(browser, url, prompt, a, b):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    for field, text in (("prompt", prompt), ("response-a", a), ("response-b", b)):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(text)
    browser.find_element(By.ID, "score").click()
    WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.ID, "results").is_displayed() or d.find_element(By.ID, "error").text)
    return By


def test_page_scores_two_responses_and_shows_the_preference(browser, gateway, server, tmp_path):
    By = _fill_and_score(browser, gateway.url + "/", PROMPT, GOOD, BAD)
    assert browser.find_element(By.ID, "error").text == ""
    with RewardClient(server.grpc_url) as client:
        a, b = client.score([(PROMPT, GOOD), (PROMPT, BAD)])
    shown_a = float(browser.find_element(By.ID, "reward-a").text)
    shown_b = float(browser.find_element(By.ID, "reward-b").text)
    assert shown_a == pytest.approx(a.score, abs=1e-6) and shown_b == pytest.approx(b.score, abs=1e-6)
    p = bradley_terry(a.score, b.score)
    assert float(browser.find_element(By.ID, "p-a").text) == pytest.approx(p, abs=1e-4)
    assert browser.find_element(By.ID, "tokens-a").text.endswith(f"{a.num_tokens} tokens")

    # The screenshot shows the bar split at P(A preferred): count the green pixels along its middle row.
    shot = Path(os.environ.get("REWARD_SCREENSHOT_DIR", tmp_path)) / "page.png"  # keep it to look at it
    assert browser.save_screenshot(str(shot))
    bar = browser.find_element(By.ID, "bar")
    image = Image.open(shot).convert("RGB")
    row = int(bar.location["y"] + bar.size["height"] / 2)
    left, width = int(bar.location["x"]) + 1, int(bar.size["width"]) - 2
    pixels = [image.getpixel((x, row)) for x in range(left, left + width)]
    green = sum(1 for px in pixels if max(abs(c - g) for c, g in zip(px, GREEN)) < 12)
    assert image.size[0] >= left + width and green / width == pytest.approx(p, abs=0.02), (green, width, p)


def test_page_shows_the_servers_error_and_keeps_working(browser, gateway):
    By = _fill_and_score(browser, gateway.url + "/", PROMPT, "word " * 700, BAD)
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("Error: conversations[0]: conversation is ") and "maximum length of 512" in error
    By = _fill_and_score(browser, gateway.url + "/", '[{"role": "user", "content": "Hi"}]', GOOD, "")
    assert browser.find_element(By.ID, "error").text == ""
    assert not browser.find_element(By.ID, "preference").is_displayed()
    assert float(browser.find_element(By.ID, "reward-a").text) != 0.0
