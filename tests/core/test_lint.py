"""Lint warnings: steps that a general forward (or a wider scoped one) always answers first."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dnsproxy import config
from dnsproxy.lint import lint
from dnsproxy.testing import registry


def cfg_of(tmp_path: Path, steps: str) -> config.Config:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(steps))
    return config.parse(path, config.read_toml(path), registry())


FWD = 'plugin = "forward"\nupstreams = ["127.0.0.1:5300"]\n'


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # general forward first: the scoped one is never reached
        (
            f"[[chain]]\n{FWD}\n[[chain]]\n{FWD}zones = ['corp.example.org']\n",
            [
                "config.toml: chain[1] (forward): warning: never reached: config.toml: chain[0]"
                " (forward) answers every query first; move this step above it"
            ],
        ),
        # the right order: no warning
        (f"[[chain]]\n{FWD}zones = ['corp.example.org']\n[[chain]]\n{FWD}", []),
        # a wider zone first shadows a narrower one
        (
            f"[[chain]]\n{FWD}zones = ['example.org']\n[[chain]]\n{FWD}zones = ['corp.example.org']\n",
            [
                "config.toml: chain[1] (forward): warning: never reached: config.toml: chain[0]"
                " (forward) answers zones example.org first; move this step above it"
            ],
        ),
        # sibling zones do not shadow each other
        (f"[[chain]]\n{FWD}zones = ['a.example']\n[[chain]]\n{FWD}zones = ['b.example']\n", []),
        # part of a step's zones shadowed
        (
            f"[[chain]]\n{FWD}zones = ['example.org']\n"
            f"[[chain]]\n{FWD}zones = ['corp.example.org', 'example.net']\n",
            [
                "config.toml: chain[1] (forward): warning: never reached for corp.example.org:"
                " an earlier forward answers those names first; move this step above it"
            ],
        ),
        # client scopes: a forward for one network does not shadow a step for another
        (
            f"[[chain]]\n{FWD}clients = ['10.0.0.0/8']\n[[chain]]\n{FWD}clients = ['192.168.0.0/16']\n",
            [],
        ),
        (
            f"[[chain]]\n{FWD}clients = ['10.0.0.0/8']\n[[chain]]\n{FWD}clients = ['10.1.0.0/16']\n",
            [
                "config.toml: chain[1] (forward): warning: never reached: config.toml: chain[0]"
                " (forward) answers clients 10.0.0.0/8 first; move this step above it"
            ],
        ),
        # a client-scoped forward does not shadow a zone-scoped step for everyone
        (f"[[chain]]\n{FWD}clients = ['10.0.0.0/8']\n[[chain]]\n{FWD}zones = ['x.example']\n", []),
        # non-terminal steps (rewrite passes queries on) shadow nothing
        (
            "[[chain]]\nplugin = 'rewrite'\nrules = [{ from = 'a.example', rcode = 'NXDOMAIN' }]\n"
            f"[[chain]]\n{FWD}",
            [],
        ),
        # anything after a general forward, scoped or not
        (
            f"[[chain]]\n{FWD}\n[[chain]]\nplugin = 'localnames'\n",
            [
                "config.toml: chain[1] (localnames): warning: never reached: config.toml:"
                " chain[0] (forward) answers every query first; move this step above it"
            ],
        ),
    ],
)
def test_unreachable_steps(tmp_path, steps, expected):
    assert lint(cfg_of(tmp_path, steps)) == expected


def test_check_prints_warnings_and_still_succeeds(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        f'[server]\nlisten = ["127.0.0.1:0"]\n[[chain]]\n{FWD}\n[[chain]]\n{FWD}zones = ["corp.example"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "chain[1] (forward): warning: never reached" in done.stdout
    assert "ok (2 steps)" in done.stdout
