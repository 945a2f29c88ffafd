"""The packet cache in the real process: every replayed query is logged, a client-scoped
block stays with its client, and SIGUSR1 and SIGHUP forget replies at once."""

from __future__ import annotations

import signal
import sqlite3

KID, PARENT = "127.0.0.2", "127.0.0.3"

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
allow = ["127.0.0.0/8"]
[[chain]]
plugin = "querylog"
database = "queries.sqlite"
flush_interval = "100ms"
[[chain]]
plugin = "blocklist"
lists = ["{lists}"]
clients = ["127.0.0.2/32"]
[[chain]]
plugin = "hosts"
entries = ["192.0.2.9 ads.example", "192.0.2.7 printer.lan"]
"""


def address(msg) -> str:
    return msg.answer[0][0].address


def test_replays_keep_views_are_logged_and_signals_forget_them(make_proxy, tmp_path):
    (tmp_path / "ads.txt").write_text("ads.example\n")
    config = CONFIG.replace("{lists}", str(tmp_path / "ads.txt"))
    proxy = make_proxy(config, wait_for="1/1 lists ready")
    asked = 0
    for _ in range(5):
        assert address(proxy.ask("ads.example", source=KID)) == "0.0.0.0"
        assert address(proxy.ask("ADS.example", source=PARENT)) == "192.0.2.9"
        asked += 2
    proxy.signal(signal.SIGUSR1)
    proxy.wait_log("caches flushed")
    for _ in range(3):
        assert address(proxy.ask("printer.lan")) == "192.0.2.7"
        asked += 1
    proxy.config_path.write_text(proxy.config_path.read_text().replace("192.0.2.7", "192.0.2.8"))
    proxy.signal(signal.SIGHUP)
    proxy.wait_log("reloaded config.toml")
    assert address(proxy.ask("printer.lan")) == "192.0.2.8"
    asked += 1
    assert proxy.stop() == 0
    db = sqlite3.connect(proxy.dir / "queries.sqlite")
    try:
        rows = db.execute("SELECT client, answered_by FROM queries").fetchall()
    finally:
        db.close()
    assert len(rows) == asked
    assert rows.count((KID, "blocklist")) == 5 and rows.count((PARENT, "hosts")) == 5
