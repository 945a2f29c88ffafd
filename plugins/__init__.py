"""The built-in plugins, installed as ``dnsproxy.plugins``.

Each module registers itself through the same hooks a third-party plugin uses; this list
only says which modules the plugin manager registers before entry points and config files.
"""

BUILTIN: tuple[str, ...] = (
    "dnsproxy.plugins.forward",
    "dnsproxy.plugins.hosts",
    "dnsproxy.plugins.zone",
    "dnsproxy.plugins.blocklist",
    "dnsproxy.plugins.rewrite",
    "dnsproxy.plugins.loadbalance",
    "dnsproxy.plugins.localnames",
    "dnsproxy.plugins.guards",
    "dnsproxy.plugins.ratelimit",
    "dnsproxy.plugins.cache",
    "dnsproxy.plugins.dnssec",
    "dnsproxy.plugins.dot",
    "dnsproxy.plugins.doh",
    "dnsproxy.plugins.querylog",
    "dnsproxy.plugins.http",
)
