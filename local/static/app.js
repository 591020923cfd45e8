// moi's live view: one WebSocket to the server, three waveforms on canvas, the chat, the
// timings, and the reply played with Web Audio. Plain JS, no build step.
// State the tests read lives on window.moi.
"use strict";

const DB_LO = -70, DB_HI = 0, FLOOR_DB = -120;
const COLUMN_MS = 50;  // one waveform column per 50 ms (the server's meter tick)
const WINDOW_COLUMNS = 600;  // 30 s on screen: a question and moi's answer side by side
const TIMING_KEYS = ["stt", "llm_first_token", "llm", "tts_first", "first_audio", "tts", "total"];
const $ = (id) => document.getElementById(id);

// --- waveforms ------------------------------------------------------------------------------

class Track {
  constructor(canvas, label, color, max = 2000) {
    this.canvas = canvas; this.label = label; this.color = color; this.max = max; this.values = [];
  }
  push(db) {
    this.values.push(db == null ? FLOOR_DB : db);
    if (this.values.length > this.max) this.values.splice(0, this.values.length - this.max);
  }
  clear() { this.values = []; }
  last() { return this.values.length ? this.values[this.values.length - 1] : FLOOR_DB; }
  draw() {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    if (!c.clientWidth) return;  // hidden panel
    const w = Math.round(c.clientWidth * dpr), h = Math.round(c.clientHeight * dpr);
    if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    const g = c.getContext("2d");
    g.clearRect(0, 0, w, h);
    const step = w / WINDOW_COLUMNS, bar = Math.max(dpr, step * 0.7);
    const vals = this.values.slice(-WINDOW_COLUMNS);
    g.fillStyle = this.color;
    for (let i = 0; i < vals.length; i++) {
      const frac = Math.min(1, (vals[i] - DB_LO) / (DB_HI - DB_LO));
      if (!(frac > 0)) continue;
      const bh = Math.max(dpr, frac * (h - 2 * dpr));
      g.fillRect(w - (vals.length - i) * step, (h - bh) / 2, bar, bh);
    }
    const lbl = $("db-" + this.label);
    if (lbl) { const v = this.last(); lbl.textContent = v > FLOOR_DB + 1 ? `${v.toFixed(0)} dB` : "-∞ dB"; }
  }
}

// --- reply playback (Web Audio) ---------------------------------------------------------------

class Player {
  constructor() {
    this.ctx = null; this.analyser = null; this.sources = new Set();
    this.nextAt = 0; this.stoppedTurn = 0; this.played = 0; this.dropped = 0; this.stops = 0;
    this._muted = false;
  }
  get muted() { return this._muted; }
  set muted(on) { this._muted = on; if (this.gain) this.gain.gain.value = on ? 0 : 1; }
  unlock() {  // call from a user gesture: browsers start audio only after one
    if (!this.ctx) {
      const Ctx = window.AudioContext || window.webkitAudioContext;
      this.ctx = new Ctx();
      this.analyser = this.ctx.createAnalyser();
      this.analyser.fftSize = 2048;
      this.gain = this.ctx.createGain();  // 0 when the reply plays on the server's speaker
      this.gain.gain.value = this.muted ? 0 : 1;
      this.analyser.connect(this.gain).connect(this.ctx.destination);
      this.samples = new Float32Array(this.analyser.fftSize);
    }
    if (this.ctx.state === "suspended") this.ctx.resume();
  }
  get suspended() { return !!this.ctx && this.ctx.state !== "running"; }
  get playing() { return this.sources.size > 0; }
  play(header, pcm) {
    if (header.turn <= this.stoppedTurn) { this.dropped++; return; }  // a stopped reply's tail
    if (!this.ctx) this.unlock();
    if (this.ctx.state !== "running") { this.dropped++; return; }  // no click on this page yet: see the hint
    const ctx = this.ctx, buffer = ctx.createBuffer(1, pcm.length, header.sample_rate);
    const ch = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
    const src = ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(this.analyser);
    const at = Math.max(ctx.currentTime + 0.05, this.nextAt);
    src.start(at);
    this.nextAt = at + buffer.duration;
    this.sources.add(src);
    src.onended = () => this.sources.delete(src);
    this.played++;
  }
  stop(turn) {
    if (turn != null) this.stoppedTurn = Math.max(this.stoppedTurn, turn);
    for (const src of this.sources) {
      try { src.stop(); } catch (e) { /* not started yet */ }
      src.disconnect();
    }
    if (this.sources.size) this.stops++;
    this.sources.clear();
    this.nextAt = 0;
  }
  reset() { this.stop(); this.stoppedTurn = 0; }
  levelDb() {  // what is coming out of the speakers now
    if (!this.analyser || !this.playing) return FLOOR_DB;
    this.analyser.getFloatTimeDomainData(this.samples);
    let sum = 0;
    for (const x of this.samples) sum += x * x;
    const rms = Math.sqrt(sum / this.samples.length);
    return rms > 0 ? Math.max(FLOOR_DB, 20 * Math.log10(rms)) : FLOOR_DB;
  }
}

