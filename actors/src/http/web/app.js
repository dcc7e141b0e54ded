// modelpool's chat page: conversations with memory over /chat (streamed),
// the conversation list, and a live view of the pool. Text from users and
// the model is only ever put into the page as text nodes, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { conversation: null, controller: null, nextBefore: null, lastTokens: null, lastAt: null, lastSend: null };

// ---- API access (with an optional key kept in session storage) ----------

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem("modelpool-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// Asks for the key once, however many requests were refused meanwhile.
let keyAsked = null;
function askKey() {
  if (!keyAsked) {
    keyAsked = new Promise((resolve) => {
      $("key-form").onsubmit = () => {
        sessionStorage.setItem("modelpool-key", $("key-input").value.trim());
        keyAsked = null;
        resolve();
      };
      $("key-dialog").showModal();
    });
  }
  return keyAsked;
}

// fetch with the key; a 401 asks for the key once and retries.
async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  let res = await fetch(path, opts);
  if (res.status === 401) {
    await askKey();
    opts.headers = headers(options && options.headers);
    res = await fetch(path, opts);
  }
  return res;
}

// The server's error as one line, with Retry-After when it says so.
async function errorText(res) {
  let message = "HTTP " + res.status;
  try {
    const body = await res.json();
    if (body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  const retry = res.headers.get("Retry-After");
  return retry ? message + " (retry after " + retry + " s)" : message;
}

function notice(text, retry) {
  const n = $("notice");
  n.replaceChildren(document.createTextNode(text));
  if (retry) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = "Retry";
    b.onclick = () => { n.hidden = true; retry(); };
    n.appendChild(b);
  }
  n.hidden = false;
}

// ---- Safe Markdown: code fences, inline code, bold, italics, lists --------

function inline(text, parent) {
  const re = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    const t = m[0];
    const el = document.createElement(t.startsWith("`") ? "code" : t.startsWith("**") ? "strong" : "em");
    el.textContent = t.startsWith("**") ? t.slice(2, -2) : t.slice(1, -1);
    parent.appendChild(el);
    last = m.index + t.length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

function markdown(text, into) {
  into.replaceChildren();
  const parts = text.split(/^```[^\n]*\n?/m);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = part.replace(/\n$/, "");
      pre.appendChild(code);
      into.appendChild(pre);
      return;
    }
    let list = null;
    for (const block of part.split(/\n{2,}/)) {
      if (!block.trim()) continue;
      const lines = block.split("\n");
      const item = /^\s*(?:[-*]|\d+\.)\s+/;
      if (lines.every((l) => item.test(l) || !l.trim())) {
        list = document.createElement(/^\s*\d/.test(lines[0]) ? "ol" : "ul");
        for (const l of lines.filter((l) => l.trim())) {
          const li = document.createElement("li");
          inline(l.replace(item, ""), li);
          list.appendChild(li);
        }
        into.appendChild(list);
        continue;
      }
      const p = document.createElement("p");
      lines.forEach((l, j) => {
        if (j > 0) p.appendChild(document.createElement("br"));
        inline(l, p);
      });
      into.appendChild(p);
    }
  });
}

// ---- Messages --------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  div.append(who, body);
  if (role === "user") body.textContent = text; else markdown(text, body);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// What memory recalled for a reply, folded by default.
function showRecalled(div, recalled) {
  const details = document.createElement("details");
  details.className = "recalled";
  const summary = document.createElement("summary");
  summary.textContent = "Memory recalled " + recalled.length + " message" + (recalled.length === 1 ? "" : "s");
  details.appendChild(summary);
  const ul = document.createElement("ul");
  for (const r of recalled) {
    const li = document.createElement("li");
    li.textContent = "[" + Number(r.score).toFixed(2) + "] " + r.role + ": " + r.content;
    ul.appendChild(li);
  }
  details.appendChild(ul);
  div.appendChild(details);
}

function meta(div, text) {
  const m = document.createElement("div");
  m.className = "meta";
  m.textContent = text;
  div.appendChild(m);
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

// Sends one turn and streams the reply (server-sent events from /chat).
async function send(text) {
  $("notice").hidden = true;
  state.lastSend = text;
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  const body = reply.querySelector(".body");
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  let acc = "", fresh = false;
  try {
    const payload = { message: text, stream: true };
    if (state.conversation) payload.conversation_id = state.conversation;
    const res = await api("/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
      signal: controller.signal,
    });
    if (!res.ok) {
      reply.remove();
      notice(await errorText(res), () => { $("messages").lastChild.remove(); send(text); });
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        const v = data ? JSON.parse(data) : {};
        if (event === "start") {
          // A new conversation is stored with its first turn: the list is read again once it ends.
          fresh = state.conversation !== v.conversation_id;
          state.conversation = v.conversation_id;
        } else if (event === "token") {
          acc += v.text;
          body.textContent = acc;
          reply.scrollIntoView({ block: "end" });
        } else if (event === "done") {
          if (fresh) loadConversations();
          markdown(acc, body);
          if (v.recalled && v.recalled.length) showRecalled(reply, v.recalled);
          const u = v.usage || {};
          meta(reply, (u.completion_tokens || 0) + " tokens · first token " + Math.round(u.time_to_first_token_ms || 0) +
            " ms · instance " + v.instance + (u.cached_tokens ? " · " + u.cached_tokens + " prompt tokens cached" : ""));
        } else if (event === "error") {
          markdown(acc, body);
          notice((v.error && v.error.message) || "the reply failed", () => send(text));
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      markdown(acc, body);
      meta(reply, "stopped");
      // What was shown is stored once the server sees the stop: list it then.
      if (fresh && acc) setTimeout(() => loadConversations(), 1000);
    } else {
      notice("connection failed: " + e.message, () => send(text));
    }
  } finally {
    state.controller = null;
    busy(false);
  }
}

// ---- Conversations ------------------------------------------------------------

async function loadConversations(more) {
  const q = more && state.nextBefore ? "?before=" + encodeURIComponent(state.nextBefore) : "";
  const res = await api("/conversations" + q);
  if (!res.ok) { notice(await errorText(res), () => loadConversations(more)); return; }
  const page = await res.json();
  const ul = $("conversations");
  if (!more) ul.replaceChildren();
  for (const c of page.conversations) {
    const li = document.createElement("li");
    li.dataset.id = c.conversation_id;
    if (c.conversation_id === state.conversation) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title || "(empty)";
    open.title = c.title;
    open.onclick = () => openConversation(c.conversation_id);
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "✕";
    del.setAttribute("aria-label", "Delete conversation: " + c.title);
    del.onclick = () => deleteConversation(c.conversation_id, c.title);
    li.append(open, del);
    ul.appendChild(li);
  }
  state.nextBefore = page.next_before;
  $("more-conversations").hidden = !page.next_before;
}

async function openConversation(id) {
  const res = await api("/conversations/" + id + "?limit=1000");
  if (!res.ok) { notice(await errorText(res), () => openConversation(id)); return; }
  const conv = await res.json();
  state.conversation = id;
  $("messages").replaceChildren();
  for (const m of conv.messages) addMessage(m.role === "user" ? "user" : "assistant", m.content);
  for (const li of $("conversations").children) li.className = li.dataset.id === id ? "current" : "";
  $("sidebar").classList.remove("open");
  $("input").focus();
}

async function deleteConversation(id, title) {
  if (!confirm("Delete the conversation \"" + title + "\" and everything it remembers?")) return;
  const res = await api("/conversations/" + id, { method: "DELETE" });
  if (!res.ok) { notice(await errorText(res)); return; }
  if (state.conversation === id) newConversation();
  loadConversations();
}

function newConversation() {
  state.conversation = null;
  $("messages").replaceChildren();
  for (const li of $("conversations").children) li.className = "";
  $("input").focus();
}

// ---- Pool panel -------------------------------------------------------------------

async function refreshPool() {
  try {
    const res = await api("/pool");
    if (!res.ok) { $("pool-summary").textContent = "Pool: " + (await errorText(res)); return; }
    const p = await res.json();
    $("pool-summary").textContent = p.summary;
    const chips = $("pool-instances");
    chips.replaceChildren();
    for (const i of p.instances) {
      const s = document.createElement("span");
      s.className = "chip " + i.state;
      s.textContent = "#" + i.id + (i.kind === "remote" ? " remote" : "") + " " + i.state + " " + i.slots_busy + "/" + i.slots;
      s.title = i.last_error || "";
      chips.appendChild(s);
    }
    $("pool-queue").textContent = "queue " + p.queued;
    const now = Date.now(), tokens = p.totals.tokens;
    if (state.lastTokens !== null && now > state.lastAt) {
      const rate = ((tokens - state.lastTokens) * 1000) / (now - state.lastAt);
      $("pool-rate").textContent = rate.toFixed(1) + " tok/s";
    }
    state.lastTokens = tokens;
    state.lastAt = now;
  } catch (e) {
    $("pool-summary").textContent = "Pool: unreachable (" + e.message + ")";
  }
}

// ---- Wiring -------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newConversation);
  $("more-conversations").addEventListener("click", () => loadConversations(true));
  $("toggle-list").addEventListener("click", () => {
    const open = $("sidebar").classList.toggle("open");
    $("toggle-list").setAttribute("aria-expanded", String(open));
  });
  loadConversations();
  refreshPool();
  setInterval(refreshPool, 3000);
  $("input").focus();
});
