"""What the API needs of the gateway it runs in (the control-plane interface)."""

from __future__ import annotations

CALL_ID_HEADER = "X-Moshimoshi-Call-Id"  # the gateway's call id, in a SIP 200 OK and a WebRTC answer
