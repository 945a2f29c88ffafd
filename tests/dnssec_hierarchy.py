"""A signed test hierarchy on loopback: a root, ``test.`` and zones below, signed at test time
with dnssec-keygen/dnssec-signzone (bind9-utils), served by one nsd, resolved by unbound.

Every zone lives in the one nsd, which answers each question from the deepest zone it holds
(DS from the parent side); unbound reaches it through a stub zone per zone (the NS
records name port 53). ``resolver`` does
no validation (``module-config: "iterator"``), so the proxy in front of it validates;
``validator`` is the same unbound validating with the hierarchy's trust anchor, to compare.

The cases, by name:

================================  =========================================================
``www.example.test``              secure (NSEC zone, algorithm 13; the root uses 8)
``tampered.example.test``         bogus, EDE 6: the A record was changed after signing
``a.wild.example.test``           secure wildcard expansion
``www.unsigned.example.test``     insecure: delegation without DS, NSEC proof
``www.nsec3.test``                secure (NSEC3, algorithm 15)
``www.insecure.nsec3.test``       insecure: delegation without DS, NSEC3 proof
``www.optout.test``               secure (NSEC3 with salt and opt-out, algorithm 14)
``www.child.optout.test``         insecure: delegation covered by an opt-out NSEC3
``www.expired.test``              bogus, EDE 7: signatures expired in 2020
``www.nta.test``                  signed like expired.test, for a negative trust anchor
``www.nokey.test``                bogus, EDE 9: the DS names a key the zone does not use
``www.stripped.test``             bogus, EDE 9: a DS, but the zone is served unsigned
``www.nods.test``                 insecure: signed, but no DS in test. (an island)
================================  =========================================================
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import Nsd, free_port, need, terminate, wait_port

SIGNED_PAST = ("-s", "20200101000000", "-e", "20200201000000")

HEAD = """\
$TTL 300
@ IN SOA ns admin 1 3600 600 86400 300
@ IN NS ns
ns IN A 127.0.0.1
"""

LEAVES = {
    "example.test.": HEAD
    + """\
www IN A 192.0.2.1
www IN TXT "secure"
tampered IN A 192.0.2.66
*.wild IN A 192.0.2.77
unsigned IN NS ns.unsigned
ns.unsigned IN A 127.0.0.1
""",
    "unsigned.example.test.": HEAD + "www IN A 192.0.2.2\n",
    "nsec3.test.": HEAD
    + """\
www IN A 192.0.2.3
*.wild IN A 192.0.2.78
insecure IN NS ns.insecure
ns.insecure IN A 127.0.0.1
""",
    "insecure.nsec3.test.": HEAD + "www IN A 192.0.2.4\n",
    "optout.test.": HEAD
    + """\
