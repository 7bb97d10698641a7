// homering's web UI: a chat over the OpenAI API (streamed, POST /v1/chat/completions) and a live view of the
// cluster (GET /v1/cluster, polled every second). The API key is asked for once (when the API answers 401)
// and kept in this browser's localStorage.
"use strict";

const KEY_STORE = "homering.apiKey";
const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
const state = { messages: [], model: null, controller: null, planId: null, agents: null, keyWaiters: [] };

// ------------------------------------------------------------------ the API key and requests

function askForKey() {
  return new Promise((resolve) => {
    state.keyWaiters.push(resolve);
    if (!$("key-dialog").open) $("key-dialog").showModal();
  });
}

$("key-form").addEventListener("submit", () => {
  localStorage.setItem(KEY_STORE, $("key").value.trim());
  $("key").value = "";
  const waiters = state.keyWaiters.splice(0);
  waiters.forEach((w) => w());
});

$("forget-key").addEventListener("click", () => { localStorage.removeItem(KEY_STORE); askForKey(); });

async function api(path, options = {}) {
  for (;;) {
    const key = localStorage.getItem(KEY_STORE);
    const headers = Object.assign({ "Content-Type": "application/json" }, options.headers || {});
    if (key) headers.Authorization = "Bearer " + key;
    const resp = await fetch(path, Object.assign({}, options, { headers }));
    if (resp.status !== 401) return resp;
    await askForKey();
  }
}

async function errorText(resp) {
  try { const body = await resp.json(); return (body.error && body.error.message) || resp.statusText; }
  catch (_) { return resp.status + " " + resp.statusText; }
}

// ------------------------------------------------------------------ the chat

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.innerHTML = role === "user" ? window.renderMarkdown(text) : "";
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function sampling() {
  const out = {};
  for (const f of ["temperature", "top_p", "top_k", "max_tokens", "seed"]) {
    const v = $(f).value.trim();
    if (v !== "") out[f] = Number(v);
  }
  return out;
}

function chatMessages() {
  const system = $("system").value.trim();
  return (system ? [{ role: "system", content: system }] : []).concat(state.messages);
}

async function readStream(resp, onDelta) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    pending += decoder.decode(value, { stream: true });
    const events = pending.split("\n\n");
    pending = events.pop();
    for (const event of events) {
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const c of chunk.choices || []) if (c.delta && c.delta.content) onDelta(c.delta.content);
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant streaming", "");
  let answer = "";
  state.controller = new AbortController();
  setBusy(true);
  try {
    const body = Object.assign({ model: state.model, messages: chatMessages(), stream: true }, sampling());
    const resp = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: state.controller.signal });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readStream(resp, (delta) => {
      answer += delta;
      bubble.innerHTML = window.renderMarkdown(answer);
      bubble.scrollIntoView({ block: "end" });
    });
  } catch (err) {
    if (err.name !== "AbortError") {
      const note = document.createElement("div");
      note.className = "error";
      note.textContent = err.message;
      bubble.appendChild(note);
    } else {
      bubble.insertAdjacentHTML("beforeend", '<div class="muted">(stopped)</div>');
    }
  } finally {
    bubble.classList.remove("streaming");
    state.messages.push({ role: "assistant", content: answer });
    state.controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => { state.messages = []; $("messages").innerHTML = ""; });

// ------------------------------------------------------------------ the cluster view

const MiB = 1 << 20;
const fmt = (x, digits = 1) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

function windowsCell(agent, nLayers) {
  if (!agent.windows.length) return '<span class="muted">none</span>';
  const bars = agent.windows.map((w) => {
    const left = (100 * w.start) / nLayers, width = (100 * (w.end - w.start)) / nLayers;
    return '<span class="seg r' + (w.round % 4) + '" style="left:' + left + "%;width:" + width + '%"></span>';
  }).join("");
  const labels = agent.windows.map((w) => '<span class="window">' + w.start + "–" + w.end + (w.round ? " r" + w.round : "") + "</span>").join(" ");
  return '<div class="layers">' + bars + "</div>" + labels;
}

