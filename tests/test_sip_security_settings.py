"""The gateway's SIP security settings: validated at start with a message naming the bad
setting, secrets never shown, defaults as the README says."""

from __future__ import annotations

import pytest

from service.config import ConfigError, describe, load
from service.settings import GatewaySettings
from sip.acl import PRIVATE_NETWORKS


def gateway_settings(**environ: str) -> GatewaySettings:
    return load(GatewaySettings, environ={"MOSHIMOSHI_WORKER_URL": "echo:", **environ})


def test_defaults_let_in_loopback_and_private_ranges_only_with_pike_like_limits():
    settings = gateway_settings()
    guard = settings.sip_guard()
    assert settings.sip_allow == list(PRIVATE_NETWORKS)
    assert all(ip in guard.allow for ip in ("127.0.0.1", "::1", "10.1.2.3", "172.31.0.1", "192.168.1.1", "fd00::1"))
    assert not any(ip in guard.allow for ip in ("203.0.113.7", "8.8.8.8", "2001:db8::1", "172.32.0.1"))
    assert guard.authenticator is None and (guard.rate.limit, guard.rate.window, guard.rate.ban) == (16, 2.0, 300.0)
    assert "friendly-scanner" in guard.scanner_agents
    limits = settings.sip_stream_limits()
    assert (limits.max_connections, limits.max_per_source, limits.first_message_seconds) == (1024, 32, 5.0)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"MOSHIMOSHI_SIP_ALLOW": "203.0.113.0/24,not-an-address"}, "MOSHIMOSHI_SIP_ALLOW: 'not-an-address'"),
        ({"MOSHIMOSHI_SIP_ALLOW": " , "}, "MOSHIMOSHI_SIP_ALLOW is empty"),
        ({"MOSHIMOSHI_SIP_AUTH": "alice"}, "MOSHIMOSHI_SIP_AUTH: entry 1 is not user:password"),
        (
            {"MOSHIMOSHI_SIP_AUTH": "alice:x", "MOSHIMOSHI_SIP_AUTH_ALGORITHMS": "SHA-1"},
            "MOSHIMOSHI_SIP_AUTH_ALGORITHMS",
        ),
        ({"MOSHIMOSHI_SIP_AUTH_FILE": "/nonexistent/users"}, "MOSHIMOSHI_SIP_AUTH_FILE=/nonexistent/users"),
        ({"MOSHIMOSHI_SIP_TCP_MAX_HEADER_BYTES": "100"}, "MOSHIMOSHI_SIP_TCP_MAX_HEADER_BYTES"),
    ],
)
def test_a_bad_setting_stops_the_start_naming_it(environ, message):
    with pytest.raises(ConfigError) as error:
        gateway_settings(**environ)
    assert message in str(error.value)


def test_credentials_from_a_secret_file_and_the_flag_are_merged_and_never_shown(tmp_path):
    users = tmp_path / "users"
    users.write_text("# mounted from a Kubernetes Secret\ntrunk-a:pa:ss-w0rd\ntrunk-b:another\n")
    settings = gateway_settings(MOSHIMOSHI_SIP_AUTH="ops:hunter2", MOSHIMOSHI_SIP_AUTH_FILE=str(users))
    assert settings.sip_credentials() == {"ops": "hunter2", "trunk-a": "pa:ss-w0rd", "trunk-b": "another"}
    assert settings.sip_guard().authenticator.users == 3
    shown = repr(describe(settings)) + repr(settings.sip_guard()) + repr(settings.sip_guard().authenticator)
    assert "hunter2" not in shown and "pa:ss-w0rd" not in shown
    users.write_text("ops:again\n")
    with pytest.raises(ConfigError) as error:
        settings.sip_credentials()
    assert "'ops' is in both" in str(error.value) and "again" not in str(error.value)


def test_the_rate_limit_can_be_switched_off():
    assert gateway_settings(MOSHIMOSHI_SIP_RATE_LIMIT="0").sip_guard().rate is None
