"""How every moshimoshi process is set up: its event loop, and the banner it prints."""

from __future__ import annotations

import subprocess

import pytest

from service.config import ConfigError
from service.gateway.main import banner, tls_settings
from service.realtime import event_loop_name, loop_factory, run, running_loop_name
from service.settings import GatewaySettings
from tests.support.certs import TestCa
from tests.support.procs import moshimoshi_cmd, python_env


def test_the_production_event_loop_is_uvloop_unless_asked_otherwise():
    assert event_loop_name({}) == "uvloop"
    assert event_loop_name({"MOSHIMOSHI_EVENT_LOOP": "asyncio"}) == "asyncio"
    with pytest.raises(ConfigError, match="MOSHIMOSHI_EVENT_LOOP"):
        event_loop_name({"MOSHIMOSHI_EVENT_LOOP": "trio"})


@pytest.mark.parametrize("name", ["uvloop", "asyncio"])
def test_run_runs_on_the_named_loop(monkeypatch, name):
    monkeypatch.setenv("MOSHIMOSHI_EVENT_LOOP", name)

    async def kind() -> str:
        return running_loop_name()

    assert run(kind()) == name
    loop = loop_factory(name)()
    try:
        assert loop.run_until_complete(kind()) == name
    finally:
        loop.close()


async def test_the_suite_runs_async_tests_on_the_production_loop():
    assert running_loop_name() == event_loop_name()


@pytest.mark.system
def test_a_bad_event_loop_setting_stops_the_process_with_a_clear_message():
    result = subprocess.run(moshimoshi_cmd("gateway", "--worker-url", "echo:"), capture_output=True, text=True,
                            timeout=60, env=python_env(MOSHIMOSHI_EVENT_LOOP="twisted"))
    assert result.returncode == 2
    assert "MOSHIMOSHI_EVENT_LOOP='twisted'" in result.stderr


@pytest.mark.parametrize("sip_host, http_host, public, expected", [
    ("0.0.0.0", "0.0.0.0", None, "SIP sip:agent@0.0.0.0:5092  dashboard http://localhost:8080/dashboard"),
    ("::", "::", None, "SIP sip:agent@[::]:5092  dashboard http://localhost:8080/dashboard"),
    ("::1", "::1", None, "SIP sip:agent@[::1]:5092  dashboard http://[::1]:8080/dashboard"),
    ("::", "127.0.0.1", "2001:db8::7", "SIP sip:agent@[2001:db8::7]:5092  dashboard http://127.0.0.1:8080/"),
])
def test_the_banner_brackets_ipv6_hosts(sip_host, http_host, public, expected):
    settings = GatewaySettings(sip_host=sip_host, http_host=http_host, public_host=public, worker_url="echo:")
    assert expected in banner(settings, 5092, 8080)


def test_the_banner_names_the_tls_uri_when_tls_is_on():
    settings = GatewaySettings(sip_host="127.0.0.1", http_host="127.0.0.1", worker_url="echo:")
    assert "SIP sip:agent@127.0.0.1:5092  sips:agent@127.0.0.1:5093  dashboard" in banner(settings, 5092, 8080, 5093)
    assert "sips:" not in banner(settings, 5092, 8080)


def test_tls_settings_that_cannot_work_stop_the_gateway_with_the_setting_named(tmp_path):
    ca = TestCa(tmp_path)
    issued, other = ca.issue("gateway"), ca.issue("other")
    with pytest.raises(ConfigError, match="MOSHIMOSHI_SIP_TLS_CERT and MOSHIMOSHI_SIP_TLS_KEY go together"):
        GatewaySettings(worker_url="echo:", sip_tls_cert=str(issued.cert)).validate()
    with pytest.raises(ConfigError, match="MOSHIMOSHI_SIP_TLS_CLIENT_CA needs"):
        GatewaySettings(worker_url="echo:", sip_tls_client_ca=str(ca.path)).validate()
    with pytest.raises(ConfigError, match=r"MOSHIMOSHI_SIP_TLS_KEY=.*other\.key"):
        tls_settings(GatewaySettings(worker_url="echo:", sip_tls_cert=str(issued.cert), sip_tls_key=str(other.key)))
    certificates, verify = tls_settings(GatewaySettings(worker_url="echo:", sip_tls_cert=str(issued.cert),
                                                        sip_tls_key=str(issued.key)))
    assert certificates is not None and verify is not None
    assert tls_settings(GatewaySettings(worker_url="echo:")) == (None, None)