function computeNote(agent) {
  // the plan's predicted compute per token beside the measured mean time of the windows' forwards, ms
  const windows = (agent.stats && agent.stats.windows) || [];
  const forwards = windows.filter((w) => w.forwards);
  const measured = forwards.length ? forwards.reduce((t, w) => t + w.compute_ms / w.forwards, 0) : null;
  if (!agent.predicted && measured === null) return "";
  return '<div class="muted" title="predicted: compute per token; measured: mean time of a window forward, prefill included">' +
    "compute " + fmt(agent.predicted && agent.predicted.compute_ms, 2) + " ms/token predicted · " +
    fmt(measured, 2) + " ms/forward measured</div>";
}

function agentRow(agent, nLayers) {
  const stats = agent.stats || {};
  const mem = agent.stats ? fmt(stats.rss_bytes / MiB, 0) + " MiB" : "–";
  const ram = agent.profile ? " of " + fmt(agent.profile.ram_gib, 1) + " GiB" : "";
  const link = agent.head ? "head" : agent.link_ms === null ? "–" : fmt(agent.link_ms, 2) + " ms · " + fmt(agent.link_mbps, 0) + " Mbit/s";
  return '<tr data-agent="' + esc(agent.name) + '" class="' + (agent.in_plan ? "" : "idle") + '">' +
    "<td><b>" + esc(agent.name) + "</b>" + (agent.head ? ' <span class="badge">head</span>' : "") +
    '<div class="muted">' + (agent.live === false ? "lost (last " + esc(agent.status) + ")" : esc(agent.status)) +
    " · " + esc(agent.host) + "</div></td>" +
    '<td class="windows">' + windowsCell(agent, nLayers) + "</td>" +
    '<td class="mode">' + esc(agent.mode || "–") + computeNote(agent) + "</td>" +
    "<td>" + mem + '<span class="muted">' + ram + "</span></td>" +
    "<td>" + (agent.stats ? fmt(stats.tokens_per_s, 1) : "–") + "</td>" +
    "<td>" + link + "</td></tr>";
}

function planCard(plan, report) {
  if (!plan) return '<span class="muted">no plan yet (' + esc(report.state) + ")</span>";
  return "<div><b>plan</b> <code id=\"plan-id\">" + esc(plan.plan_id) + "</code> · " + esc(plan.planner) +
    " · k = " + plan.k + " · " + plan.n_layers + " layers · ring " + plan.ring.map(esc).join(" → ") + "</div>" +
    '<div class="metric">predicted <b id="predicted">' + fmt(plan.predicted_ms_per_token, 2) + "</b> ms/token · measured <b id=\"measured\">" +
    fmt(plan.measured_ms_per_token, 2) + "</b> ms/token</div>" +
    (plan.dropped.length ? '<div class="muted">left out: ' + plan.dropped.map(esc).join(", ") + "</div>" : "") +
    '<div class="muted">' + report.requests_in_flight + " request(s) in flight · " + report.queue_depth + " waiting · " + report.n_parallel + " sequences</div>";
}

function noteReplan(report) {
  const plan = report.plan;
  const id = plan ? plan.plan_id : null;
  if (id === state.planId) return;
  const li = document.createElement("li");
  const when = new Date().toLocaleTimeString();
  li.innerHTML = id === null ? when + ": no plan" :
    when + ": plan <code>" + esc(id) + "</code>, " + plan.ring.length + " devices (" + plan.ring.map(esc).join(", ") + ")" +
    (state.planId ? ' <span class="badge">re-planned</span>' : "");
  $("replans").prepend(li);
  if (state.planId) { $("plan").classList.add("flash"); setTimeout(() => $("plan").classList.remove("flash"), 1500); }
  state.planId = id;
}

function showCluster(report) {
  state.model = report.model;
  $("model").textContent = report.model;
  $("state").textContent = report.state;
  $("state").className = "badge " + report.state;
  const nLayers = report.plan ? report.plan.n_layers : 1;
  $("plan").innerHTML = planCard(report.plan, report);
  $("agents").tBodies[0].innerHTML = report.agents.map((a) => agentRow(a, nLayers)).join("");
  noteReplan(report);
}

async function poll() {
  try {
    const resp = await api("/v1/cluster");
    if (resp.ok) showCluster(await resp.json());
    else $("state").textContent = await errorText(resp);
  } catch (err) {
    $("state").textContent = "unreachable";
  }
  setTimeout(poll, POLL_MS);
}

poll();
