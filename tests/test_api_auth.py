"""Bearer tokens of the /v1 API: scopes, refusals, configuration errors (real app, real Redis)."""

from __future__ import annotations

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from service.api.auth import ApiTokens, AuthError, Scope
from service.config import ConfigError
from tests.support.api import ADMIN, ADMIN_TOKEN, CALL, READ, READ_TOKEN, api_gateway, auth

ROUTES = [
    ("GET", "/v1/calls"),
    ("GET", "/v1/calls/c-x"),
    ("GET", "/v1/calls/c-x/transcript"),
    ("GET", "/v1/pool"),
    ("POST", "/v1/calls/c-x/hangup"),
    ("POST", "/v1/workers/w-x/drain"),
]
ADMIN_ROUTES = [("POST", "/v1/calls/c-x/hangup"), ("POST", "/v1/workers/w-x/drain")]


def test_tokens_parse_with_scopes():
    tokens = ApiTokens.parse(["reader-token-1234:read", " admin:token:with:colons:admin ", "x:ADMIN"])
    assert tokens.scope_of("reader-token-1234") is Scope.READ
    assert tokens.scope_of("admin:token:with:colons") is Scope.ADMIN
    assert tokens.scope_of("x") is Scope.ADMIN
    assert tokens.scope_of("reader-token-123") is None
    assert tokens.weak_entries() == [3]
    with pytest.raises(AuthError) as refused:
        tokens.check("reader-token-1234", Scope.ADMIN)
    assert refused.value.status == 403


def test_the_call_scope_places_calls_only_and_admin_may_everything():
    tokens = ApiTokens.parse(
        ["phone-token-0001:call", "both-token-00001:read", "both-token-00001:call", "admin-token-0001:admin"]
    )
    assert tokens.check("phone-token-0001", Scope.CALL) is Scope.CALL
    for needed in (Scope.READ, Scope.ADMIN):
        with pytest.raises(AuthError) as refused:
            tokens.check("phone-token-0001", needed)
        assert refused.value.status == 403 and "has the call scope" in refused.value.message
    assert {tokens.check("both-token-00001", s) for s in (Scope.READ, Scope.CALL)} == {Scope.READ, Scope.CALL}
    assert all(tokens.check("admin-token-0001", s) is Scope.ADMIN for s in Scope)


@pytest.mark.parametrize(
    "entries, message",
    [
        (["no-scope-here"], "entry 1: expected token:scope"),
        (["good-token-0001:read", "secret-value:owner"], "entry 2: scope must be one of read, call, recordings, admin"),
        ([":admin"], "entry 1: expected token:scope"),
        (["has space:read"], "entry 1: the token must not contain whitespace"),
    ],
)
def test_bad_token_settings_are_named_without_the_secret(entries, message):
    with pytest.raises(ConfigError) as error:
        ApiTokens.parse(entries)
    assert message in str(error.value)
    assert "secret-value" not in str(error.value) and "no-scope-here" not in str(error.value)


async def test_missing_and_wrong_tokens_get_401_read_on_admin_routes_403(redis_server):
    async with api_gateway(redis_server.url) as api, httpx.AsyncClient(base_url=api.base) as client:
        for method, path in ROUTES:
            missing = await client.request(method, path)
            assert missing.status_code == 401, (method, path)
            assert missing.headers["www-authenticate"] == "Bearer"
            assert "missing bearer token" in missing.json()["detail"]
            wrong = await client.request(method, path, headers=auth("not-a-token-at-all"))
            assert wrong.status_code == 401, (method, path)
            assert wrong.json()["detail"] == "invalid bearer token"
            basic = await client.request(method, path, headers={"Authorization": "Basic dXNlcjpwYXNz"})
            assert basic.status_code == 401, (method, path)
        for method, path in ADMIN_ROUTES:
            refused = await client.request(method, path, headers=READ)
            assert refused.status_code == 403, (method, path)
            assert "needs admin" in refused.json()["detail"]
            # an admin token gets through auth to the route itself (no such call / worker)
            assert (await client.request(method, path, headers=ADMIN)).status_code == 404
        for method, path in ROUTES:
            if (method, path) not in ADMIN_ROUTES:
                assert (await client.request(method, path, headers=READ)).status_code in (200, 404)
        # what needs no token
        for path in ("/healthz", "/metrics", "/dashboard", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path
        # a refusal never echoes the presented token
        wrong = await client.get("/v1/calls", headers=auth("leaky-token-value"))
        assert "leaky-token-value" not in wrong.text


async def test_without_configured_tokens_the_api_is_closed_and_says_how_to_open_it(redis_server):
    async with api_gateway(redis_server.url, api_tokens=[]) as api, httpx.AsyncClient(base_url=api.base) as client:
        for method, path in ROUTES:
            response = await client.request(method, path, headers=READ)
            assert response.status_code == 401
            assert "MOSHIMOSHI_API_TOKENS=<token>:admin" in response.json()["detail"]
        assert (await client.get("/healthz")).status_code == 200


async def test_live_transcript_socket_needs_a_token(redis_server):
    async with api_gateway(redis_server.url) as api:
        call = api.start_call()
        url = f"{api.ws_base}/v1/calls/{call.id}/transcript/live"
        for query, code in (("", 4401), ("?token=wrong-token-value", 4401)):
            async with connect(url + query) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
            assert closed.value.rcvd.code == code
        for token in (READ_TOKEN, ADMIN_TOKEN):  # read scope is enough
            async with connect(f"{url}?token={token}") as ws:
                api.say(call, "はい")
                assert (await ws.recv()).startswith('{"type":"piece"')
        # the Authorization header works too (for clients that can set it)
        async with connect(url, additional_headers=READ) as ws:
            assert '"はい"' in await ws.recv()


WEBRTC_ROUTES = [
    ("POST", "/v1/webrtc/offer"),
    ("DELETE", "/v1/webrtc/sessions/c-0000000000000000"),
    ("GET", "/v1/webrtc/config"),
]


async def test_placing_or_ending_a_webrtc_call_needs_the_call_scope_not_read(redis_server):
    """Before: any token (read too) placed and ended WebRTC calls, and got the TURN credentials."""
    async with api_gateway(redis_server.url) as api, httpx.AsyncClient(base_url=api.base) as client:
        sdp = {"Content-Type": "application/sdp"}
        for method, path in WEBRTC_ROUTES:
            refused = await client.request(method, path, headers={**READ, **sdp}, content=b"v=0\r\n")
            assert refused.status_code == 403, (method, path, refused.text)
            assert "needs call" in refused.json()["detail"]
            for allowed in (CALL, ADMIN):  # past auth, to the route: a bad offer, no such session, the config
                response = await client.request(method, path, headers={**allowed, **sdp}, content=b"v=0\r\n")
                assert response.status_code in (200, 400, 404), (method, path, response.text)
        # a call token places calls, and reads nothing else
        for method, path in ROUTES:
            assert (await client.request(method, path, headers=CALL)).status_code == 403, (method, path)


@pytest.mark.parametrize("since", ["nan", "NaN", "inf", "-inf", "infinity", "1e308", "-1"])
async def test_a_since_that_is_no_time_gets_422_not_500(redis_server, since):
    """Before: ?since=nan answered 500 (and 1e308 overflowed in the Redis query)."""
    async with api_gateway(redis_server.url) as api, httpx.AsyncClient(base_url=api.base) as client:
        response = await client.get("/v1/calls", headers=READ, params={"since": since})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["query", "since"]
        assert (await client.get("/v1/calls", headers=READ, params={"since": "1700000000.5"})).status_code == 200
