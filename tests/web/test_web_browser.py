"""The dashboard in a real browser: Debian's headless Chromium, driven by Selenium through
Debian's chromedriver, against a real sidecar process. Takes the screenshots of docs/:
with ``TM_UPDATE_SCREENSHOTS=1`` it writes them there, otherwise beside the test's files
(so that a test run leaves the checkout as it was)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from taskmanager import BlockingTaskManager

from tests.procs import ROOT, SidecarProcess
from tests.tools import require
from tm_sidecar.ops._embedded import EtcdProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(autouse=True)
def _browser() -> None:
    """Debian's chromium and its chromedriver: skipped without them, failed in CI."""
    require("chromium", "chromedriver", package="chromium chromium-driver")


def _screenshot(driver: Any, name: str, tmp_path: Path) -> None:
    folder = ROOT / "docs" if os.environ.get("TM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    assert driver.save_screenshot(str(folder / name))
    assert (folder / name).stat().st_size > 10_000  # a picture, not an empty page


# A closed network: without these, Chromium stalls on its own refused connections.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)
WAIT_S = 20.0


def dashboard_url(proc: SidecarProcess, timeout_s: float = 30.0) -> str:
    """The URL the sidecar logged once its dashboard listened (bounded poll of its log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.proc is not None
        assert proc.proc.poll() is None, proc.log()[-3000:]
        found = re.search(r'msg="dashboard listening" url=(http://\S+/)', proc.log())
        if found and proc.socket_path.exists():
            return found.group(1)
        time.sleep(0.05)  # a bounded poll of another process's log
    raise AssertionError("the dashboard did not start:\n" + proc.log()[-3000:])


@pytest.fixture
def sidecar(etcd_server: EtcdProcess, namespace: str, tmp_path: Path) -> Iterator[SidecarProcess]:
    proc = SidecarProcess(
        "web-1",
        etcd_server.endpoint,
        namespace,
        tmp_path / "web-1.log",
        handler="tests.proc_handlers:fail_unless_flag",
        extra=("--web", "127.0.0.1:0", "--web-actions"),
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="tm-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_the_dashboard_in_a_browser(
    sidecar: SidecarProcess, browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(browser, WebDriver)
    driver = browser
    url = dashboard_url(sidecar)
    wait = WebDriverWait(driver, WAIT_S)

    def text_of(css: str) -> str:
        return str(driver.find_element(By.CSS_SELECTOR, css).text)

    driver.get(url)
    wait.until(ec.text_to_be_present_in_element((By.ID, "leader"), "web-1"))
    wait.until(ec.text_to_be_present_in_element((By.ID, "live-status"), "live"))

    flag = tmp_path / "healed"
    with BlockingTaskManager(str(sidecar.socket_path)) as tm:
        # A task created through the SDK appears on the open overview, live.
        ok = tm.create({"i": 1, "work_s": 0.01}).commit()
        wait.until(ec.text_to_be_present_in_element((By.ID, "live"), ok.id))
        assert ok.result(timeout=WAIT_S) is not None
        for i in range(6):  # a little more for the chart and the picture
            tm.create({"i": i + 2, "work_s": 0.01}).commit()

        # A failed task: its page shows the traceback.
        bad = tm.create({"fail_unless": str(flag)}).with_retries(1).commit()
        driver.get(f"{url}tasks/{bad.id}")
        wait.until(ec.text_to_be_present_in_element((By.ID, "task-state"), "failed"))
        traceback = text_of("pre.traceback")
        assert "Traceback (most recent call last)" in traceback
        assert f"RuntimeError: the flag file {flag} is not there yet" in traceback
        assert "proc_handlers.py" in traceback
        _screenshot(driver, "dashboard-task.png", tmp_path)

        # Retry, confirmed, and see it complete.
        flag.write_text("ok")
        driver.find_element(By.ID, "retry").click()
        wait.until(ec.element_to_be_clickable((By.ID, "confirm"))).click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "flash"), "sent back to pending"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "task-state"), "completed"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "task-events"), "completed"))
        assert tm.get(bad.id)["state"] == "completed"

        def confirm(flash: str) -> None:
            wait.until(ec.element_to_be_clickable((By.ID, "confirm"))).click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "flash"), flash))

        # Pause the queue from its page: the overview says so; resume it.
        driver.get(f"{url}queues/default")
        driver.find_element(By.ID, "queue-pause").click()
        confirm("Queue default paused.")
        driver.get(url)
        wait.until(ec.text_to_be_present_in_element((By.ID, "queue-default"), "paused"))
        driver.get(f"{url}queues/default")
        driver.find_element(By.ID, "queue-resume").click()
        confirm("Queue default resumed.")
        driver.get(url)
        wait.until(ec.text_to_be_present_in_element((By.ID, "queue-default"), "running"))
        assert tm.queues()["default"]["paused"] is False

        # Run a schedule now: its task completes.
        tm.schedule("browser-tick", {"i": 99, "work_s": 0.01}, every=3600)
        driver.get(f"{url}schedules")
        driver.find_element(By.ID, "run-browser-tick").click()
        confirm("run now: task browser-tick.run.")
        wait.until(ec.text_to_be_present_in_element((By.ID, "task-state"), "completed"))

        # Retry the failed tasks of one error type: they complete, the others stay failed.
        flag2 = tmp_path / "healed-2"
        runtime = [
            tm.create({"fail_unless": str(flag2), "i": i}).with_retries(1).commit()
            for i in range(2)
        ]
        permanent = tm.create({"permanent": True}).commit()
        for task in (*runtime, permanent):
            assert tm.wait(task.id, timeout=WAIT_S)["state"] == "failed"
        driver.get(f"{url}queues/default?state=failed")
        driver.find_element(By.NAME, "error_type").send_keys("RuntimeError")
        driver.find_element(By.ID, "repair-preview").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "preview-count"), "2"))
        flag2.write_text("ok")
        wait.until(ec.element_to_be_clickable((By.ID, "confirm"))).click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "job-state"), "finished"))
        assert text_of("#job-done") == "2"
        for task in runtime:
            assert tm.wait(task.id, timeout=WAIT_S)["state"] == "completed"
        assert tm.get(permanent.id)["state"] == "failed"
        driver.get(f"{url}queues/default?state=completed&window=30m")
        wait.until(ec.text_to_be_present_in_element((By.ID, "queue-stats"), "completed"))
        _screenshot(driver, "dashboard-queue.png", tmp_path)
        tm.schedule(
            "nightly-report", {"report": "daily"}, cron="0 3 * * *", timezone="Europe/Berlin"
        )
        tm.pause_schedule("nightly-report")
        driver.get(f"{url}schedules")
        wait.until(ec.text_to_be_present_in_element((By.ID, "schedules"), "Europe/Berlin"))
        _screenshot(driver, "dashboard-schedules.png", tmp_path)

        tm.set_limits("default", max_running=8)
        driver.get(url)
        wait.until(ec.text_to_be_present_in_element((By.ID, "queue-default"), "0/8 running"))
        completed = 'a[href="/queues/default?state=completed"]'
        # The per-queue counts catch up with the namespace's (a census every 5 s at most).
        wait.until(lambda d: text_of(completed) == text_of("#depth-completed"))
        _screenshot(driver, "dashboard-overview.png", tmp_path)
