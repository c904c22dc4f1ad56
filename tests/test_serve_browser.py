"""`femtogpt serve` in a real browser: headless Chromium driven by Selenium.

Skipped, with the reason, where Chromium, chromedriver or selenium is missing
(.ci/run installs Debian's chromium and chromium-driver); test_serve.py tests
the same server's API without a browser."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from femtogpt.app.serve import make_server

from test_serve import PACKAGE_PARENT, TEXT, cli_sample, run_dir  # noqa: F401 (fixture)

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which(
    "google-chrome")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not DRIVER:
        pytest.skip("no Chromium and chromedriver here (Debian: apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1100"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER),
                                  options=options)
    except WebDriverException as err:
        pytest.skip(f"Chromium did not start: {str(err).splitlines()[0]}")
    yield driver
    driver.quit()


@pytest.fixture()
def page(run_dir, tmp_path, browser):  # noqa: F811
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    srv = make_server([str(copy)], port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    browser.get(f"http://127.0.0.1:{srv.server_address[1]}/")
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "live")
    yield browser, copy
    srv.shutdown()
    srv.server_close()


def wait(driver, condition, timeout=30):
    return WebDriverWait(driver, timeout).until(condition)


def points(driver):
    return int(driver.find_element(By.ID, "loss-chart").get_attribute("data-points") or 0)


def test_the_page_lists_the_run_and_its_curve_grows_live(page):
    driver, copy = page
    runs = driver.find_elements(By.CSS_SELECTOR, "#runs li")
    assert len(runs) == 1 and "run" in runs[0].text and "char" in runs[0].text
    wait(driver, lambda d: points(d) == 3)          # evaluations at 0, 10 and 20
    wait(driver, lambda d: "step 20" in d.find_element(By.ID, "eval-samples").text)
    with open(copy / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iter": 30, "train_loss": 2.0, "val_loss": 2.1, "val_bpc": 3.0,
                            "lr": 1e-3, "tokens_per_s": 900.0, "elapsed_s": 4.0}) + "\n")
    wait(driver, lambda d: points(d) == 4)          # no reload
    wait(driver, lambda d: "step 30" in d.find_element(By.ID, "eval-samples").text)
    assert "step 30" in driver.find_element(By.ID, "run-summary").text


def test_a_prompt_streams_what_femtogpt_sample_prints(page):
    driver, copy = page
    for field, value in (("prompt", "To be"), ("temperature", "0.9"), ("top-k", "20"),
                         ("max-tokens", "80"), ("seed", "11")):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: d.find_element(By.ID, "output").get_attribute("data-done") == "true")
    shown = driver.execute_script(
        "return document.getElementById('output-prompt').textContent + "
        "document.getElementById('output-text').textContent")
    printed = cli_sample(str(copy), "--prompt", "To be", "--temperature", "0.9", "--top-k",
                         "20", "--max-new-tokens", "80", "--seed", "11")
    assert shown + "\n" == printed      # the command line ends with a newline


def test_probabilities_and_the_attention_heat_map_render(page):
    driver, _ = page
    box = driver.find_element(By.ID, "analyze-text")
    box.send_keys("To be, or not to be")
    driver.find_element(By.ID, "analyze").click()
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tokens span")) == 19)
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#next li")) == 10)
    assert "bits per character" in driver.find_element(By.ID, "analyze-summary").text
    wait(driver, lambda d: d.find_element(By.ID, "attention").get_attribute("data-cells")
         == str(19 * 20 // 2))
    # Another layer and head: the map is drawn again for them.
    driver.find_element(By.CSS_SELECTOR, "#layer option[value='1']").click()
    wait(driver, lambda d: d.find_element(By.ID, "attention").get_attribute("data-layer") == "1")
    # Clicking the third token and then its most likely next token continues from it.
    driver.find_elements(By.CSS_SELECTOR, "#tokens span")[2].click()
    first = driver.find_elements(By.CSS_SELECTOR, "#next li")[0]
    first.click()
    wait(driver, lambda d: d.find_element(By.ID, "output").get_attribute("data-done") == "true")
    assert driver.find_element(By.ID, "prompt").get_attribute("value").startswith("To ")


def test_bad_input_shows_its_message(page):
    driver, _ = page
    element = driver.find_element(By.ID, "temperature")
    element.clear()
    element.send_keys("-1")
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: "temperature must be in" in d.find_element(By.ID, "sample-error").text)
    prompt = driver.find_element(By.ID, "analyze-text")
    prompt.send_keys("Zebra")
    driver.find_element(By.ID, "analyze").click()
    wait(driver, lambda d: "does not know: 'Z'" in d.find_element(By.ID, "analyze-error").text)


def test_stop_cancels_a_sample(page, monkeypatch):
    driver, _ = page
    # This model writes 2,000 tokens in a blink: slow each one down to see Stop act.
    from femtogpt.app import serve
    write = serve._EventStream.write
    monkeypatch.setattr(serve._EventStream, "write",
                        lambda self, text: (time.sleep(0.005), write(self, text)))
    element = driver.find_element(By.ID, "max-tokens")
    element.clear()
    element.send_keys("2000")
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: len(d.find_element(By.ID, "output-text").text) > 20)
    driver.find_element(By.ID, "stop").click()
    wait(driver, lambda d: d.find_element(By.ID, "generate").is_enabled())
    assert driver.find_element(By.ID, "output").get_attribute("data-done") != "true"
    shown = len(driver.find_element(By.ID, "output-text").get_attribute("textContent"))
    time.sleep(1.0)
    assert len(driver.find_element(By.ID, "output-text").get_attribute("textContent")) == shown
    assert driver.find_element(By.ID, "sample-error").text == ""
