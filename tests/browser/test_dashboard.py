"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against the
real ``dnsproxy run`` process, a fake upstream and dig (issue 15).

Screenshots of every page go to the test's directory, and to ``$DNSPROXY_SCREENSHOTS``
when that is set (``DNSPROXY_SCREENSHOTS=docs pytest tests/browser`` refreshes the
README's pictures).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from dnsproxy.plugins.http.auth import hash_password

from tests.conftest import free_port, need
from tests.fakeupstream import FakeUpstream

PASSWORD = "correct horse battery"
ANSWER = "192.0.2.80"
CONFIG = """\
[server]
listen = ["127.0.0.1:{{port}}"]
state_dir = "state"

[http]
listen = "127.0.0.1:{http}"
password_hash = "{hash}"

[groups]
kids = ["127.0.0.2"]

[[chain]]
plugin = "querylog"
flush_interval = "0.2s"

[[chain]]
plugin = "blocklist"
lists = ["{ads}"]

[[chain]]
plugin = "cache"

[[chain]]
plugin = "forward"
upstreams = ["{upstream}"]
"""


def dig(port: int, name: str, source: str = "127.0.0.1") -> list[str]:
    out = subprocess.run(
        [need("dig"), "@127.0.0.1", "-p", str(port), "-b", source, name, "A", "+short",
         "+tries=1", "+time=3"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    return out.stdout.split()


@pytest.fixture
def chromium() -> str:
    return need("chromium")


@pytest.fixture
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


def shoot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"dashboard-{name}.png"
    page.screenshot(path=str(path))
    target = os.environ.get("DNSPROXY_SCREENSHOTS")
    if target:
        shutil.copy(path, Path(target) / path.name)


def test_dashboard_in_a_browser(make_proxy, browser, tmp_path):
    http_port = free_port()
    ads = tmp_path / "ads.txt"
    ads.write_text("ads.example.test\n")
    with FakeUpstream([{"answer": [f"{{qname}} 300 IN A {ANSWER}"]}]) as upstream:
        text = CONFIG.format(
            http=http_port, hash=hash_password(PASSWORD), upstream=upstream.addr, ads=ads
        )
        proxy = make_proxy(text, wait_for="listening on http")
        run(proxy, http_port, browser, tmp_path)


def run(proxy, http_port: int, browser, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{http_port}"
    ctx = browser.new_context(viewport={"width": 1100, "height": 760})
    page = ctx.new_page()

    # Every page needs the login; a wrong password is refused.
    page.goto(base + "/log")
    assert page.url.startswith(base + "/login")
    shoot(page, tmp_path, "login")
    page.fill("input[name=password]", "wrong password")
    with page.expect_response(lambda r: r.url == base + "/login") as wrong:
        page.click("button:has-text('Log in')")
    assert wrong.value.status == 401
    assert "Wrong password" in page.inner_text("#login-error")
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    page.wait_for_url(base + "/log")
    cookie = next(c for c in ctx.cookies() if c["name"] == "dnsproxy_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # A dig through the proxy shows up in the live log within 2 s, without a reload.
    assert dig(proxy.port, "shop.example.test") == [ANSWER]
    start = time.monotonic()
    row = page.locator("#rows tr", has_text="shop.example.test.")
    row.first.wait_for(timeout=2000)
    assert time.monotonic() - start < 2.0
    assert "forwarded" in row.first.inner_text()

    # Block it: the next dig gets the blocked answer; Allow it: resolved again.
    row.first.locator("button.block").click()
    page.wait_for_load_state("load")
    deadline = time.monotonic() + 5
    while dig(proxy.port, "shop.example.test") != ["0.0.0.0"]:
        assert time.monotonic() < deadline, "Block did not apply"
        time.sleep(0.1)
    blocked = page.locator("#rows tr", has_text="shop.example.test.").filter(has_text="blocked")
    blocked.first.wait_for(timeout=3000)
    shoot(page, tmp_path, "log")
    page.goto(base + "/managed")
    assert "shop.example.test" in page.inner_text("#managed-block")
    shoot(page, tmp_path, "managed")
    page.goto(base + "/log")
    # The form's answer (303 to /log) is a navigation of its own: wait for it, or the next
    # goto races it ("interrupted by another navigation"; the URL is /log before and after).
    with page.expect_navigation():
        page.locator("#rows tr", has_text="shop.example.test.").first.locator(
            "button.allow"
        ).click()
    assert dig(proxy.port, "shop.example.test") == [ANSWER]
    assert dig(proxy.port, "ads.example.test") == ["0.0.0.0"]  # the configured list still blocks

    # The blocked filter shows the blocked rows only (the list's and the managed block).
    page.goto(base + "/log?result=blocked")
    page.locator("#rows tr", has_text="ads.example.test.").first.wait_for(timeout=3000)
    assert page.locator("select[name=result]").input_value() == "blocked"
    results = page.locator("#rows tr span.badge").all_inner_texts()
    assert results and set(results) == {"blocked"}, results
    assert "shop.example.test." in page.inner_text("#rows")  # its managed block
    shoot(page, tmp_path, "log-blocked")

    # A row opens its trace.
    page.locator("#rows tr td.name a").first.click()
    page.wait_for_url(lambda url: "/log/" in url)
    assert "blocklist" in page.inner_text("main")
    shoot(page, tmp_path, "row")

    # A state-changing POST without the CSRF token is refused, with it accepted.
    r = page.request.post(base + "/ui/block", form={"name": "evil.example.test"})
    assert r.status == 403 and "CSRF" in r.text()
    assert dig(proxy.port, "evil.example.test") == [ANSWER]

    # Pause blocking for 5 minutes: the countdown runs.
    page.goto(base + "/blocking")
    page.click("button:has-text('Pause 5 min')")
    page.wait_for_url(base + "/blocking")
    first = page.inner_text("#countdown")
    assert first.startswith(("5:00", "4:5")), first
    page.wait_for_function(
        f"document.getElementById('countdown') && "
        f"document.getElementById('countdown').textContent !== {first!r}",
        timeout=3000,
    )
    assert dig(proxy.port, "ads.example.test") == [ANSWER]  # paused
    shoot(page, tmp_path, "blocking")
    page.click("button:has-text('Resume blocking')")
    page.wait_for_url(base + "/blocking")
    assert page.inner_text("#blocking-state") == "on"
    assert dig(proxy.port, "ads.example.test") == ["0.0.0.0"]

    # Pause one group: its client is unblocked, everyone else stays blocked.
    kids = page.locator("#group-pauses tr", has_text="kids")
    assert kids.locator("td").nth(1).inner_text() == "on"
    kids.locator("button:has-text('Pause 1 hour')").click()
    page.wait_for_url(base + "/blocking")
    assert (
        kids.locator("td")
        .nth(1)
        .inner_text()
        .startswith(("paused for another 60:00", "paused for another 59:"))
    )
    assert page.inner_text("#blocking-state") == "on"
    assert dig(proxy.port, "ads.example.test", source="127.0.0.2") == [ANSWER]
    assert dig(proxy.port, "ads.example.test") == ["0.0.0.0"]
    shoot(page, tmp_path, "blocking-groups")
    kids.locator("button:has-text('Resume')").click()
    page.wait_for_url(base + "/blocking")
    assert kids.locator("td").nth(1).inner_text() == "on"
    assert dig(proxy.port, "ads.example.test", source="127.0.0.2") == ["0.0.0.0"]

    # The overview chart has drawn points.
    page.goto(base + "/")
    page.wait_for_selector("#chart canvas", timeout=5000)
    page.wait_for_function("Number(document.getElementById('chart').dataset.queries) > 0")
    painted = page.evaluate(
        """() => {
        const c = document.querySelector('#chart canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n;
    }"""
    )
    assert painted > 100, painted
    assert "shop.example.test" in page.inner_text("#numbers")
    shoot(page, tmp_path, "overview")
    page.goto(base + "/lists")
    assert "ads.txt" in page.inner_text("main") and "managed-block.txt" in page.inner_text("main")
    shoot(page, tmp_path, "lists")
    page.goto(base + "/cache")
    # Each number sits under its own header: a number column's header is aligned as its
    # cells are (a left-aligned header over right-aligned numbers put each value under
    # the next column's header).
    aligns = page.evaluate(
        """() => [...document.querySelectorAll("table tr")].slice(0, 2).map(
            tr => [...tr.children].map(c => getComputedStyle(c).textAlign))"""
    )
    assert aligns[0] == aligns[1] == ["left", *["right"] * 5], aligns
    shoot(page, tmp_path, "cache")
    phone = browser.new_context(viewport={"width": 390, "height": 760}, is_mobile=True)
    phone.add_cookies(ctx.cookies())
    mobile = phone.new_page()
    mobile.goto(base + "/log")
    shoot(mobile, tmp_path, "phone")
    phone.close()
    ctx.close()
