"""The gateway: answers calls (SIP, WebRTC), runs their media, routes them to worker slots."""