// --- state -----------------------------------------------------------------------------------

const moi = window.moi = {
  ws: null, connected: false, connections: 0, hellos: 0, ticks: 0, audioFrames: 0, reconnects: 0,
  state: "idle", pipelines: {}, pipeline: null, turn: 0, upload: null, clients: 0, sessions: 0,
  player: new Player(), tracks: {}, lastError: null,
  lastEnd: null, decisions: {},  // per turn: the silence waited before its end was judged, Smart Turn's P(done)
};

function engineKind(name) {
  if (!name) return "";
  if (name === "local") return "local";
  if (/→|down|fallback/.test(name)) return "fallback";
  return "remote";
}

function showEngine(name) {
  const kind = engineKind(name), el = $("engine");
  el.className = "badge engine " + kind;
  el.textContent = name ? (kind === name ? `engine: ${kind}` : `engine: ${kind} (${name})`) : "engine: –";
}

function showError(message) {
  moi.lastError = message;
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function setState(state) {
  moi.state = state;
  const el = $("state");
  el.textContent = state;
  el.className = "badge state " + state;
  $("start").textContent = state === "idle" ? "Start" : "Restart";
  updateButtons();
}

function updateButtons() {
  $("start").disabled = !moi.connected;
  $("end").disabled = !moi.connected || moi.state === "idle";
  $("stop").disabled = !moi.connected || moi.state !== "running";
}

function showPanels(pipelineId) {
  const p = moi.pipelines[pipelineId];
  if (!p) return;
  for (const el of document.querySelectorAll("[data-panel]")) {
    const panel = el.dataset.panel;  // "aec" shows beside "pre" once a canceller sends levels
    el.hidden = panel === "aec" ? !(moi.aec && p.panels.includes("pre")) : !p.panels.includes(panel);
  }
  const stages = $("stages");
  stages.replaceChildren(...p.stages.map((s) => Object.assign(document.createElement("li"), { textContent: s })));
}

// --- chat and timings ------------------------------------------------------------------------

function chatLine(cls, text, turn) {
  const el = document.createElement("div");
  el.className = cls;
  if (turn != null) el.dataset.turn = turn;
  el.textContent = text;
  const chat = $("chat"), atBottom = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 40;
  chat.append(el);
  if (atBottom) chat.scrollTop = chat.scrollHeight;
  return el;
}

function bubble(who, turn) {
  let el = $("chat").querySelector(`.msg.${who}[data-turn="${turn}"]`);
  if (!el) {
    el = chatLine(`msg ${who}`, "", turn);
    el.append(Object.assign(document.createElement("b"), { textContent: who === "you" ? "you" : "moi" }));
    el.append(Object.assign(document.createElement("span"), { className: "text" }));
  }
  return el;
}

function timingRow(ev) {
  const row = document.createElement("tr");
  const decided = moi.decisions[ev.turn] || {};
  const cells = [String(ev.turn), ev.engine, decided.waited != null ? decided.waited.toFixed(2) : "–",
    decided.turn_p != null ? decided.turn_p.toFixed(2) : "–",
    ...TIMING_KEYS.map((k) => ev.timings[k] != null ? ev.timings[k].toFixed(2) : "–")];
  row.append(...cells.map((text) => Object.assign(document.createElement("td"), { textContent: text })));
  row.dataset.turn = ev.turn;
  $("timings").tBodies[0].append(row);
}

function clearSession() {
  $("chat").replaceChildren();
  $("timings").tBodies[0].replaceChildren();
  for (const t of Object.values(moi.tracks)) t.clear();
  moi.aec = false;
  for (const el of document.querySelectorAll('[data-panel="aec"]')) el.hidden = true;
  moi.player.reset();
  moi.turn = 0;
  moi.lastEnd = null;
  moi.decisions = {};
  showEngine(null);
}

function apply(ev) {
  if (ev.turn != null && ev.turn > moi.turn) moi.turn = ev.turn;
  switch (ev.type) {
    case "session":
      if (ev.state === "loading") {
        moi.sessions++;
        clearSession();
        showError(null);
        chatLine("note", `loading models for “${moi.pipelines[ev.pipeline]?.label ?? ev.pipeline}” on ${ev.input_label}…`);
      } else if (ev.state === "running") {
        chatLine("note", `listening to ${ev.input_label}`);
      } else if (ev.state === "idle" && ev.reason) {
        chatLine("note", `session ${ev.reason}`);
      }
      if (ev.pipeline) { moi.pipeline = ev.pipeline; $("pipeline").value = ev.pipeline; showPanels(ev.pipeline); }
      if (ev.input) { const kind = ev.input.split(":")[0]; $("input").value = kind; $("upload-box").hidden = kind !== "upload"; }
      setState(ev.state);
      break;
    case "transcript": {
      const el = bubble("you", ev.turn);
      el.querySelector(".text").textContent = ev.text || "(nothing intelligible)";
      break;
    }
    case "reply_token": {
      const el = bubble("moi", ev.turn), text = el.querySelector(".text");
      el.classList.add("streaming");
      text.textContent = text.textContent ? text.textContent + ev.text : ev.text.trimStart();
      break;
    }
    case "reply": {
      const el = bubble("moi", ev.turn);
      el.classList.remove("streaming");
      if (ev.text) el.querySelector(".text").textContent = ev.text;
      if (ev.cancelled) { el.classList.add("cancelled"); chatLine("note", "(reply stopped)", ev.turn); }
      break;
    }
    case "turn_done":
      timingRow(ev);
      showEngine(ev.engine);
      break;
    case "stopped":
      moi.player.stop(ev.turn);
      chatLine("note", `(stopped by ${ev.reason} in ${(ev.latency * 1000).toFixed(0)} ms)`, ev.turn);
      break;
    case "withdrawn":
      chatLine("note", "(withdrawn: answered again with what you say next)", ev.turn);
      break;
    case "paused":
      chatLine("note", ev.paused ? "(paused: someone there?)" : "(went on: nobody)", ev.turn);
      break;
    case "fallback":
      showEngine(ev.engine);
      chatLine("note", `(${ev.engine}: ${ev.reason})`, ev.turn);
      break;
    case "error":
      chatLine("note error", `${ev.turn ? `turn ${ev.turn} failed` : "error"}: ${ev.message}`, ev.turn);
      if (!ev.turn) showError(ev.message);
      break;
    case "note": chatLine("note", ev.message); break;
    case "dropped":  // speech that reached no transcript, and why (a blip is no news)
      if (ev.reason !== "too short") chatLine("note", `(not heard: ${ev.reason})`);
      break;
    case "speech_start": $("listening").classList.add("on"); break;
    case "speech_end":
      $("listening").classList.remove("on");
      moi.lastEnd = { waited: ev.waited, turn_p: ev.turn_p };
      break;
    case "turn":  // a turn decided: the utterance end that decided it is the last one heard
      moi.decisions[ev.turn] = moi.lastEnd || {};
      break;
  }
}

function applyStatus(s) {
  if (!s) return;
  $("listening").classList.toggle("on", s.listening);
  $("speaking").classList.toggle("on", s.speaking || moi.player.playing);
  if ($("timings").tBodies[0].rows.length === 0) showEngine(s.engine);
}

// --- the connection ----------------------------------------------------------------------------

function onHello(msg) {
  moi.hellos++;
  moi.pipelines = Object.fromEntries(msg.pipelines.map((p) => [p.id, p]));
  const pick = $("pipeline"), input = $("input");
  const keepP = pick.value, keepI = input.value;
  pick.replaceChildren(...msg.pipelines.map((p) => new Option(p.label, p.id)));
  input.replaceChildren(...msg.inputs.map((i) => new Option(i.label, i.id)));
  pick.value = keepP || msg.choice.pipeline;
  input.value = keepI || msg.choice.input.split(":")[0];
  $("upload-box").hidden = input.value !== "upload";
  if (!moi.upload && msg.uploads.length) showUpload(msg.uploads[msg.uploads.length - 1]);
  clearSession();
  setState(msg.state);
  for (const ev of msg.history) apply(ev);
  moi.player.muted = msg.playback === "speaker";  // the reply plays on the server's speaker
  meters(msg);
  showPanels(msg.state === "idle" ? pick.value : msg.choice.pipeline);
  applyStatus(msg.status);
  showClients(msg.clients);
}

function showClients(n) {
  moi.clients = n;
  const conn = $("conn");
  conn.className = "badge conn";
  conn.textContent = n > 1 ? `connected · ${n} pages share this session` : "connected";
}

function meters(msg) {
  for (const name of ["pre", "aec", "post"]) for (const v of msg[name] || []) moi.tracks[name].push(v);
  if (msg.aec && msg.aec.length && !moi.aec) { moi.aec = true; showPanels(moi.pipeline || $("pipeline").value); }
}

function onTick(msg) {
  moi.ticks++;
  meters(msg);
  for (const ev of msg.events) apply(ev);
  if (msg.state !== moi.state) setState(msg.state);
  applyStatus(msg.status);
  if (msg.clients !== moi.clients) showClients(msg.clients);
}

function onAudio(data) {
  const view = new DataView(data), n = view.getUint32(0, false);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(data, 4, n)));
  const pcm = new Int16Array(data.slice(4 + n, 4 + n + header.payload_length));  // copy: aligned
  moi.audioFrames++;
  moi.player.play(header, pcm);
  $("sound-hint").hidden = !moi.player.suspended;
}

