"""The error paths of `dnsproxy.service`'s privilege drop and state directory, without
changing this process's user: each is a ConfigError naming file, table and key."""

from __future__ import annotations

import os
import pwd

import pytest

from dnsproxy import service
from dnsproxy.errors import ConfigError

WHERE = "config.toml: server"


def test_an_unknown_user_or_group_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        service.service_user("no-such-user-dnsproxy", "", WHERE)
    assert err.value.lines == [f"{WHERE}: user: no such user 'no-such-user-dnsproxy'"]
    me = pwd.getpwuid(os.getuid())
    with pytest.raises(ConfigError) as err:
        service.service_user(me.pw_name, "no-such-group-dnsproxy", WHERE)
    assert err.value.lines == [f"{WHERE}: group: no such group 'no-such-group-dnsproxy'"]
    assert service.service_user(me.pw_name, "", WHERE) == (me.pw_uid, me.pw_gid)


def test_a_failed_switch_is_a_config_error(monkeypatch):
    monkeypatch.setattr(service.os, "geteuid", lambda: 0)
    monkeypatch.setattr(service.os, "setgroups", lambda groups: None)
    monkeypatch.setattr(service.os, "setgid", lambda gid: None)

    def refused(uid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(service.os, "setuid", refused)
    with pytest.raises(ConfigError) as err:
        service.drop_privileges(65534, 65534, WHERE)
    assert err.value.lines == [
        f"{WHERE}: user: cannot drop privileges: [Errno 1] Operation not permitted"
    ]


def test_a_drop_that_could_be_undone_is_refused(monkeypatch):
    """setuid succeeds, yet setuid(0) would too (a root still effective): never serve."""
    monkeypatch.setattr(service.os, "geteuid", lambda: 0)
    for call in ("setgroups", "setgid", "setuid"):
        monkeypatch.setattr(service.os, call, lambda value: None)
    with pytest.raises(ConfigError) as err:
        service.drop_privileges(65534, 65534, WHERE)
    assert err.value.lines == [
        f"{WHERE}: user: root could be regained after the drop; refusing to run"
    ]


def test_a_state_dir_that_cannot_be_made_or_written_is_a_config_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(service.os, "geteuid", lambda: 0)
    with pytest.raises(ConfigError) as err:
        service.prepare_state_dir(blocker / "state", 1, 1, WHERE)
    assert err.value.lines == [
        f"{WHERE}: state_dir: cannot create {blocker / 'state'}: Not a directory"
    ]
    with pytest.raises(ConfigError) as err:
        service.check_state_dir(blocker, "dnsproxy", WHERE)
    assert err.value.lines == [
        f"{WHERE}: state_dir: {blocker} is not a directory writable by user 'dnsproxy'"
        f" (uid {os.getuid()}): chown it to 'dnsproxy' or set state_dir to one that user owns"
    ]
    service.check_state_dir(tmp_path / "new", "dnsproxy", WHERE)  # made, and writable
    assert (tmp_path / "new").is_dir()
