// moshimoshi operator dashboard: the floor at a glance (calls now, capacity, refusals, workers,
// concurrent calls over the hour), live calls with their quality, pool capacity, the live
// transcript of a call; for an admin token, actions (hang up or transfer a call, drain a worker).
// Plain JS, no dependencies. Every value from the API is put into the page as text
// (textContent), never as HTML: transcripts and caller ids are untrusted.
"use strict";

(() => {
  const TOKEN_KEY = "moshimoshi.apiToken";
  const CALLS_EVERY_MS = 1000;
  const POOL_EVERY_MS = 2000;
  const GLANCE_EVERY_MS = 5000;
  const SPARK_SPAN_S = 3600;
  // good / fair / poor: [fair from, poor from]
  const LIMITS = {loss: [0.01, 0.05], jitter: [20, 50], latency: [30, 60], concealed: [0.01, 0.05]};
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
  let scope = ""; // the token's scope: admin sees the actions
  let lastTarget = ""; // the last transfer target, offered again
  const pending = new Set(); // call ids being hung up, worker ids being drained

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

  // Who called: the caller's number masked but for its last four digits, as the logs show it
  // (asserted identity first, else From); "withheld" when the caller asked for privacy.
  // The number itself never reaches the page. Returns [text, tooltip].
  function callerCell(call) {
    const id = call.caller;
    if (id && id.withheld) return ["withheld", `the caller asked for privacy (Privacy: ${id.privacy.join("; ")})`];
    return [call.caller_masked || "unknown", id ? `from ${id.source}` : ""];
  }

  function routeCell(call) {
    const model = call.model || "";
    if (call.route) return [`${call.route} · ${model || "–"}`, `route ${call.route}, model ${model}`];
    return [model || "–", call.license ? `licence: ${call.license}` : ""];
  }

  // good, fair or poor, by the limits above
  function grade(kind, value) {
    if (value === null || value === undefined) return "";
    const [fair, poor] = LIMITS[kind];
    return value >= poor ? "poor" : value >= fair ? "fair" : "good";
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

  async function api(path, method = "GET", body = undefined) {
    const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      let detail = `${response.status}`;
      try { detail = (await response.json()).detail || detail; } catch (_) { /* keep the status */ }
      throw new AuthFailed(detail);
    }
    if (!response.ok) {
      let detail = `HTTP ${response.status}`;
      try { detail = (await response.json()).detail || detail; } catch (_) { /* keep the status */ }
      throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    }
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

  async function showMain() {
    try {
      scope = (await api("/v1/token")).scope;
    } catch (error) {
      if (error instanceof AuthFailed) return authFailed(error);
      scope = "";
      setStatus(`token: ${error.message}`, true);
    }
    document.body.classList.toggle("admin", scope === "admin");
    $("scope").textContent = scope ? `${scope} token` : "";
    $("scope").hidden = !scope;
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = false;
    startPolling();
    followHash();
  }

  function authFailed(error) {
    sessionStorage.removeItem(TOKEN_KEY);
    token = "";
    scope = "";
    document.body.classList.remove("admin");
    $("scope").hidden = true;
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
    pollers = [poller(refreshCalls, CALLS_EVERY_MS), poller(refreshPool, POOL_EVERY_MS),
               poller(refreshGlance, GLANCE_EVERY_MS)];
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
      $("calls-now").textContent = String(live.length);
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

  async function refreshGlance() {
    try {
      const [refused, history] = await Promise.all([api("/v1/refusals?limit=0"), api("/v1/pool/history")]);
      renderRefused(refused);
      renderSparkline(history);
    } catch (error) {
      if (error instanceof AuthFailed) return authFailed(error);
      $("spark-note").textContent = `(${error.message})`;
    }
  }

  // -- rendering ---------------------------------------------------------------------------

  // a cell; its column's name rides along for the narrow layout (each row a card)
  function cell(row, text, className, title) {
    const td = el("td", text, className);
    if (title) td.title = title;
    td.dataset.label = row.dataset.labels ? row.dataset.labels.split("|")[row.children.length] || "" : "";
    row.appendChild(td);
    return td;
  }

  function labelled(tableId) {
    const row = el("tr");
    row.dataset.labels = [...document.querySelectorAll(`#${tableId} thead th`)].map((th) => th.textContent).join("|");
    return row;
  }

  function transcriptLink(row, callId, answered = true) {
    const td = cell(row, answered ? null : "–", "transcript", answered ? "" : "never answered: no transcript");
    if (!answered) return td;
    const link = el("a", "transcript");
    link.href = `#call=${encodeURIComponent(callId)}`;
    link.addEventListener("click", (event) => event.stopPropagation());
    td.appendChild(link);
    return td;
  }

  function actionButton(td, text, className, onClick) {
    const button = el("button", text, `action ${className}`);
    button.type = "button";
    button.addEventListener("click", (event) => { event.stopPropagation(); onClick(button); });
    td.appendChild(button);
    return button;
  }

  function renderCalls(calls) {
    const body = $("calls").querySelector("tbody");
    const rows = [];
    for (const call of calls) {
      const q = call.quality || {};
      const row = labelled("calls");
      row.dataset.callId = call.id;
      if (call.id === selected) row.classList.add("selected");
      row.addEventListener("click", () => pick(call.id));
      cell(row, call.dialled || "–", "dialled", call.to_uri);
      const [who, whoTitle] = callerCell(call);
      cell(row, who, "caller", whoTitle);
      const [route, routeTitle] = routeCell(call);
      cell(row, route, "route", routeTitle);
      const where = call.worker_id ? `${call.worker_id} / ${call.slot ?? "–"}` : "–";
      cell(row, where, "worker", call.gateway_id ? `gateway ${call.gateway_id}` : "");
      cell(row, clock(call.duration_s), "duration num");
      cell(row, q.codec || call.codec || "–", "codec");
      const [security, securityTitle, encrypted] = securityCell(call);
      const secured = cell(row, security, "security", securityTitle);
      if (encrypted) secured.classList.add("encrypted");
      cell(row, percent(q.loss_fraction), `loss num ${grade("loss", q.loss_fraction)}`);
      cell(row, ms(q.jitter_ms), `jitter num ${grade("jitter", q.jitter_ms)}`);
      const added = q.gateway_latency_ms || {}; // p50 over the call's recent frames
      cell(row, ms(added.p50), `latency num ${grade("latency", added.p50)}`,
           added.p99 != null ? `p99 ${ms(added.p99)}` : "");
      const concealedShare = q.concealed_frames != null && q.packets_received
        ? q.concealed_frames / q.packets_received : null;
      cell(row, q.concealed_frames ?? "–", `concealed num ${grade("concealed", concealedShare)}`,
           concealedShare != null ? `${(concealedShare * 100).toFixed(1)} % of the frames` : "");
      cell(row, call.state, "state");
      transcriptLink(row, call.id);
      const actions = cell(row, null, "actions admin-only");
      if (scope === "admin") {
        const busy = pending.has(call.id);
        if (call.state === "active") {
          actionButton(actions, "Transfer", "transfer", (button) => transferCall(call.id, button)).disabled = busy;
        }
        actionButton(actions, busy ? "…" : "Hang up", "hangup", (button) => hangUpCall(call.id, button)).disabled = busy;
      }
      rows.push(row);
    }
    body.replaceChildren(...rows);
    $("calls-count").textContent = `(${calls.length})`;
    $("no-calls").hidden = calls.length > 0;
  }

  function renderRecent(calls) {
    const rows = calls.map((call) => {
      const row = labelled("recent");
      row.dataset.callId = call.id;
      cell(row, call.dialled || "–", "dialled", call.to_uri);
      const [who, whoTitle] = callerCell(call);
      cell(row, who, "caller", whoTitle);
      cell(row, new Date(call.started_at * 1000).toLocaleTimeString(), "started");
      cell(row, clock(call.duration_s), "duration num");
      cell(row, call.worker_id || "–", "worker");
      cell(row, call.end_reason || "–", "reason");
      transcriptLink(row, call.id, call.answered_at != null);
      row.addEventListener("click", () => pick(call.id));
      return row;
    });
    $("recent").querySelector("tbody").replaceChildren(...rows);
  }

  // -- actions (admin) ---------------------------------------------------------------------

  async function hangUpCall(callId, button) {
    if (!window.confirm(`Hang up call ${callId}? The caller hears the line close.`)) return;
    pending.add(callId);
    button.disabled = true;
    button.textContent = "hanging up…";
    try {
      await api(`/v1/calls/${encodeURIComponent(callId)}/hangup`, "POST");
      $("action-error").textContent = "";
      $("action-note").textContent = `${callId}: hanging up`;
    } catch (error) {
      pending.delete(callId);
      if (error instanceof AuthFailed) return authFailed(error);
      $("action-error").textContent = `hang up ${callId}: ${error.message}`;
    }
  }

  async function transferCall(callId, button) {
    const target = window.prompt(`Transfer call ${callId} to a person at (a sip: URI or a tel: number):`, lastTarget);
    if (!target || !target.trim()) return;
    lastTarget = target.trim();
    pending.add(callId);
    button.disabled = true;
    button.textContent = "transferring…";
    $("action-note").textContent = `transferring ${callId} to ${lastTarget}…`;
    try {
      const outcome = await api(`/v1/calls/${encodeURIComponent(callId)}/transfer`, "POST",
                                {target: lastTarget, mode: "auto"});
      $("action-error").textContent = "";
      $("action-note").textContent = `${callId}: transferred to ${outcome.target} (${outcome.mode})`;
    } catch (error) {
      if (error instanceof AuthFailed) return authFailed(error);
      $("action-note").textContent = "";
      $("action-error").textContent = `transfer ${callId}: ${error.message}`;
    } finally {
      pending.delete(callId);
    }
  }

  async function drainWorker(workerId, button) {
    if (!window.confirm(`Drain worker ${workerId}? It takes no new calls; its calls go on until they end.`)) return;
    pending.add(workerId);
    button.disabled = true;
    button.textContent = "draining…";
    try {
      const result = await api(`/v1/workers/${encodeURIComponent(workerId)}/drain`, "POST");
      $("action-error").textContent = "";
      button.textContent = (result.answer && result.answer.state) || "draining";
    } catch (error) {
      pending.delete(workerId);
      if (error instanceof AuthFailed) return authFailed(error);
      $("action-error").textContent = `drain ${workerId}: ${error.message}`;
    }
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
    const used = pool.slots_total ? Math.min(1, pool.slots_busy / pool.slots_total) : 0;
    for (const id of ["pool-bar-fill", "capacity-fill"]) {
      $(id).style.width = `${Math.round(used * 100)}%`;
      $(id).classList.toggle("full", used >= 0.9);
    }
    // every live model worker's slots: one overloaded or draining is busy, not gone
    const models = workers.filter((w) => w.role !== "asr");
    const slots = models.reduce((sum, w) => sum + w.capacity, 0);
    const busy = models.reduce((sum, w) => sum + w.busy_slots, 0);
    $("capacity").textContent = pool.mode === "loopback" ? "no limit"
      : slots ? `${Math.round(Math.min(1, busy / slots) * 100)} %` : "no worker";
    const closed = models.filter((w) => w.state !== "ready").length;
    $("capacity").title = `${busy} of ${slots} slots busy` +
      (closed ? `; ${closed} worker(s) take no new calls (${pool.slots_free} slots free for new calls)` : "");
    const states = {};
    for (const w of workers.filter((w) => w.role !== "asr")) states[w.state || "down"] = (states[w.state || "down"] || 0) + 1;
    const down = pool.workers.filter((w) => !w.alive && w.role !== "asr").length;
    if (down) states.down = down;
    const order = ["ready", "overloaded", "draining", "down"];
    const shown = order.filter((s) => states[s]).map((s) => `${states[s]} ${s}`);
    $("worker-states").textContent = shown.length ? shown.join(" · ") : "none";
    $("worker-states").classList.add("small");
    const rows = workers.map((w) => {
      const row = labelled("workers");
      row.dataset.workerId = w.worker_id;
      cell(row, w.worker_id, "worker-id", w.url);
      cell(row, w.model || "–", "model", w.license);
      cell(row, w.state || "–", "state");
      cell(row, `${w.busy_slots} / ${w.capacity}`, "busy num", sizingNote(w));
      cell(row, stepText(w), "step num", "step p99 over the last minute / the budget B is sized for");
      const actions = cell(row, null, "actions admin-only");
      if (scope === "admin" && w.role !== "asr" && pool.mode === "pool" && (w.state === "ready" || w.state === "overloaded")) {
        const drain = actionButton(actions, pending.has(w.worker_id) ? "draining…" : "Drain", "drain",
                                   (button) => drainWorker(w.worker_id, button));
        drain.disabled = pending.has(w.worker_id);
      }
      if (w.state === "draining") pending.delete(w.worker_id); // done: a fresh worker of that id may come
      return row;
    });
    $("workers").querySelector("tbody").replaceChildren(...rows);
  }

  function renderRefused(data) {
    $("refused").textContent = String(data.total);
    $("refused").title = data.partial ? "Redis unreachable: this gateway's only" : "every gateway";
    const reasons = Object.entries(data.by_reason).sort((a, b) => b[1] - a[1]).slice(0, 4);
    $("refused-reasons").replaceChildren(...reasons.map(([reason, count]) => {
      const item = el("li", `${reason.replace(/^rejected-/, "")} ${count}`);
      item.dataset.reason = reason;
      return item;
    }));
  }

  function renderSparkline(history) {
    const now = Date.now() / 1000;
    const samples = history.samples.filter((s) => s.t >= now - SPARK_SPAN_S);
    // the last hour; a gateway up for less draws the time it has (at least 5 minutes)
    const span = Math.min(SPARK_SPAN_S, Math.max(300, samples.length ? now - samples[0].t : 0));
    $("spark-span").textContent = span >= SPARK_SPAN_S ? "last hour" : `last ${Math.round(span / 60)} min`;
    const top = Math.max(1, ...samples.map((s) => Math.max(s.calls, s.capacity)));
    const x = (t) => (Math.max(0, t - (now - span)) / span * 360).toFixed(1);
    const y = (v) => (46 - (v / top) * 42).toFixed(1);
    $("spark-calls").setAttribute("points", samples.map((s) => `${x(s.t)},${y(s.calls)}`).join(" "));
    $("spark-capacity").setAttribute("points", samples.map((s) => `${x(s.t)},${y(s.capacity)}`).join(" "));
    const peak = Math.max(0, ...samples.map((s) => s.calls));
    $("spark-note").textContent = samples.length ? `(peak ${peak}, capacity dashed)` : "(no samples yet)";
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

  // #call=<id>: a link to a call's transcript (each row has one)
  function followHash() {
    const match = /^#call=(.+)$/.exec(location.hash);
    if (!match || $("main").hidden) return;
    pick(decodeURIComponent(match[1]));
    $("transcript-panel").scrollIntoView({block: "nearest"});
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
    } else if (p.kind === "caller") {
      // the caller's utterance (from ASR) arrives once it ended: its own line, stamped with its start
      const line = el("p", null, "line caller");
      line.appendChild(el("span", clock(p.t), "time"));
      line.appendChild(el("span", "caller ", "who"));
      line.appendChild(el("span", p.text, "words"));
      box.appendChild(line);
      currentLine = null;
    } else if (p.kind === "note") {
      const line = el("p", null, "line note");
      line.appendChild(el("span", clock(p.t), "time"));
      line.appendChild(el("span", p.text, "note"));
      box.appendChild(line);
      currentLine = null;
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
    window.addEventListener("hashchange", followHash);
    if (token) showMain();
    else showLogin("");
  });
})();