let backoff = 500;

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  moi.ws = ws;
  ws.onopen = () => {
    moi.connected = true; moi.connections++; backoff = 500;
    $("banner").hidden = true;
    updateButtons();
  };
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") return onAudio(e.data);
    const msg = JSON.parse(e.data);
    if (msg.type === "tick") onTick(msg);
    else if (msg.type === "hello") onHello(msg);
    else if (msg.type === "stop_playback") moi.player.stop(msg.turn);
    else if (msg.type === "error") showError(msg.message);
  };
  ws.onclose = (e) => {
    if (moi.ws !== ws) return;
    moi.connected = false;
    updateButtons();
    const wait = backoff;
    backoff = Math.min(backoff * 2, 5000);
    const banner = $("banner");
    banner.textContent = `connection to moi lost${e.reason ? ` (${e.reason})` : ""}; reconnecting in ${(wait / 1000).toFixed(1)} s…`;
    banner.hidden = false;
    $("conn").className = "badge conn down";
    $("conn").textContent = "disconnected";
    setTimeout(() => { moi.reconnects++; connect(); }, wait);
  };
}

function send(msg) {
  if (moi.ws && moi.ws.readyState === WebSocket.OPEN) { moi.ws.send(JSON.stringify(msg)); return true; }
  showError("not connected to moi; reconnecting…");
  return false;
}

