"""The exceptions dnsproxy raises at its boundaries: one tree under `DnsProxyError`.

Plugins define their own exceptions as subclasses of `DnsProxyError` too, so a caller can
tell dnsproxy's failures from bugs with one ``except DnsProxyError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dnsproxy.chain import Step
    from dnsproxy.wire import Query


class DnsProxyError(Exception):
    """Base of dnsproxy's own exceptions."""


class ConfigError(DnsProxyError):
    """One or more configuration errors, each a line naming file, table and key."""

    def __init__(self, lines: str | list[str]) -> None:
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class UpstreamError(DnsProxyError):
    """An upstream exchange failed (no valid answer, connection or TLS failure)."""


class Drop(DnsProxyError):
    """The message must be dropped silently (too short to answer, or a response)."""


class Reject(DnsProxyError):
    """The message gets an error response: FORMERR, NOTIMP or BADVERS.

    ``query`` is set when the question was readable, so the response can echo it.
    """

    def __init__(self, rcode: int, msg_id: int, flags: int, query: Query | None = None) -> None:
        super().__init__(rcode)
        self.rcode = rcode
        self.msg_id = msg_id
        self.flags = flags
        self.query = query


class StepFailed(DnsProxyError):
    """A step raised; the server answers SERVFAIL and logs the step's name."""

    def __init__(self, step: Step, exc: BaseException) -> None:
        super().__init__(f"{step.setup.where}: {type(exc).__name__}: {exc}")
        self.step = step


class StepTimeout(StepFailed):
    """A step's I/O phase (`Step.resolve` or `Step.begin`) outlived its ``deadline``."""

    def __init__(self, step: Step) -> None:
        exc = TimeoutError(f"no answer within deadline = {step.setup.deadline:g} s")
        super().__init__(step, exc)
