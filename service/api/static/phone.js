// moshimoshi softphone: one WebRTC call to the gateway (WHIP-style offer/answer).
//
// The offer goes to POST /v1/webrtc/offer as application/sdp with every ICE candidate in it
// (no trickle); the answer comes back with the session's Location, which DELETE hangs up.
// A data channel ("events") brings the call id, the agent's words and the gateway's view of
// the call's quality; getStats() gives the browser's. The API token is asked for once and
// kept in this tab's sessionStorage.
"use strict";

(() => {
  const TOKEN_KEY = "moshimoshi.token";
  const GATHER_MS = 3000;
  const $ = (id) => document.getElementById(id);
  const el = {
    auth: $("auth"), tokenForm: $("token-form"), token: $("token"), authMessage: $("auth-message"),
    mic: $("mic"), call: $("call"), status: $("status"), levelMic: $("level-mic"),
    levelAgent: $("level-agent"), transcript: $("transcript"), remote: $("remote"),
  };

  // Everything a test or a curious person may read from the console.
  const phone = window.moshimoshiPhone = {
    state: "idle", callId: null, session: null, iceServers: [], stats: {}, server: {}, pieces: 0,
    error: null,
  };
  let pc = null;
  let micStream = null;
  let audioContext = null;
  let meterTimer = null;
  let statsTimer = null;
  let lastPieceAt = -1e9;
  let paragraph = null;

  // -- auth ------------------------------------------------------------------------------

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  function authHeaders() {
    const t = token();
    return t ? { Authorization: `Bearer ${t}` } : {};
  }

  async function detail(response) {
    try {
      const body = await response.json();
      return body.detail || JSON.stringify(body);
    } catch (_) {
      return `${response.status} ${response.statusText}`;
    }
  }

  function askForToken(message) {
    el.auth.hidden = false;
    el.authMessage.textContent = message || "";
    el.call.disabled = true;
    setStatus("an API token is needed");
    el.token.focus();
  }

  async function loadConfig() {
    let response;
    try {
      response = await fetch("/v1/webrtc/config", { headers: authHeaders() });
    } catch (err) {
      setStatus(`gateway unreachable: ${err.message}`);
      return false;
    }
    if (response.status === 401 || response.status === 403) {
      askForToken(token() ? await detail(response) : "");
      return false;
    }
    if (!response.ok) {
      setStatus(`configuration failed: ${await detail(response)}`);
      return false;
    }
    const config = await response.json();
    phone.iceServers = config.ice_servers || [];
    el.auth.hidden = true;
    el.call.disabled = false;
    setStatus("ready");
    return true;
  }

  el.tokenForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = el.token.value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    el.token.value = "";
    await loadConfig();
  });

  // -- microphones -----------------------------------------------------------------------

  async function listMicrophones() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
    const chosen = el.mic.value;
    const devices = await navigator.mediaDevices.enumerateDevices();
    const inputs = devices.filter((d) => d.kind === "audioinput");
    el.mic.replaceChildren();
    const fallback = document.createElement("option");
    fallback.value = "";
    fallback.textContent = "default microphone";
    el.mic.append(fallback);
    inputs.forEach((device, index) => {
      if (!device.deviceId || device.deviceId === "default") return;
      const option = document.createElement("option");
      option.value = device.deviceId;
      option.textContent = device.label || `microphone ${index + 1}`;
      el.mic.append(option);
    });
    if ([...el.mic.options].some((o) => o.value === chosen)) el.mic.value = chosen;
  }

  // -- call ------------------------------------------------------------------------------

  function setStatus(text) { el.status.textContent = text; }

  function setState(state) {
    phone.state = state;
    el.call.textContent = state === "idle" ? "Call" : "Hang up";
    el.call.classList.toggle("active", state !== "idle");
    el.mic.disabled = state !== "idle";
  }

  function waitForCandidates(connection) {
    if (connection.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        if (connection.iceGatheringState === "complete") {
          connection.removeEventListener("icegatheringstatechange", done);
          resolve();
        }
      };
      connection.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, GATHER_MS);  // a slow STUN server: go with what we have
    });
  }

  async function startCall() {
    if (!navigator.mediaDevices || !window.RTCPeerConnection) {
      setStatus("this browser cannot place WebRTC calls (a secure origin is needed: https or localhost)");
      return;
    }
    setState("calling");
    phone.error = null;
    clearTranscript();
    try {
      setStatus("opening the microphone…");
      const deviceId = el.mic.value;
      micStream = await navigator.mediaDevices.getUserMedia({
        audio: {
          deviceId: deviceId ? { exact: deviceId } : undefined,
          echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1,
        },
      });
      listMicrophones().catch(() => {});  // labels are readable now
      pc = new RTCPeerConnection({ iceServers: phone.iceServers });
      const connection = pc;
      const [track] = micStream.getAudioTracks();
      connection.addTransceiver(track, { direction: "sendrecv", streams: [micStream] });
      const channel = connection.createDataChannel("events");
      channel.onmessage = (event) => { if (connection === pc) onServerMessage(event.data); };
      connection.ontrack = (event) => playAgent(event.streams[0] || new MediaStream([event.track]));
      connection.onconnectionstatechange = () => {
        if (connection !== pc) return;
        const state = connection.connectionState;
        if (state === "connected") {
          setState("connected");
          setStatus("connected");
        } else if (state === "failed") {
          hangUp("the connection failed");
        }
      };
      setStatus("connecting…");
      await connection.setLocalDescription(await connection.createOffer());
      await waitForCandidates(connection);
      const response = await fetch("/v1/webrtc/offer", {
        method: "POST",
        headers: { "Content-Type": "application/sdp", ...authHeaders() },
        body: connection.localDescription.sdp,
      });
      if (connection !== pc) {  // hung up meanwhile: do not leave the session to time out
        const location = response.headers.get("Location");
        if (response.status === 201 && location) fetch(location, { method: "DELETE", headers: authHeaders() });
        return;
      }
      if (response.status === 401 || response.status === 403) {
        await hangUp(null);
        askForToken(await detail(response));
        return;
      }
      if (response.status !== 201) {
        const retry = response.headers.get("Retry-After");
        throw new Error(await detail(response) + (retry ? ` (try again in ${retry} s)` : ""));
      }
      phone.session = response.headers.get("Location");
      phone.callId = response.headers.get("X-Moshimoshi-Call-Id");
      const answer = await response.text();
      await connection.setRemoteDescription({ type: "answer", sdp: answer });
      startMeters();
      statsTimer = setInterval(updateStats, 1000);
    } catch (err) {
      phone.error = err.message;
      await hangUp(`call failed: ${err.message}`);
    }
  }

  async function hangUp(message) {
    if (phone.state === "idle" && !pc) return;
    const session = phone.session;
    const connection = pc;
    pc = null;
    phone.session = null;
    clearInterval(statsTimer);
    clearInterval(meterTimer);
    if (session) {
      try {
        await fetch(session, { method: "DELETE", headers: authHeaders() });
      } catch (_) { /* the gateway ends the call anyway when the peer goes */ }
    }
    if (connection) connection.close();
    if (micStream) micStream.getTracks().forEach((t) => t.stop());
    micStream = null;
    el.remote.srcObject = null;
    el.levelMic.value = 0;
    el.levelAgent.value = 0;
    setState("idle");
    setStatus(message || "call ended");
  }

  el.call.addEventListener("click", () => {
    if (phone.state === "idle") startCall();
    else hangUp("you hung up");
  });

  window.addEventListener("pagehide", () => {
    if (phone.session) {
      fetch(phone.session, { method: "DELETE", headers: authHeaders(), keepalive: true }).catch(() => {});
    }
  });

  // -- what the gateway says -------------------------------------------------------------

  function clearTranscript() {
    el.transcript.replaceChildren();
    phone.pieces = 0;
    paragraph = null;
    lastPieceAt = -1e9;
  }

  function addPiece(piece) {
    // A pause of more than 1.5 s starts a new paragraph; pieces concatenate otherwise.
    if (!paragraph || piece.t - lastPieceAt > 1.5 || piece.kind !== paragraph.dataset.kind) {
      paragraph = document.createElement("p");
      paragraph.dataset.kind = piece.kind;
      const stamp = document.createElement("span");
      stamp.className = "t";
      stamp.textContent = `${piece.t.toFixed(1)} s${piece.kind === "dtmf" ? " DTMF" : ""}`;
      paragraph.append(stamp);
      el.transcript.append(paragraph);
    }
    paragraph.append(document.createTextNode(piece.text));
    lastPieceAt = piece.t;
    phone.pieces += 1;
    el.transcript.scrollTop = el.transcript.scrollHeight;
  }

  function onServerMessage(data) {
    let message;
    try { message = JSON.parse(data); } catch (_) { return; }
    if (message.type === "transcript") {
      addPiece(message);
    } else if (message.type === "quality") {
      phone.server = message;
    } else if (message.type === "call") {
      phone.callId = message.call_id;
      $("q-call").textContent = `${message.call_id} · ${message.model}`;
    } else if (message.type === "end") {
      hangUp(`the call ended (${message.reason})`);
    }
  }

  // -- audio and levels ------------------------------------------------------------------

  function analyser(stream) {
    audioContext = audioContext || new AudioContext();
    const node = audioContext.createAnalyser();
    node.fftSize = 1024;
    audioContext.createMediaStreamSource(stream).connect(node);
    const buffer = new Float32Array(node.fftSize);
    return () => {
      node.getFloatTimeDomainData(buffer);
      let sum = 0;
      for (const x of buffer) sum += x * x;
      return Math.sqrt(sum / buffer.length);
    };
  }

  let agentLevel = null;
  function playAgent(stream) {
    el.remote.srcObject = stream;  // Chrome feeds WebAudio from a remote stream only while it plays
    el.remote.play().catch(() => {});
    agentLevel = analyser(stream);
  }

  function startMeters() {
    if (audioContext && audioContext.state === "suspended") audioContext.resume();
    const micLevel = micStream ? analyser(micStream) : null;
    meterTimer = setInterval(() => {
      if (micLevel) el.levelMic.value = Math.min(1, micLevel() * 4);
      if (agentLevel) {
        const level = agentLevel();
        el.levelAgent.value = Math.min(1, level * 4);
        phone.stats.agentRms = Math.max(phone.stats.agentRms || 0, level);
      }
    }, 100);
  }

  // -- quality ---------------------------------------------------------------------------

  const ms = (seconds) => (seconds == null ? "–" : `${(seconds * 1000).toFixed(0)} ms`);
  const pct = (fraction) => (fraction == null ? "–" : `${(fraction * 100).toFixed(1)} %`);

  async function updateStats() {
    if (!pc) return;
    const report = await pc.getStats();
    const s = {};
    report.forEach((r) => {
      if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded") {
        s.rtt = r.currentRoundTripTime;
      } else if (r.type === "inbound-rtp" && r.kind === "audio") {
        Object.assign(s, {
          bytesReceived: r.bytesReceived, packetsReceived: r.packetsReceived, packetsLost: r.packetsLost,
          jitterIn: r.jitter, audioLevel: r.audioLevel, concealedSamples: r.concealedSamples,
          totalSamplesReceived: r.totalSamplesReceived,
        });
      } else if (r.type === "remote-inbound-rtp" && r.kind === "audio") {
        if (s.rtt == null && r.roundTripTime != null) s.rtt = r.roundTripTime;
        s.lossOut = r.fractionLost;
      }
    });
    s.agentRms = phone.stats.agentRms || 0;
    phone.stats = s;
    const server = phone.server;
    const lost = s.packetsLost || 0;
    const received = s.packetsReceived || 0;
    $("q-rtt").textContent = ms(s.rtt);
    $("q-loss-in").textContent = received + lost ? pct(lost / (received + lost)) : "–";
    $("q-loss-out").textContent = pct(server.loss_fraction != null ? server.loss_fraction : s.lossOut);
    $("q-jitter-in").textContent = ms(s.jitterIn);
    $("q-jitter-out").textContent = server.jitter_ms != null ? `${server.jitter_ms.toFixed(1)} ms` : "–";
    $("q-buffer").textContent = server.jitter_buffer_ms != null ? `${server.jitter_buffer_ms.toFixed(0)} ms` : "–";
    const concealedYou = s.totalSamplesReceived ? pct((s.concealedSamples || 0) / s.totalSamplesReceived) : "–";
    $("q-concealed").textContent = `${concealedYou} / ${server.concealed_frames != null ? server.concealed_frames + " frames" : "–"}`;
    $("q-bytes").textContent = s.bytesReceived != null ? `${(s.bytesReceived / 1024).toFixed(0)} KiB` : "–";
  }

  // -- start -----------------------------------------------------------------------------

  if (navigator.mediaDevices && navigator.mediaDevices.addEventListener) {
    navigator.mediaDevices.addEventListener("devicechange", () => listMicrophones().catch(() => {}));
  }
  listMicrophones().catch(() => {});
  loadConfig();
})();
