"""The README's picture of `femtogpt serve`: a run, its curves, a sample, a
text analyzed and one head's attention, rendered by headless Chromium.

    python scripts/serve_screenshot.py --train --out /tmp/shakespeare --to docs/serve.png

With --train it first starts `femtogpt train --preset baby` on the bundled
text into --out (which must not hold a run yet) and takes the picture while
that run trains, after its third evaluation; without, it shows the run in
--out as it is. Needs Debian's chromium and chromium-driver and selenium
(the test extra).
"""
import argparse
import os
import shutil
import subprocess
import sys
import threading
import time

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from femtogpt.app.serve import make_server


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out", help="the run to show")
    ap.add_argument("--to", default="docs/serve.png")
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--text", default="But soft, what light through yonder window breaks?")
    ap.add_argument("--train", action="store_true",
                    help="train a run into --out first, and show it while it trains")
    args = ap.parse_args()
    trainer = start_training(args.out) if args.train else None
    try:
        screenshot(args)
    finally:
        if trainer:
            trainer.terminate()
            trainer.wait(30)
    print(f"wrote {args.to}")


def start_training(out, evaluations=3, timeout=1200):
    """`femtogpt train --preset baby` in the background, once it has written
    `evaluations` rows of metrics (so there are curves to draw)."""
    trainer = subprocess.Popen([sys.executable, "-m", "femtogpt.app.cli", "train", "--preset",
                                "baby", "--out", out], stdout=subprocess.DEVNULL)
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.monotonic() + timeout
    while time.monotonic() < deadline and trainer.poll() is None:
        if os.path.exists(metrics) and sum(b"val_loss" in line for line in
                                           open(metrics, "rb")) >= evaluations:
            time.sleep(2)               # the checkpoint of that evaluation is written
            return trainer
        time.sleep(1)
    trainer.terminate()
    raise SystemExit(f"the run in {out} did not reach {evaluations} evaluations")


def screenshot(args):
    server = make_server([args.out], port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1900",
                 "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(
        executable_path=shutil.which("chromedriver")), options=options)
    wait = WebDriverWait(driver, 60).until
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait(lambda d: int(d.find_element(By.ID, "loss-chart").get_attribute("data-points")
                           or 0) > 0)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.send_keys(args.prompt)
        driver.find_element(By.ID, "seed").clear()
        driver.find_element(By.ID, "seed").send_keys("7")
        driver.find_element(By.ID, "generate").click()
        wait(lambda d: d.find_element(By.ID, "output").get_attribute("data-done") == "true")
        driver.find_element(By.ID, "analyze-text").send_keys(args.text)
        driver.find_element(By.ID, "analyze").click()
        wait(lambda d: d.find_element(By.ID, "attention").get_attribute("data-cells"))
        driver.find_elements(By.CSS_SELECTOR, "#tokens span")[12].click()
        time.sleep(0.5)
        driver.save_screenshot(args.to)
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main()
