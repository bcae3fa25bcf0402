"""The operator page in a real headless Chromium against an in-process headend and a fake fleet.

20 gateways (10 sites of 2, on 3 feeders) report flexibility; 5 then go offline. The page, given
the admin token, must show 15 online / 5 offline, highlight the sites with offline gateways and
show their flexibility without the offline gateways' share. A screenshot goes to
$DERGW_ARTIFACTS (CI keeps it) or the test's tmp_path; its path is printed.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

from dergw.v1 import pb, timestamp_from_ns
from tests.headend.fake_gateway import FakeGateway, device
from tests.headend.harness import RunningHeadend
from tests.support import async_wait_until, require_binary, require_module

_FEEDER_OF_SITE = {f"site-{n:02d}": f"fdr-{1 + (n >= 4) + (n >= 7)}" for n in range(10)}
_OFFLINE = ("gw-01-b", "gw-02-b", "gw-07-a", "gw-07-b", "gw-08-a")
_UP_W = 1000.0
_DOWN_W = 2500.0
_EVENT = {"duration_s": 600, "controls": {"max_gen_pct": 50}}
_PAGE_TIMEOUT_S = 15


def _flexibility(wall_ns: int) -> pb.Record:
    return pb.Record(
        flexibility=pb.Flexibility(
            time=timestamp_from_ns(wall_ns),
            up_w=_UP_W,
            down_w=_DOWN_W,
            pv_w=3000.0,
            load_w=800.0,
            battery_w=0.0,
            battery_energy_wh=4000.0,
            battery_capacity_wh=9000.0,
        )
    )


@dataclass(frozen=True)
class _PageView:
    online: str
    offline: str
    sites: dict[str, dict[str, str]]  # site id -> column -> text, plus "class"
    first_site_by_offline: str
    first_site_by_id: str  # after sorting by site, ascending
    intent_rows: list[str]
    token_in_session: bool
    screenshot: Path


def _drive_browser(url: str, token: str, screenshot: Path, chromium: str, driver: str) -> _PageView:
    """Blocking selenium session (run in a thread: the headend serves on the test's loop)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,2000",
    ):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        browser.set_page_load_timeout(_PAGE_TIMEOUT_S)
        browser.get(url)
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.ID, "connect").click()
        wait = WebDriverWait(browser, _PAGE_TIMEOUT_S)
        wait.until(
            expected_conditions.presence_of_element_located(
                (By.CSS_SELECTOR, "body[data-loaded='true'] #sites-table tbody tr")
            )
        )
        sites: dict[str, dict[str, str]] = {}
        for row in browser.find_elements(By.CSS_SELECTOR, "#sites-table tbody tr"):
            site_id = row.get_attribute("data-site") or ""
            columns = {
                cell.get_attribute("data-col") or "": cell.text
                for cell in row.find_elements(By.TAG_NAME, "td")
            }
            columns["class"] = row.get_attribute("class") or ""
            sites[site_id] = columns
        # Sorted by offline gateways, most first (the page's default); a click flips it.
        first = browser.find_element(By.CSS_SELECTOR, "#sites-table tbody tr")
        first_site = first.get_attribute("data-site") or ""
        browser.save_screenshot(str(screenshot))  # as an operator first sees it
        site_header = browser.find_element(By.CSS_SELECTOR, "#sites-table th[data-key='site_id']")
        site_header.click()  # descending by site
        site_header.click()  # ascending
        first_site_by_id = browser.find_element(
            By.CSS_SELECTOR, "#sites-table tbody tr"
        ).get_attribute("data-site")
        intent_rows = [
            row.text for row in browser.find_elements(By.CSS_SELECTOR, "#intents-table tbody tr")
        ]
        view = _PageView(
            online=browser.find_element(By.ID, "gateways-online").text,
            offline=browser.find_element(By.ID, "gateways-offline").text,
            sites=sites,
            first_site_by_offline=first_site,
            first_site_by_id=first_site_by_id or "",
            intent_rows=intent_rows,
            token_in_session=browser.execute_script(
                "return sessionStorage.getItem('dergw-token') !== null"
            ),
            screenshot=screenshot,
        )
        return view
    finally:
        browser.quit()