// --- controls ------------------------------------------------------------------------------------

function showUpload(up) {
  moi.upload = up;
  $("upload-name").textContent = up ? `${up.name} · ${up.seconds.toFixed(1)} s` : "";
}

async function uploadFile() {
  const file = $("file").files[0];
  showUpload(null);
  if (!file) return null;
  const body = new FormData();
  body.append("file", file);
  showError(null);
  try {
    const r = await fetch("/api/upload", { method: "POST", body });
    const data = await r.json().catch(() => ({ error: { message: `upload failed (HTTP ${r.status})` } }));
    if (!r.ok) { showError(data.error?.message || `upload failed (HTTP ${r.status})`); return null; }
    showUpload(data);
    return data;
  } catch (e) {
    showError(`upload failed: ${e.message}`);
    return null;
  }
}

async function start() {
  moi.player.unlock();  // this click is the gesture that lets the page play sound
  showError(null);
  let input = $("input").value;
  if (input === "upload") {
    const up = moi.upload || (await uploadFile());
    if (!up) { if (!moi.lastError) showError("choose an audio file to upload first"); return; }
    input = `upload:${up.id}`;
  }
  send({ cmd: "start", pipeline: $("pipeline").value, input });
}

function stop() {
  moi.player.stop(moi.turn);  // silence this page now; the server tells the others
  send({ cmd: "stop" });
}

function everyColumn() {  // the reply track: what is playing, 20 columns a second
  if (moi.state === "running" || moi.player.playing) moi.tracks.reply.push(moi.player.levelDb());
  if (moi.player.playing) $("speaking").classList.add("on");
  for (const t of Object.values(moi.tracks)) t.draw();
}

function init() {
  const css = getComputedStyle(document.documentElement);
  for (const [name, color] of [["pre", "--pre"], ["aec", "--aec"], ["post", "--post"], ["reply", "--reply"]]) {
    moi.tracks[name] = new Track($("wave-" + name), name, css.getPropertyValue(color).trim());
  }
  $("start").onclick = start;
  $("end").onclick = () => send({ cmd: "end" });
  $("stop").onclick = stop;
  $("pipeline").onchange = () => { if (moi.state === "idle") showPanels($("pipeline").value); };
  $("input").onchange = () => { $("upload-box").hidden = $("input").value !== "upload"; };
  $("file").onchange = uploadFile;
  document.addEventListener("click", () => {  // any click lets this page play sound
    moi.player.unlock();
    $("sound-hint").hidden = true;
  });
  setInterval(everyColumn, COLUMN_MS);
  connect();
}

init();
