"""The dashboard in a real browser: headless Chromium (Debian's package, driven by Playwright) against
a live stack. A dataset is uploaded and a job started from the page; the page then shows that job's
numbers. Set DASHBOARD_SCREENSHOTS=bench/results to refresh the README's screenshots."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from stack import running
from test_service_e2e import zip_dir

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra: pip install -e '.[test]'")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: scripts/bootstrap.sh installs "
                                                              "Debian's chromium package when run as root with apt-get")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running(tmp_path_factory.mktemp("stack"), worker=True) as stack:
        yield stack


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        # Uncaught errors and errors the page logs (the browser's own 'Failed to load resource' lines
        # for answers like the wrong key's 401 are expected).
        page.on("console", lambda message: message.type == "error" and not message.text.startswith("Failed to load")
                and page.errors.append(message.text))
        try:
            yield page
        finally:
            browser.close()


def lookup(metrics: dict, method: str, split: str, path: str):
    node = metrics[method][split]
    for key in path.split("/"):
        node = node[key]
    return node


def test_a_job_started_from_the_dashboard_shows_its_numbers(stack, page, tiny_digits, tmp_path):
    expect = sync_api.expect
    shots = Path(os.environ.get("DASHBOARD_SCREENSHOTS", tmp_path))
    key = stack.create_key("dashboard")
    archive = tmp_path / "digits.zip"
    archive.write_bytes(zip_dir(tiny_digits))

    page.goto(stack.base_url + "/")
    assert page.url == stack.base_url + "/dashboard/"
    with stack.client(None) as anonymous:  # the pages stay out of the API's schema (and so out of the fuzzing)
        paths = anonymous.get("/openapi.json").json()["paths"]
    assert [p for p in paths if not p.startswith("/v1/")] == ["/healthz", "/readyz"]
    # A wrong key is refused and forgotten; the right one is kept.
    page.fill("#key-input", "mt_not-a-key")
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_contain_text("refused")
    assert page.evaluate("localStorage.getItem('masktune.apiKey')") is None
    page.fill("#key-input", key)
    page.click("#key-form button")
    expect(page.locator("#jobs")).to_be_visible()

    page.click("text=New job")
    page.set_input_files("#dataset-file", archive)
    page.click("#upload")
    expect(page.locator("#upload-state [data-status]")).to_have_text("ready", timeout=60_000)
    expect(page.locator("#start-job")).to_be_enabled()
    config = json.loads(page.input_value("#job-config"))
    page.click("#start-job")
    page.wait_for_url(re.compile(r"#/jobs/job_\w+$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator(".job-summary [data-status]")).to_have_text("succeeded", timeout=120_000)
    expect(page.locator("#comparison")).to_be_visible()

    with stack.client(key) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        metrics = client.get(f"/v1/jobs/{job_id}/artifacts/metrics.json").json()
        previews = client.get(f"/v1/jobs/{job_id}/artifacts/previews.png").content
        metrics_bytes = client.get(f"/v1/jobs/{job_id}/artifacts/metrics.json").content
        events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        datasets = client.get("/v1/datasets").json()["data"]
    assert job["status"] == "succeeded" and job["config"]["erm"]["epochs"] == config["erm"]["epochs"]
    assert [(d["id"], d["filename"]) for d in datasets] == [(job["dataset_id"], "digits.zip")]

    # Charts: one point per epoch event (ERM epochs, then finetune), at that epoch's values.
    epochs = [e["data"] for e in events if e["kind"] == "epoch"]
    assert len(epochs) == config["erm"]["epochs"] + job["config"]["finetune"]["epochs"]
    loss = page.eval_on_selector_all("svg[data-chart=loss] circle.point", "ps => ps.map(p => +p.dataset.value)")
    assert loss == pytest.approx([e["train_loss"] for e in epochs])
    val = page.eval_on_selector_all("svg[data-chart=accuracy] circle.point[data-series=val]", "ps => ps.map(p => +p.dataset.value)")
    assert val == pytest.approx([e["val_accuracy"] for e in epochs])

    # The verdict as metrics.json and the job's summary have it.
    expect(page.locator("#verdict-message")).to_have_text(metrics["verdict"]["message"])
    assert page.text_content("#verdict-call") == metrics["verdict"]["call"] == job["metrics"]["verdict"]["call"]

    # The table, split by split: every method in metrics.json, every group, each number as metrics.json has it.
    splits = list(metrics["erm"])
    for split in splits:
        page.click(f".tabs button[data-split={split}]")
        expect(page.locator("#comparison")).to_have_attribute("data-split", split)
        cells = page.eval_on_selector_all("#comparison td.num", "cs => cs.map(c => [c.dataset.method, c.dataset.path, c.textContent])")
        assert {method for method, _, _ in cells} == {"erm", "masktune", "erm_last"}
        assert {path for _, path, _ in cells} == {"overall_accuracy", "worst_group_accuracy", "group_mean_accuracy",
                                                  *(f"per_group/{g}/accuracy" for g in metrics["erm"][split]["per_group"])}
        for method, path, text in cells:
            assert text == f"{lookup(metrics, method, split, path):.3f}", (method, split, path)

    # The previews image, fetched with the key, and a download through the page.
    width = page.eval_on_selector("#previews", "img => img.complete ? img.naturalWidth : 0")
    assert width == Image.open(io.BytesIO(previews)).width
    with page.expect_download() as download:
        page.click("[data-artifact='metrics.json']")
    assert Path(download.value.path()).read_bytes() == metrics_bytes
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=shots / "dashboard_job.png")

    page.click("text=Jobs")
    row = page.locator(f"tr[data-job={job_id}]")
    expect(row.locator("[data-status]")).to_have_text("succeeded")
    expect(row.locator(".headline")).to_contain_text(metrics["verdict"]["call"])
    page.screenshot(path=shots / "dashboard_jobs.png")

    page.click("#forget-key")
    expect(page.locator("#key-form")).to_be_visible()
    assert page.evaluate("localStorage.getItem('masktune.apiKey')") is None
    assert page.errors == []
