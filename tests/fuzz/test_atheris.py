"""The atheris harness, time-boxed for the normal suite (DNSPROXY_ATHERIS_SECONDS, 5 s).

Longer runs are on demand: ``python tests/fuzz/fuzz_query.py -max_total_time=600``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dns.message
import pytest

HARNESS = Path(__file__).with_name("fuzz_query.py")
SECONDS = int(os.environ.get("DNSPROXY_ATHERIS_SECONDS", "5"))


def _seeds(corpus: Path) -> None:
    corpus.mkdir()
    for i, (name, rdtype) in enumerate(
        [("www.example.test", "A"), ("alias.example.test", "A"), ("x.example.test", "TXT")]
    ):
        q = dns.message.make_query(name, rdtype, use_edns=0 if i % 2 else False).to_wire()
        for target in range(4):
            (corpus / f"seed{i}-{target}").write_bytes(bytes([target]) + q)


def test_atheris_time_boxed(tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    _seeds(corpus)
    proc = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=1024",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 60,
        cwd=Path(__file__).parents[2],
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"atheris found a crash:\n{tail}"
    assert "Done" in tail or "DONE" in tail, tail
