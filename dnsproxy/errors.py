"""The exceptions dnsproxy raises at its boundaries."""

from __future__ import annotations


class DnsProxyError(Exception):
    """Base of dnsproxy's own exceptions."""


class ConfigError(DnsProxyError):
    """One or more configuration errors, each a line naming file, table and key."""

    def __init__(self, lines: str | list[str]) -> None:
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class UpstreamError(DnsProxyError):
    """An upstream exchange failed (no valid answer, connection or TLS failure)."""
