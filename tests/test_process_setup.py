"""How every moshimoshi process is set up: its event loop, and the banner it prints."""

from __future__ import annotations

import subprocess

import pytest

from service.config import ConfigError
from service.gateway.banner import outbound_address, ready_banner
from service.gateway.main import tls_settings
from service.realtime import event_loop_name, loop_factory, run, running_loop_name
from service.settings import GatewaySettings
from sip.uri import format_host
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
    result = subprocess.run(
        moshimoshi_cmd("gateway", "--worker-url", "echo:"),
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(MOSHIMOSHI_EVENT_LOOP="twisted"),
    )
    assert result.returncode == 2
    assert "MOSHIMOSHI_EVENT_LOOP='twisted'" in result.stderr


@pytest.mark.parametrize(
    "sip_host, http_host, public, call, dashboard, phone",
    [
        (
            "127.0.0.1",
            "127.0.0.1",
            None,
            "sip:agent@127.0.0.1:5092",
            "http://127.0.0.1:8080/dashboard",
            "http://localhost:8080/phone",
        ),
        ("::1", "::1", None, "sip:agent@[::1]:5092", "http://[::1]:8080/dashboard", "http://localhost:8080/phone"),
        (
            "::",
            "127.0.0.1",
            "2001:db8::7",
            "sip:agent@[2001:db8::7]:5092",
            "http://127.0.0.1:8080/dashboard",
            "http://localhost:8080/phone",
        ),
        (
            "10.1.2.3",
            "10.1.2.3",
            None,
            "sip:agent@10.1.2.3:5092",
            "http://10.1.2.3:8080/dashboard",
            "http://10.1.2.3:8080/phone",
        ),
    ],
)
def test_the_ready_banner_shows_addresses_to_dial_and_open(sip_host, http_host, public, call, dashboard, phone):
    text = ready_banner(
        sip_host=sip_host,
        public_host=public,
        sip_port=5092,
        tls_port=None,
        http_host=http_host,
        http_port=8080,
        workers="1 worker (demo)",
    )
    assert text.splitlines()[0] == "moshimoshi ready: 1 worker (demo): calls are answered"
    assert f"  call       {call}\n" in text and f"  dashboard  {dashboard}\n" in text
    assert f"  softphone  {phone}\n" in text


@pytest.mark.parametrize("bind, ipv6", [("0.0.0.0", False), ("::", True)])
def test_a_wildcard_bind_is_shown_as_an_address_of_this_machine(bind, ipv6):
    text = ready_banner(
        sip_host=bind,
        public_host=None,
        sip_port=5092,
        tls_port=5093,
        http_host=bind,
        http_port=8080,
        workers="echo in the gateway",
    )
    assert "0.0.0.0" not in text and "[::]" not in text
    shown = outbound_address(ipv6)
    assert f"sip:agent@{format_host(shown)}:5092" in text and f"sips:agent@{format_host(shown)}:5093" in text
    assert f"http://{format_host(shown)}:8080/dashboard" in text
    assert "http://localhost:8080/phone" in text  # browsers give the microphone to localhost


def test_tls_settings_that_cannot_work_stop_the_gateway_with_the_setting_named(tmp_path):
    ca = TestCa(tmp_path)
    issued, other = ca.issue("gateway"), ca.issue("other")
    with pytest.raises(ConfigError, match="MOSHIMOSHI_SIP_TLS_CERT and MOSHIMOSHI_SIP_TLS_KEY go together"):
        GatewaySettings(worker_url="echo:", sip_tls_cert=str(issued.cert)).validate()
    with pytest.raises(ConfigError, match="MOSHIMOSHI_SIP_TLS_CLIENT_CA needs"):
        GatewaySettings(worker_url="echo:", sip_tls_client_ca=str(ca.path)).validate()
    with pytest.raises(ConfigError, match=r"MOSHIMOSHI_SIP_TLS_KEY=.*other\.key"):
        tls_settings(GatewaySettings(worker_url="echo:", sip_tls_cert=str(issued.cert), sip_tls_key=str(other.key)))
    certificates, verify = tls_settings(
        GatewaySettings(worker_url="echo:", sip_tls_cert=str(issued.cert), sip_tls_key=str(issued.key))
    )
    assert certificates is not None and verify is not None
    assert tls_settings(GatewaySettings(worker_url="echo:")) == (None, None)
