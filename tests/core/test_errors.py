"""One exception tree: every exception class dnsproxy and its plugins define is a
DnsProxyError, so ``except DnsProxyError`` tells dnsproxy's failures from bugs."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import dnsproxy.plugins

import dnsproxy
from dnsproxy.errors import DnsProxyError


def modules() -> list[str]:
    names = []
    for package in (dnsproxy, dnsproxy.plugins):
        prefix = package.__name__ + "."
        found = pkgutil.walk_packages(package.__path__, prefix)
        names += [m.name for m in found if not m.name.endswith(".__main__")]  # runs the cli
    return sorted(set(names))


def test_every_exception_class_is_a_dnsproxy_error():
    found = {}
    for name in modules():
        module = importlib.import_module(name)
        for cls_name, cls in vars(module).items():
            if (
                inspect.isclass(cls)
                and issubclass(cls, BaseException)
                and cls.__module__ == module.__name__
            ):
                found[f"{name}.{cls_name}"] = cls
    assert "dnsproxy.errors.StepFailed" in found and "dnsproxy.plugins.hosts.HostsError" in found
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, DnsProxyError))
    assert outside == []