www IN A 192.0.2.10
child IN NS ns.child
ns.child IN A 127.0.0.1
""",
    "child.optout.test.": HEAD + "www IN A 192.0.2.11\n",
    "expired.test.": HEAD + "www IN A 192.0.2.5\n",
    "nta.test.": HEAD + "www IN A 192.0.2.6\n",
    "nokey.test.": HEAD + "www IN A 192.0.2.7\n",
    "stripped.test.": HEAD + "www IN A 192.0.2.8\n",
    "nods.test.": HEAD + "www IN A 192.0.2.9\n",
}
# How each zone is signed: None for unsigned ones, else (algorithm, signzone options).
SIGNING: dict[str, tuple[str, tuple[str, ...]] | None] = {
    ".": ("RSASHA256", ()),
    "test.": ("ECDSAP256SHA256", ()),
    "example.test.": ("ECDSAP256SHA256", ()),
    "unsigned.example.test.": None,
    "nsec3.test.": ("ED25519", ("-3", "-", "-H", "0")),
    "insecure.nsec3.test.": None,
    "optout.test.": ("ECDSAP384SHA384", ("-3", "AB12", "-A", "-H", "0")),
    "child.optout.test.": None,
    "expired.test.": ("ECDSAP256SHA256", SIGNED_PAST),
    "nta.test.": ("ECDSAP256SHA256", SIGNED_PAST),
    "nokey.test.": ("ECDSAP256SHA256", ()),
    "stripped.test.": None,
    "nods.test.": ("ECDSAP256SHA256", ()),
}
DS_IN_TEST = ("example", "nsec3", "optout", "expired", "nta", "nokey", "stripped")  # nods has none


class Hierarchy:
    """The signed zones in one nsd, a non-validating and a validating unbound before it."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.keys = workdir / "keys"
        self.keys.mkdir(parents=True, exist_ok=True)
        self.anchor = workdir / "root.anchor"
        self.nsd: Nsd | None = None
        self.resolver: Unbound | None = None
        self.validator: Unbound | None = None

    def _keygen(self, zone: str, algorithm: str) -> str:
        out = subprocess.run(
            [
                need("dnssec-keygen"),
                *("-q", "-K", str(self.keys), "-a", algorithm),
                *(("-b", "2048") if algorithm.startswith("RSA") else ()),
                *("-f", "KSK", "-n", "ZONE", zone),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return str(self.keys / out.stdout.strip())

    def _ds(self, key: str) -> str:
        out = subprocess.run(
            [need("dnssec-dsfromkey"), "-2", key], check=True, capture_output=True, text=True
        )
        return out.stdout

    def _sign(self, zone: str, body: str, key: str, extra: tuple[str, ...]) -> str:
        src = self.dir / f"{zone}zone"
        src.write_text(body + Path(key + ".key").read_text())
        signed = self.dir / f"{zone}signed"
        subprocess.run(
            [
                need("dnssec-signzone"),
                "-q",
                "-P",
                "-z",
                *("-d", str(self.dir)),  # its dsset- files, which would land in the cwd
                *extra,
                "-o",
                zone,
                "-f",
                str(signed),
                *(str(src), key),
            ],
            check=True,
            capture_output=True,
        )
        return signed.read_text()

    def build(self) -> dict[str, str]:
        """Sign every zone, children first; the root's DS goes to ``self.anchor``."""
        zones: dict[str, str] = {}
        ds: dict[str, str] = {}
        for zone in (
            "example.test.",
            "nsec3.test.",
            "optout.test.",
            "expired.test.",
            "nta.test.",
            "nods.test.",
        ):
            algorithm, extra = SIGNING[zone]  # type: ignore[misc]
            key = self._keygen(zone, algorithm)
            ds[zone] = self._ds(key)
            zones[zone] = self._sign(zone, LEAVES[zone], key, extra)
        zones["example.test."] = zones["example.test."].replace("192.0.2.66", "192.0.2.67")
        used = self._keygen("nokey.test.", "ECDSAP256SHA256")
        ds["nokey.test."] = self._ds(self._keygen("nokey.test.", "ECDSAP256SHA256"))
        zones["nokey.test."] = self._sign("nokey.test.", LEAVES["nokey.test."], used, ())
        ds["stripped.test."] = self._ds(self._keygen("stripped.test.", "ECDSAP256SHA256"))
        for zone in (
            "unsigned.example.test.",
            "insecure.nsec3.test.",
            "child.optout.test.",
            "stripped.test.",
        ):
            zones[zone] = f"$ORIGIN {zone}\n" + LEAVES[zone]
        delegations = "".join(
            f"{child} IN NS ns.{child}\nns.{child} IN A 127.0.0.1\n"
            for child in (*DS_IN_TEST, "nods")
        )
        test_body = HEAD + delegations + "".join(ds[f"{c}.test."] for c in DS_IN_TEST)
        key = self._keygen("test.", "ECDSAP256SHA256")
        zones["test."] = self._sign("test.", test_body, key, ())
        root_body = (
            "$TTL 300\n. IN SOA ns.test. admin.test. 1 3600 600 86400 300\n. IN NS ns.test.\n"
            "test. IN NS ns.test.\nns.test. IN A 127.0.0.1\n" + self._ds(key)
        )
        key = self._keygen(".", "RSASHA256")
        zones["."] = self._sign(".", root_body, key, ())
        self.anchor.write_text(self._ds(key))
        return zones

    def start(self) -> Hierarchy:
        zones = self.build()
        # nsd names zone files after the zone: the root's file needs a name of its own.
        self.nsd = Nsd(self.dir / "nsd", {z.rstrip(".") or ".": body for z, body in zones.items()})
        self.nsd.start()
        self.resolver = Unbound(self.dir / "resolver", self.nsd, None).start()
        self.validator = Unbound(self.dir / "validator", self.nsd, self.anchor).start()
        return self

    def stop(self) -> None:
        for server in (self.validator, self.resolver):
            if server is not None:
                server.stop()
        if self.nsd is not None:
            self.nsd.stop()


class Unbound:
    """unbound on 127.0.0.1, resolving the hierarchy from a stub for the root; validating
    with ``anchor`` when given, else a plain iterator."""

    def __init__(self, workdir: Path, nsd: Nsd, anchor: Path | None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.nsd = nsd
        self.anchor = anchor
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Unbound:
        modules = '"validator iterator"' if self.anchor else '"iterator"'
        conf = [
            "server:",
            f"  interface: 127.0.0.1@{self.port}",
            "  do-ip6: no",
            '  username: ""',
            '  chroot: ""',
            f'  directory: "{self.dir}"',
            '  pidfile: ""',
            "  use-syslog: no",
            f'  logfile: "{self.dir}/unbound.log"',
            "  verbosity: 1",
            "  num-threads: 1",
            "  do-not-query-localhost: no",
            "  qname-minimisation: no",
            "  harden-referral-path: no",
            "  val-log-level: 2",
            f"  module-config: {modules}",
            '  local-zone: "test." nodefault',  # unbound answers test. itself by default
        ]
        if self.anchor is not None:
            conf += [f'  trust-anchor-file: "{self.anchor}"', '  domain-insecure: "nta.test"']
        conf += ["remote-control:", "  control-enable: no"]
        for zone in self.nsd.zones:  # a stub per zone: the NS records say port 53
            conf += ["stub-zone:", f'  name: "{zone}"', f"  stub-addr: 127.0.0.1@{self.nsd.port}"]
        (self.dir / "unbound.conf").write_text("\n".join(conf) + "\n")
        self.proc = subprocess.Popen(
            [need("unbound"), "-d", "-c", str(self.dir / "unbound.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None
