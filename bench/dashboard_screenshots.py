"""The README's dashboard screenshots, taken in headless Chromium against a live test stack.

    PYTHONPATH=. .venv/bin/python bench/dashboard_screenshots.py

Uploads the biased-digits sample at the walkthrough's size (6,000 training images), runs the
walkthrough's job (10 ERM epochs) to the end, starts a second one, and while that one trains takes
bench/results/dashboard_jobs.png (the job list) and bench/results/dashboard_job.png (the finished
job's page, its first screen), 1280x900. Needs Chromium at /usr/bin/chromium (scripts/bootstrap.sh installs it).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's code and the test suite's stack
from stack import running  # noqa: E402
from test_service_e2e import upload_dataset, wait_for, zip_dir  # noqa: E402

from masktune_core.sample_data import write_biased_digits  # noqa: E402

OUT = ROOT / "bench" / "results"
VIEWPORT = {"width": 1280, "height": 900}


def start_job(client: httpx.Client, body: dict) -> str:
    response = client.post("/v1/jobs", json=body)
    response.raise_for_status()
    return response.json()["id"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, running(Path(tmp), worker=True) as stack:
        key = stack.create_key("demo")
        with stack.client(key) as client:
            dataset = upload_dataset(client, zip_dir(write_biased_digits(Path(tmp) / "digits")), "biased-digits.zip")
            finished = start_job(client, {"dataset_id": dataset["id"], "erm": {"epochs": 10}})
            job = wait_for(client, f"/v1/jobs/{finished}", lambda j: j["status"] in ("succeeded", "failed"), 600)
            assert job["status"] == "succeeded", job
            training = start_job(client, {"dataset_id": dataset["id"], "erm": {"epochs": 10}, "masking": {"checkpoint": "last"}})
            wait_for(client, f"/v1/jobs/{training}", lambda j: j["stage"] == "erm" and j["progress"] > 0.2, 300)

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{stack.base_url}/dashboard/")
            page.fill("#key-input", key)
            page.click("#key-form button")
            expect(page.locator(f"tr[data-job={training}] [data-status]")).to_have_text("running")
            page.screenshot(path=OUT / "dashboard_jobs.png")
            page.goto(f"{stack.base_url}/dashboard/#/jobs/{finished}")
            expect(page.locator("#comparison")).to_be_visible(timeout=30_000)
            page.screenshot(path=OUT / "dashboard_job.png")
            browser.close()
    print(f"wrote {OUT / 'dashboard_jobs.png'} and {OUT / 'dashboard_job.png'}")


if __name__ == "__main__":
    main()
