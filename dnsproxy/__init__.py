"""dnsproxy: a plugin-based DNS proxy and forwarder on Trio."""

__version__ = "0.1.0"
