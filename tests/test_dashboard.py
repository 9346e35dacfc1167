"""The live dashboard (issue 12, item 2): what it folds from events, who may see it, and a real
headless Chromium watching a round run and then complete.

The browser is Debian's ``chromium`` with ``chromium-driver`` driven by Selenium; nothing is
downloaded (the driver's path is given). Without a browser the test skips on a developer's
machine and fails in CI (``CI=true``), which installs it (``.ci/run``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.error
import urllib.request

import pytest

from common import webserver
from ops.dashboard.app import Credential, build_app
from ops.dashboard.app import serve as serve_dashboard
from ops.dashboard.state import FleetView
from schemas.messages import Event
from tests.services import coordinator, enclave, enrolled, start_rounds
from tests.test_rounds import honest_update, publish

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "operator-s3cret"


def ev(type_: str, **kw) -> Event:
    return Event(type=type_, at=kw.pop("at", 1000.0), device_id=kw.pop("device_id", None),
                 round_id=kw.pop("round_id", None), reason=kw.pop("reason", None), detail=kw)


def test_the_view_folds_fleet_rounds_rejections_enclave_and_dead_letters():
    view = FleetView("ns")
    for e in (ev("device.enrolled", device_id="a", sig_fp="f" * 64), ev("device.enrolled", device_id="b", sig_fp="e"),
              ev("enclave.attested", measurement="m" * 64, kem_fp="k", sig_fp="s", platform_fp="p",
                 platform="simulated"),
              ev("round.opened", round_id=1, deadline=2000.0, min_updates=2, expected=2),
              ev("update.accepted", device_id="a", round_id=1, update_id="u1", at=1001.0),
              ev("update.accepted", device_id="b", round_id=1, update_id="u2", at=1002.0),
              ev("update.rejected.norm_bound", device_id="b", round_id=1, reason="norm_bound", update_id="u2"),
              ev("round.completed", round_id=1, version=1, accepted=1, accuracy=0.8, rejected="norm_bound=1"),
              ev("round.opened", round_id=2, deadline=3000.0, min_updates=2, expected=2),
              ev("round.failed", round_id=2, reason="too_few_updates", received=0),
              ev("device.revoked", device_id="b", reason="operator", sig_fp="e"),
              ev("dead_letter.malformed", reason="malformed", queue="ns.coordinator.requests")):
        view.apply(e)
    snap = view.snapshot()
    assert [(d["device_id"], d["state"], d["last_seen"]) for d in snap["devices"]] == [
        ("a", "active", 1001.0), ("b", "revoked", 1002.0)]
    assert [(r["round_id"], r["status"], r["accepted"], r["rejected"], r["reason"]) for r in snap["rounds"]] == [
        (1, "completed", 1, {"norm_bound": 1}, None), (2, "failed", 0, {}, "too_few_updates")]  # no update refused
    assert snap["accuracy"] == [{"round_id": 1, "accuracy": 0.8}]
    assert snap["rejections"] == {"norm_bound": 1} and snap["dead_letters"] == {"malformed": 1}
    assert snap["enclave"]["measurement"] == "m" * 64 and snap["enclave"]["platform"] == "simulated"
    json.dumps(snap)  # what the page receives
    view.apply(ev("update.accepted", device_id="a", round_id=1, update_id="u3"))  # overtaken by round.completed
    assert view.snapshot()["rounds"][0]["accepted"] == 1


def test_the_fleet_shows_each_devices_reputation_quarantine_and_updates_counted_once():
    view = FleetView("ns")
    for e in (ev("update.accepted", device_id="a", round_id=1, update_id="u1", reputation=1.0, quarantined=False),
              ev("update.accepted", device_id="m", round_id=1, update_id="u2", reputation=1.0, quarantined=False),
              ev("update.rejected.norm_bound", device_id="m", round_id=1, reason="norm_bound", update_id="u2"),
              ev("device.quarantined", device_id="m", round_id=2, reputation=0.49),
              ev("update.accepted", device_id="a", round_id=3, update_id="u3", reputation=1.0, quarantined=False),
              ev("update.accepted", device_id="m", round_id=3, update_id="u4", reputation=0.34, quarantined=True)):
        view.apply(e)
    rows = {d["device_id"]: d for d in view.snapshot()["devices"]}
    assert (rows["a"]["state"], rows["a"]["reputation"], rows["a"]["accepted"], rows["a"]["rejected"]) == \
        ("active", 1.0, 2, 0)
    # m's first update was stored, then refused at the close: once, as rejected
    assert (rows["m"]["state"], rows["m"]["reputation"], rows["m"]["accepted"], rows["m"]["rejected"]) == \
        ("quarantined", 0.34, 1, 1)
    view.apply(ev("update.accepted", device_id="m", round_id=9, update_id="u9", reputation=0.6, quarantined=False))
    assert {d["device_id"]: d["state"] for d in view.snapshot()["devices"]}["m"] == "active"  # recovered


def _get(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, str, dict]:
    req = urllib.request.Request(url, headers=headers or {}, data=data)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=5) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


async def test_the_dashboard_needs_the_operator_token_and_is_read_only():
    view = FleetView("ns")
    server = await webserver.start(build_app(view, asyncio.Event(), Credential(TOKEN)), "127.0.0.1", 0,
                                   "dashboard.port")
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert (await asyncio.to_thread(_get, base + "/api/state"))[0] == 401
        assert (await asyncio.to_thread(_get, base + "/api/state", {"Authorization": "Bearer wrong"}))[0] == 401
        status, body, _ = await asyncio.to_thread(_get, base + "/api/state", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["namespace"] == "ns"
        status, _, headers = await asyncio.to_thread(_get, base + "/")
        assert status == 303 and headers["location"] == "/login"
        status, _, headers = await asyncio.to_thread(_get, base + "/login", None, b"token=wrong")
        assert status == 303 and "refused" in headers["location"] and "set-cookie" not in {k.lower() for k in headers}
        status, _, headers = await asyncio.to_thread(_get, base + "/login", None, f"token={TOKEN}".encode())
        cookie = headers["set-cookie"]
        assert status == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie
        status, page, headers = await asyncio.to_thread(_get, base + "/", {"Cookie": cookie.split(";")[0]})
        assert status == 200 and "accuracy-chart" in page and "default-src 'self'" in headers["content-security-policy"]
        assert "http" not in page.replace("http-equiv", "")  # every asset is local: no CDN
        req = urllib.request.Request(base + "/api/state", method="DELETE",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            await asyncio.to_thread(urllib.request.urlopen, req)
        assert err.value.code == 405
    finally:
        await server.stop()


def _browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = (f"headless Chromium is needed ({CHROMIUM} and {CHROMEDRIVER}): "
                   "apt-get install -y chromium chromium-driver")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _wait_text(driver, css: str, want: str, timeout: float = 60) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def seen(d) -> bool:
        try:
            return any(want in e.text for e in d.find_elements(By.CSS_SELECTOR, css))
        except StaleElementReferenceException:  # the live page re-rendered the row meanwhile
            return False

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.1).until(seen)
    except Exception as exc:
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]
        raise AssertionError(f"{css!r} never showed {want!r}; it shows {shown}") from exc


@pytest.mark.broker
async def test_a_browser_sees_a_running_round_and_then_its_result(settings, broker, tmp_path):
    if shutil.which("chromium") is None and os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed: .ci/run installs it with apt-get")
    driver = await asyncio.to_thread(_browser)
    settings = settings.model_copy(update={"dashboard": settings.dashboard.model_copy(
        update={"token": type(settings.dashboard).model_validate({"token": TOKEN}).token, "port": 0})})
    ns = settings.broker.namespace
    task = None
    try:
        async with coordinator(settings) as coord, enclave(settings) as enc:
            devices = [await enrolled(broker, coord, f"cam-{i}") for i in range(2)]
            ready = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(serve_dashboard(settings, ready=ready))
            port = await asyncio.wait_for(ready, 30)
            base = f"http://127.0.0.1:{port}"

            def log_in() -> None:
                from selenium.webdriver.common.by import By

                driver.get(base + "/")  # redirected to the login form
                driver.find_element(By.ID, "token").send_keys(TOKEN)
                driver.find_element(By.ID, "login").click()
                _wait_text(driver, "#live", "live")
                _wait_text(driver, "#devices tbody", "cam-1")
                _wait_text(driver, "#enclave-measurement", enc.code[:32])
                _wait_text(driver, "#queues tbody", f"{ns}.enclave.updates")

            await asyncio.to_thread(log_in)
            await start_rounds(coord.settings, rounds=1, min_updates=2, deadline_seconds=300,
                               expected=[d.device_id for d in devices], epochs=1, lr=0.1, batch_size=16)
            await asyncio.to_thread(_wait_text, driver, "#round-1 .status", "running")
            await asyncio.to_thread(driver.save_screenshot, str(tmp_path / "running.png"))
            for i, dev in enumerate(devices):
                _, key, body = honest_update(dev, enc, 1, i)
                await publish(broker, key, body)
            # training, the close and its evaluation run on a loaded 2-core machine: wait for them
            await asyncio.to_thread(_wait_text, driver, "#round-1 .status", "completed", 240)

            def result() -> tuple[str, int]:
                from selenium.webdriver.common.by import By

                row = driver.find_element(By.ID, "round-1").text
                dots = driver.find_elements(By.CSS_SELECTOR, "#accuracy-chart circle[data-round='1']")
                return row, len(dots)

            row, dots = await asyncio.to_thread(result)
            assert row.split()[:3] == ["1", "completed", "2"] and dots == 1, row
            await asyncio.to_thread(driver.save_screenshot, str(tmp_path / "completed.png"))
    finally:
        await asyncio.to_thread(driver.quit)
        if task is not None:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
