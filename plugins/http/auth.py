"""Access to the dashboard: password hashes, signed session cookies, CSRF tokens, the
failed-login limit. Standard library only (hashlib.scrypt, hmac, secrets).

A password hash is ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>`` (`hash_password`,
printed by ``dnsproxy hash-password``). A session cookie is ``<expiry>.<nonce>.<mac>``
signed with a key made at start-up (so sessions end with the process); its CSRF token is
a MAC of the nonce under the same key, so a page can only send it after reading it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 15, 8, 1  # 32 MiB, ~0.1 s: per login, never per query
SCRYPT_MAXMEM = 64 << 20


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A salted scrypt hash of ``password`` in the ``[http] password_hash`` format."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=1 << SCRYPT_LOG_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=SCRYPT_MAXMEM,
    )
    return f"scrypt${SCRYPT_LOG_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def parse_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    """(log2 n, r, p, salt, digest) of a hash; ValueError naming the expected format."""
    parts = text.split("$")
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError
        log_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise ValueError(
            "expected scrypt$<log2 n>$<r>$<p>$<salt>$<hash> (print one with"
            " `dnsproxy hash-password`)"
        ) from None
    if not (10 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError("scrypt parameters out of range (log2 n 10-20, r 1-32, p 1-16)")
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("salt or hash too short")
    return log_n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time compare). Slow by design."""
    log_n, r, p, salt, digest = parse_hash(stored)
    got = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=1 << log_n,
        r=r,
        p=p,
        maxmem=max(SCRYPT_MAXMEM, 129 * r * (1 << log_n) * 2),
        dklen=len(digest),
    )
    return hmac.compare_digest(got, digest)


class Sessions:
    """Signs and checks session cookies and their CSRF tokens (key per process)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.key = secrets.token_bytes(32)

    def _mac(self, text: str) -> str:
        return _b64(hmac.new(self.key, text.encode(), hashlib.sha256).digest())

    def new(self, now: float | None = None) -> str:
        """A fresh cookie value, valid for ``ttl`` seconds."""
        expiry = int((time.time() if now is None else now) + self.ttl)
        body = f"{expiry}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._mac(body)}"

    def check(self, cookie: str | None, now: float | None = None) -> str | None:
        """The session's nonce when ``cookie`` is genuine and unexpired, else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        expiry, nonce, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac(f"{expiry}.{nonce}")):
            return None
        try:
            if int(expiry) < (time.time() if now is None else now):
                return None
        except ValueError:
            return None
        return nonce

    def csrf(self, nonce: str) -> str:
        """The CSRF token of the session with ``nonce``."""
        return self._mac(f"csrf:{nonce}")

    def csrf_ok(self, nonce: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(nonce), token or "")


class LoginLimiter:
    """At most ``failures`` failed logins per client address per ``window`` seconds.

    Bounded: at most ``max_clients`` addresses are tracked; when full, the oldest entry
    goes (an attacker spraying addresses gains nothing from that on a LAN listener).
    """

    def __init__(self, failures: int, window: float, max_clients: int = 10_000) -> None:
        self.failures = failures
        self.window = window
        self.max_clients = max_clients
        self.seen: dict[str, tuple[float, int]] = {}  # client: (window start, failures)

    def blocked_for(self, client: str, now: float) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        start, count = self.seen.get(client, (now, 0))
        if now - start >= self.window:
            self.seen.pop(client, None)
            return 0.0
        return start + self.window - now if count >= self.failures else 0.0

    def failed(self, client: str, now: float) -> None:
        start, count = self.seen.pop(client, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        if len(self.seen) >= self.max_clients:
            del self.seen[next(iter(self.seen))]
        self.seen[client] = (start, count + 1)

    def succeeded(self, client: str) -> None:
        self.seen.pop(client, None)
