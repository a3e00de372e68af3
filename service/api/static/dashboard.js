// moshimoshi operator dashboard: live calls, pool capacity, the live transcript of a call.
// Plain JS, no dependencies. Every value from the API is put into the page as text
// (textContent), never as HTML: transcripts and caller ids are untrusted.
"use strict";

(() => {
  const TOKEN_KEY = "moshimoshi.apiToken";
  const CALLS_EVERY_MS = 1000;
  const POOL_EVERY_MS = 2000;
  const UTTERANCE_GAP_S = 1.0;
  const RECENT_SHOWN = 10;

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let pollers = [];
  let selected = null; // call id whose transcript is shown
  let following = true; // until the operator picks a call: follow the newest live call
  let selectedEnded = false;
  let socket = null;
  let lastPieceT = null;
  let currentLine = null;

  // -- helpers ---------------------------------------------------------------------------

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function clock(seconds) {
    const s = Math.max(0, Math.floor(seconds || 0));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    const mm = String(m).padStart(2, "0"), ss = String(r).padStart(2, "0");
    return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
  }

  function ms(value) {
    return value === null || value === undefined ? "–" : `${Number(value).toFixed(1)} ms`;
  }

  function percent(fraction) {
    return fraction === null || fraction === undefined ? "–" : `${(Number(fraction) * 100).toFixed(1)} %`;
  }

  function caller(uri) {
    // "sip:alice@10.0.0.1" → "alice@10.0.0.1"; the full URI stays in the tooltip.
    return String(uri || "").replace(/^<|>$/g, "").replace(/^sips?:/, "") || "(unknown)";
  }

  // Who called: the asserted number (P-Asserted-Identity, Remote-Party-ID) when the network
  // gave one, else the From URI; "withheld" when the caller asked for privacy (the API then
  // holds no number at all). Returns [text, tooltip].
  function callerCell(call) {
    const id = call.caller;
    if (id && id.withheld) return ["withheld", `the caller asked for privacy (Privacy: ${id.privacy.join("; ")})`];
    if (id && id.number && id.source !== "from") {
      return [id.number, `${id.name ? id.name + " " : ""}${id.uri || ""} (${id.source})`];
    }
    return [caller(call.from_uri), call.from_uri];
  }

  // How the call is protected: signalling (UDP, TCP, TLS; WebRTC) and media (RTP, SRTP,
  // DTLS-SRTP). Returns [text, tooltip, encrypted end to end at this hop].
  function securityCell(call) {
    const signalling = call.sip_transport || (call.ingress === "webrtc" ? "WebRTC" : "");
    const media = {"SDES-SRTP": "SRTP", "DTLS-SRTP": "DTLS-SRTP", "none": "RTP"}[call.media_encryption] || "";
    if (!signalling && !media) return ["–", "", false];
    const text = [signalling, media].filter(Boolean).join(" / ");
    const encrypted = (call.sip_transport === "TLS" || call.ingress === "webrtc") && media !== "RTP" && media !== "";
    const suite = (call.quality || {}).srtp_suite;
    return [text, `signalling ${signalling || "?"}, media ${call.media_encryption || "?"}${suite ? " (" + suite + ")" : ""}`,
            encrypted];
  }

  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  class AuthFailed extends Error {}

  async function api(path) {
    const response = await fetch(path, {
      headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
      cache: "no-store",
    });
    if (response.status === 401 || response.status === 403) {
      let detail = `${response.status}`;
      try { detail = (await response.json()).detail || detail; } catch (_) { /* keep the status */ }
      throw new AuthFailed(detail);
    }
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  // -- sign in / out -----------------------------------------------------------------------

  function showLogin(message) {
    stopPolling();
    closeTranscript();
    $("main").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  function showMain() {
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = false;
    startPolling();
  }

  function authFailed(error) {
    sessionStorage.removeItem(TOKEN_KEY);
    token = "";
    showLogin(`Refused: ${error.message}`);
  }

  // -- polling -----------------------------------------------------------------------------

  // Each poller waits for its answer before scheduling the next one (no pile-up when slow).
  function poller(fn, every) {
    let stopped = false;
    let timer = null;
    const tick = async () => {
      await fn();
      if (!stopped) timer = setTimeout(tick, every);
    };
    tick();
    return () => { stopped = true; clearTimeout(timer); };
  }

  function startPolling() {
    stopPolling();
    pollers = [poller(refreshCalls, CALLS_EVERY_MS), poller(refreshPool, POOL_EVERY_MS)];
  }

  function stopPolling() {
    for (const stop of pollers) stop();
    pollers = [];
  }

  async function refreshCalls() {
    try {
      const data = await api("/v1/calls?limit=100");
      const live = data.calls.filter((c) => c.state !== "ended");
      const ended = data.calls.filter((c) => c.state === "ended").slice(0, RECENT_SHOWN);
      renderCalls(live);
      renderRecent(ended);
      const partial = data.partial ? " (Redis unreachable: this gateway only)" : "";
      setStatus(`updated ${new Date().toLocaleTimeString()}${partial}`, Boolean(data.partial));
      if (following && live.length && (!selected || selectedEnded) && live[0].id !== selected) {
        selectCall(live[0].id);
      }
    } catch (error) {
      if (error instanceof AuthFailed) return authFailed(error);
      setStatus(`calls: ${error.message}`, true);
    }
  }

  async function refreshPool() {
    try {
      renderPool(await api("/v1/pool"));
    } catch (error) {
      if (error instanceof AuthFailed) return authFailed(error);
      $("pool-summary").textContent = `pool: ${error.message}`;
    }
  }

  // -- rendering ---------------------------------------------------------------------------

  function cell(row, text, className, title) {
    const td = el("td", text, className);
    if (title) td.title = title;
    row.appendChild(td);
    return td;
  }

  function renderCalls(calls) {
    const body = $("calls").querySelector("tbody");
    const rows = [];
    for (const call of calls) {
      const q = call.quality || {};
      const row = el("tr");
      row.dataset.callId = call.id;
      if (call.id === selected) row.classList.add("selected");
      row.addEventListener("click", () => pick(call.id));
      const [who, whoTitle] = callerCell(call);
      cell(row, who, "caller", whoTitle);
      cell(row, call.dialled || "–", "dialled", call.to_uri);
      cell(row, clock(call.duration_s), "duration num");
      const where = call.worker_id ? `${call.worker_id} / ${call.slot ?? "–"}` : "–";
      cell(row, where, "worker", call.gateway_id ? `gateway ${call.gateway_id}` : "");
      cell(row, q.codec || call.codec || "–", "codec");
      const [security, securityTitle, encrypted] = securityCell(call);
      const secured = cell(row, security, "security", securityTitle);
      if (encrypted) secured.classList.add("encrypted");
      cell(row, ms(q.jitter_ms), "jitter num");
      const loss = cell(row, percent(q.loss_fraction), "loss num");
      if ((q.loss_fraction || 0) >= 0.05) loss.classList.add("bad");
      else if ((q.loss_fraction || 0) >= 0.01) loss.classList.add("warn");
      cell(row, q.concealed_frames ?? "–", "concealed num");
      const added = q.gateway_latency_ms || {}; // p50 over the call's recent frames
      const latency = cell(row, ms(added.p50), "latency num", added.p99 != null ? `p99 ${ms(added.p99)}` : "");
      if ((added.p50 || 0) > 30) latency.classList.add("warn");
      cell(row, call.state, "state");
      rows.push(row);
    }
    body.replaceChildren(...rows);
    $("calls-count").textContent = `(${calls.length})`;
    $("no-calls").hidden = calls.length > 0;
  }

  function renderRecent(calls) {
    const rows = calls.map((call) => {
      const row = el("tr");
      row.dataset.callId = call.id;
      const [who, whoTitle] = callerCell(call);
      cell(row, who, "caller", whoTitle);
      cell(row, call.dialled || "–", "dialled", call.to_uri);
      cell(row, new Date(call.started_at * 1000).toLocaleTimeString(), "started");
      cell(row, clock(call.duration_s), "duration num");
      cell(row, call.worker_id || "–", "worker");
      cell(row, call.end_reason || "–", "reason");
      row.addEventListener("click", () => pick(call.id));
      return row;
    });
    $("recent").querySelector("tbody").replaceChildren(...rows);
  }

  function sizingNote(w) {
    if (!w.slots_reason) return "";
    const warm = w.warmup_p99_ms != null ? `; warm-up step p50 ${w.warmup_p50_ms} ms, p99 ${w.warmup_p99_ms} ms` : "";
    const memory = w.memory_slots != null ? `; memory allows ${w.memory_slots}` : "";
    return `B = ${w.capacity} (${w.slots_reason})${memory}${warm}`;
  }

  function stepText(w) {
    if (w.step_budget_ms == null) return "–";
    const p99 = w.step_p99_ms != null ? `${Math.round(w.step_p99_ms)}` : "–";
    return `${p99} / ${Math.round(w.step_budget_ms)} ms`;
  }

  function renderPool(pool) {
    const workers = pool.workers.filter((w) => w.alive);
    const noun = pool.workers_ready === 1 ? "worker" : "workers";
    $("pool-summary").textContent =
      `${pool.workers_ready} ${noun} ready · ${pool.slots_busy}/${pool.slots_total} slots busy · ` +
      `${pool.slots_free} free`;
    const fill = $("pool-bar-fill");
    const used = pool.slots_total ? Math.min(1, pool.slots_busy / pool.slots_total) : 0;
    fill.style.width = `${Math.round(used * 100)}%`;
    fill.classList.toggle("full", used >= 0.9);
    const rows = workers.map((w) => {
      const row = el("tr");
      row.dataset.workerId = w.worker_id;
      cell(row, w.worker_id, "worker-id", w.url);
      cell(row, w.model || "–", "model", w.license);
      cell(row, w.state || "–", "state");
      cell(row, w.busy_slots, "busy num");
      cell(row, w.capacity, "capacity num", sizingNote(w));
      cell(row, stepText(w), "step num", "step p99 over the last minute / the budget B is sized for");
      return row;
    });
    $("workers").querySelector("tbody").replaceChildren(...rows);
  }

  // -- live transcript ---------------------------------------------------------------------

  function closeTranscript() {
    if (socket) {
      socket.onclose = null;
      socket.close();
      socket = null;
    }
  }

  function pick(callId) {
    following = false;
    selectCall(callId);
  }

  function selectCall(callId) {
    if (callId === selected && socket) return;
    closeTranscript();
    selected = callId;
    selectedEnded = false;
    lastPieceT = null;
    currentLine = null;
    for (const row of document.querySelectorAll("#calls tbody tr")) {
      row.classList.toggle("selected", row.dataset.callId === callId);
    }
    $("transcript").replaceChildren();
    $("transcript-call").textContent = callId;
    $("transcript-status").textContent = "connecting…";
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/v1/calls/${encodeURIComponent(callId)}/transcript/live` +
      `?token=${encodeURIComponent(token)}`;
    const ws = new WebSocket(url);
    socket = ws;
    ws.onopen = () => { $("transcript-status").textContent = "live"; };
    ws.onmessage = (message) => {
      let data;
      try { data = JSON.parse(message.data); } catch (_) { return; }
      if (data.type === "piece") addPiece(data);
      else if (data.type === "end") endTranscript(data.reason);
    };
    ws.onclose = (event) => {
      if (socket !== ws) return;
      socket = null;
      if (event.code === 4401 || event.code === 4403) return authFailed(new Error(event.reason));
      if (event.code !== 1000) {
        $("transcript-status").textContent = `transcript closed (${event.code} ${event.reason || ""})`;
      }
    };
  }

  function addPiece(p) {
    const box = $("transcript");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 30;
    if (p.kind === "agent") {
      if (!currentLine || (lastPieceT !== null && p.t - lastPieceT > UTTERANCE_GAP_S)) {
        currentLine = el("p", null, "line agent");
        currentLine.appendChild(el("span", clock(p.t), "time"));
        currentLine.appendChild(el("span", "", "words"));
        box.appendChild(currentLine);
      }
      currentLine.lastChild.textContent += p.text;
      lastPieceT = p.t;
    } else {
      const line = el("p", null, `line ${p.kind}`);
      line.appendChild(el("span", clock(p.t), "time"));
      line.appendChild(el("span", `${String(p.kind).toUpperCase()} ${p.text}`, "dtmf"));
      box.appendChild(line);
      currentLine = null;
    }
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  function endTranscript(reason) {
    selectedEnded = true;
    $("transcript-status").textContent = `call ended (${reason})`;
    $("transcript").appendChild(el("p", `— call ended: ${reason} —`, "line end"));
    currentLine = null;
  }

  // -- start -------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      token = $("token").value.trim();
      $("token").value = "";
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      showMain();
    });
    $("logout").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      token = "";
      selected = null;
      following = true;
      showLogin("");
    });
    if (token) showMain();
    else showLogin("");
  });
})();
