"""The fake upstream as a subprocess (how bench/soak.py and other processes use it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query

from tests.conformance.confkit import free_port, wait_until

SCRIPT = Path(__file__).parents[1] / "fakeupstream.py"


def test_subprocess_serves_script_and_records_queries(tmp_path):
    port = free_port()
    script = tmp_path / "rules.json"
    script.write_text(json.dumps([{"match": {"qname": "x.test."}, "rcode": "NXDOMAIN"}]))
    record = tmp_path / "seen.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--port",
            str(port),
            "--script",
            str(script),
            "--record",
            str(record),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"listening on 127.0.0.1:{port}"
        q = dns.message.make_query("X.test", "A", use_edns=0)
        assert dns.query.udp(q, "127.0.0.1", port=port, timeout=3).rcode() == 3
        tcp = dns.query.tcp(
            dns.message.make_query("y.test", "A"), "127.0.0.1", port=port, timeout=3
        )
        assert str(tcp.answer[0][0]) == "192.0.2.1"
        assert wait_until(lambda: record.exists() and len(record.read_text().splitlines()) == 2)
        first, second = (json.loads(line) for line in record.read_text().splitlines())
        assert (first["qname"], first["id"], first["edns"]) == ("X.test.", q.id, 0)
        assert (second["transport"], second["edns"]) == ("tcp", -1)
    finally:
        proc.terminate()
        proc.wait(5)
