"""HTTP side of the WebRTC ingress: WHIP-style offer/answer, hang-up, and the softphone page.

* ``POST /v1/webrtc/offer`` — body ``application/sdp`` (the offer, all candidates in it);
  ``201`` with the answer (``application/sdp``), ``Location`` of the session, the call id
  in ``X-Moshimoshi-Call-Id`` and the ICE servers as WHIP ``Link`` headers. ``400`` with
  the reason for an unusable offer, ``503`` with ``Retry-After`` when no agent is free.
* ``DELETE /v1/webrtc/sessions/{id}`` — hang up. ``PATCH`` (trickle ICE) is not supported.
* ``GET /v1/webrtc/config`` — the ICE servers for a browser peer.
* ``GET /phone`` — the softphone page (its script and style under ``/phone/``).

Every ``/v1`` route here needs a token of the ``call`` scope (or ``admin``): placing a call
takes a worker slot and talks to the model, which a ``read`` token (an operator's view) may
not do; the ICE configuration holds TURN credentials. A ``call`` token ends only the calls
it placed (an ``admin`` token any). With no tokens configured the API is closed. The page
itself needs no token: it asks for one and keeps it in the tab's sessionStorage.
"""

from __future__ import annotations

import hashlib
import typing as tp
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from service.api.auth import Scope, bearer, require_call
from service.api.control import CALL_ID_HEADER, MAX_OFFER_BYTES, CallControl, ControlError, WebRtcConfig

STATIC = Path(__file__).parent / "static"
PHONE_FILES = {"phone.js": "text/javascript", "phone.css": "text/css"}
SESSION_PATH = "/v1/webrtc/sessions/"


def _link_headers(config: WebRtcConfig) -> list[str]:
    links = []
    for server in config.ice_servers:
        link = f'<{server.urls}>; rel="ice-server"'
        if server.username:
            link += f'; username="{server.username}"; credential="{server.credential}"; credential-type="password"'
        links.append(link)
    return links


def owner_of(credentials: HTTPAuthorizationCredentials | None) -> str:
    """Who placed a call, as kept with it: a fingerprint of the token, never the token."""
    token = credentials.credentials if credentials is not None else ""
    return hashlib.sha256(b"moshimoshi-webrtc-owner:" + token.encode()).hexdigest()[:32]


Credentials = tp.Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def webrtc_router(control: CallControl) -> APIRouter:
    """The WebRTC routes, served by ``control``."""
    auth = Depends(require_call)
    router = APIRouter()

    @router.post("/v1/webrtc/offer", tags=["webrtc"], dependencies=[auth], status_code=201, response_class=Response)
    async def offer(request: Request, credentials: Credentials) -> Response:
        """WHIP-style: an SDP offer in, the SDP answer out (201), the session at ``Location``."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/sdp":
            raise HTTPException(415, "send the offer as Content-Type: application/sdp")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_OFFER_BYTES:
                raise HTTPException(413, f"offer larger than {MAX_OFFER_BYTES} bytes")
        try:
            sdp = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(400, "the offer is not UTF-8 text") from None
        client = request.client
        source = f"{client.host}:{client.port}" if client is not None else "unknown"
        try:
            answer = await control.webrtc_offer(sdp, source, owner=owner_of(credentials))
        except ControlError as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
            return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)
        response = Response(
            answer.sdp,
            status_code=201,
            media_type="application/sdp",
            headers={"Location": SESSION_PATH + answer.session_id, CALL_ID_HEADER: answer.call_id},
        )
        for link in _link_headers(control.webrtc_config()):
            response.headers.append("Link", link)
        return response

    @router.delete(SESSION_PATH + "{session_id}", tags=["webrtc"])
    async def hang_up(
        session_id: str, credentials: Credentials, scope: tp.Annotated[Scope, Depends(require_call)]
    ) -> dict[str, str]:
        """Hang up a WebRTC call: one this token placed (an admin token: any)."""
        owner = None if scope is Scope.ADMIN else owner_of(credentials)
        if not control.webrtc_hang_up(session_id, owner=owner):
            raise HTTPException(404, "no such WebRTC session")
        return {"status": "ending", "call_id": session_id}

    @router.patch(SESSION_PATH + "{session_id}", tags=["webrtc"], dependencies=[auth])
    async def trickle(session_id: str) -> Response:
        """Trickle ICE is not supported: put every candidate in the offer."""
        return JSONResponse(
            {"detail": "trickle ICE is not supported; send all candidates in the offer"},
            status_code=405,
            headers={"Allow": "DELETE"},
        )

    @router.get("/v1/webrtc/config", tags=["webrtc"], dependencies=[auth])
    async def config() -> dict[str, tp.Any]:
        """ICE servers for browser peers (RTCConfiguration.iceServers)."""
        config = control.webrtc_config()
        servers = []
        for server in config.ice_servers:
            entry: dict[str, tp.Any] = {"urls": server.urls}
            if server.username:
                entry.update(username=server.username, credential=server.credential)
            servers.append(entry)
        return {"ice_servers": servers, "connect_seconds": config.connect_seconds}

    @router.get("/phone", tags=["webrtc"], include_in_schema=False)
    async def phone() -> FileResponse:
        return FileResponse(STATIC / "phone.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @router.get("/phone/{name}", include_in_schema=False)
    async def phone_asset(name: str) -> FileResponse:
        if name not in PHONE_FILES:
            raise HTTPException(404, "not found")
        return FileResponse(STATIC / name, media_type=PHONE_FILES[name], headers={"Cache-Control": "no-cache"})

    return router
