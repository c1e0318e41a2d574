// The swarm's web page: a chat whose answers stream in from the OpenAI-compatible API, beside a live map of the
// swarm (GET /v1/swarm, read again every MAP_PERIOD_MS). No external resources: this file, style.css and
// index.html are all the page loads.
"use strict";

const MAP_PERIOD_MS = 1500;
const KEY_STORAGE = "swarm-api-key";

const state = { apiKey: localStorage.getItem(KEY_STORAGE) || "", name: null, chat: true, history: [], controller: null };
const $ = (selector) => document.querySelector(selector);

function headers() {
  const result = { "Content-Type": "application/json" };
  if (state.apiKey) result.Authorization = `Bearer ${state.apiKey}`;
  return result;
}

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  node.textContent = text;
  return node;
}

function shortId(peerId) {
  return peerId.slice(-8);
}

// The map

async function refreshMap() {
  try {
    const reply = await fetch("/v1/swarm", { headers: headers() });
    if (reply.status === 401) {
      $("#key-form").hidden = false;
      throw new Error("this API needs a key: enter it beside the chat");
    }
    if (!reply.ok) throw new Error(await errorMessage(reply));
    renderMap(await reply.json());
    $("#map-error").hidden = true;
  } catch (error) {
    $("#map-error").textContent = `The map could not be read: ${error.message}`;
    $("#map-error").hidden = false;
  }
}

function renderMap(map) {
  state.name = map.name;
  state.chat = map.chat;
  $("#model-name").textContent = `${map.name}: ${map.num_blocks} blocks`;
  $("#map-updated").textContent = `updated ${new Date(map.time * 1000).toLocaleTimeString()}`;

  const coverage = $("#coverage");
  coverage.replaceChildren(...map.coverage.map((count, block) => element("div", {
    class: count === 0 ? "block gap" : "block",
    "data-block": block,
    title: `block ${block}: ${count} online server(s)`,
  }, String(count))));

  const onRoute = new Set(map.route.map((hop) => hop.peer_id));
  $("#servers tbody").replaceChildren(...map.servers.map((server) => {
    const row = element("tr", { "data-peer-id": server.peer_id, class: `state-${server.state}${onRoute.has(server.peer_id) ? " on-route" : ""}` });
    const bar = element("div", { class: "span-bar" });
    const fill = element("span");
    fill.style.left = `${(100 * server.start) / map.num_blocks}%`;
    fill.style.width = `${(100 * (server.end - server.start)) / map.num_blocks}%`;
    bar.append(fill);
    const spanCell = element("td");
    spanCell.append(bar);
    row.append(
      element("td", { class: "peer" }, server.peer_id),
      element("td", { class: "address" }, server.address),
      element("td", {}, `${server.start}:${server.end}`),
      spanCell,
      element("td", { class: "state" }, server.state),
      element("td", { class: "number" }, server.throughput.toFixed(1)),
      element("td", { class: "number" }, server.ping_ms.toFixed(1)),
      element("td", { class: "number" }, server.sessions === null ? "-" : String(server.sessions)),
    );
    return row;
  }));

  const present = new Set(map.servers.map((server) => server.peer_id));
  const route = map.route.map((hop) => element("li", { "data-peer-id": hop.peer_id, class: present.has(hop.peer_id) ? "" : "gone" },
    `blocks ${hop.start}:${hop.end} → ${shortId(hop.peer_id)} (${hop.address})${present.has(hop.peer_id) ? "" : ", gone since"}`));
  if (route.length) $("#route").replaceChildren(...route);
}

async function mapLoop() {
  await refreshMap();
  setTimeout(mapLoop, MAP_PERIOD_MS);
}

// The chat

async function errorMessage(reply) {
  try {
    const body = await reply.json();
    return body.error ? body.error.message : `HTTP ${reply.status}`;
  } catch {
    return `HTTP ${reply.status}`;
  }
}

function addMessage(role, text) {
  const node = element("div", { class: `message ${role}` }, text);
  $("#messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

// The events of a server-sent-events body, as parsed JSON payloads, until [DONE].
async function* events(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text || state.controller) return;
  if (!state.name) await refreshMap();
  $("#prompt").value = "";
  addMessage("user", text);
  const answer = addMessage("assistant streaming", "");
  answer.dataset.pieces = "0";
  const parameters = {
    model: state.name,
    max_tokens: Number($("#max-tokens").value) || 128,
    temperature: Number($("#temperature").value),
    stream: true,
  };
  const messages = [...state.history, { role: "user", content: text }];
  const [path, body] = state.chat
    ? ["/v1/chat/completions", { ...parameters, messages }]
    : ["/v1/completions", { ...parameters, prompt: text }];

  state.controller = new AbortController();
  $("#send").disabled = true;
  $("#stop").disabled = false;
  const started = performance.now();
  let firstPiece = null;
  let finish = null;
  try {
    const reply = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal });
    if (!reply.ok) throw new Error(await errorMessage(reply));
    for await (const payload of events(reply.body)) {
      if (payload.error) throw new Error(payload.error.message);
      const choice = payload.choices[0];
      const piece = state.chat ? choice.delta.content : choice.text;
      if (piece) {
        firstPiece = firstPiece ?? performance.now();
        answer.textContent += piece;
        answer.dataset.pieces = String(Number(answer.dataset.pieces) + 1);
        answer.scrollIntoView({ block: "end" });
      }
      finish = choice.finish_reason ?? finish;
    }
    if (state.chat) state.history = [...messages, { role: "assistant", content: answer.textContent }];
    const seconds = (performance.now() - started) / 1000;
    $("#answer-stats").textContent = `first text after ${((firstPiece ?? performance.now()) - started).toFixed(0)} ms; ` +
      `${answer.dataset.pieces} pieces in ${seconds.toFixed(2)} s; finished: ${finish ?? "stopped"}`;
  } catch (error) {
    if (error.name === "AbortError") {
      $("#answer-stats").textContent = "stopped";
    } else {
      addMessage("error", error.message);
    }
  } finally {
    answer.classList.remove("streaming");
    answer.dataset.done = "true";
    state.controller = null;
    $("#send").disabled = false;
    $("#stop").disabled = true;
    refreshMap();
  }
}

function start() {
  $("#prompt-form").addEventListener("submit", send);
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("#stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("#clear").addEventListener("click", () => {
    state.history = [];
    $("#messages").replaceChildren();
    $("#answer-stats").textContent = "";
  });
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.apiKey = $("#api-key").value;
    localStorage.setItem(KEY_STORAGE, state.apiKey);
    $("#key-form").hidden = true;
    refreshMap();
  });
  mapLoop();
}

start();