async def test_operator_page_shows_the_fleet_and_the_flexibility_lost_offline(
    headend: RunningHeadend, tmp_path: Path
) -> None:
    chromium = require_binary("chromium", "the operator page test drives a headless browser")
    driver = require_binary("chromedriver", "selenium drives chromium through chromedriver")
    require_module("selenium", "the operator page test drives chromium with selenium")
    root = f"http://{headend.headend.http_endpoint}"
    async with httpx.AsyncClient(base_url=root, timeout=5.0) as anonymous:
        page = await anonymous.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert (await anonymous.get("/ui")).text == page.text
        policy = page.headers["content-security-policy"]
        assert "script-src 'sha256-" in policy  # the inline script runs by its hash only
        assert "connect-src 'self'" in policy
        assert (await anonymous.get("/api/v1/sites")).status_code == 401  # the data needs one

    fakes: dict[str, FakeGateway] = {}
    for site_id, feeder in _FEEDER_OF_SITE.items():
        for suffix in ("a", "b"):
            gateway_id = f"gw-{site_id[-2:]}-{suffix}"
            fakes[gateway_id] = headend.gateway(
                gateway_id, site_id, [device("pv-1")], feeder=feeder
            )
    await asyncio.gather(*(fake.connect() for fake in fakes.values()))
    now = headend.clock.wall_ns()
    for fake in fakes.values():
        batch = await fake.send_records([_flexibility(now)])
        await fake.wait_ack(batch.last_seq)
    posted = await headend.http.post("/sites/site-00/intents", json={"events": [_EVENT]})
    assert posted.status_code == 201
    for gateway_id in ("gw-00-a", "gw-00-b"):
        await fakes[gateway_id].ack_intent((await fakes[gateway_id].next_intent()).version)
    for gateway_id in _OFFLINE:
        await fakes[gateway_id].close()

    async def offline_seen() -> bool:
        gateways = (await headend.http.get("/gateways")).json()
        return sum(not g["online"] for g in gateways) == len(_OFFLINE)

    await async_wait_until(offline_seen, timeout_s=5.0, what="5 gateways to read as offline")

    artifacts = os.environ.get("DERGW_ARTIFACTS")
    directory = Path(artifacts) if artifacts else tmp_path
    directory.mkdir(parents=True, exist_ok=True)
    token = headend.http.headers["Authorization"].removeprefix("Bearer ")
    view = await asyncio.to_thread(
        _drive_browser,
        root + "/",
        token,
        directory / "operator-page.png",
        chromium,
        driver,
    )
    print(f"operator page screenshot: {view.screenshot}")

    assert (view.online, view.offline) == ("15", "5")
    assert view.token_in_session
    assert set(view.sites) == set(_FEEDER_OF_SITE)
    degraded = {site for site, columns in view.sites.items() if "degraded" in columns["class"]}
    assert degraded == {"site-01", "site-02", "site-07", "site-08"}
    assert view.sites["site-07"]["offline"] == "2"
    assert view.sites["site-07"]["up_w"] == "0"  # both gateways offline: nothing counted
    assert view.sites["site-01"]["up_w"] == f"{_UP_W:,.0f}"  # one of two gateways left
    assert view.sites["site-00"]["up_w"] == f"{2 * _UP_W:,.0f}"
    assert view.sites["site-00"]["down_w"] == f"{2 * _DOWN_W:,.0f}"
    assert view.first_site_by_offline == "site-07"
    assert view.first_site_by_id == "site-00"
    assert len([row for row in view.intent_rows if row.startswith("site-00")]) == 2
    assert view.screenshot.stat().st_size > 0
