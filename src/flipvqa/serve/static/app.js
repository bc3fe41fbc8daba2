// The page of `flipvqa serve`: pick an example or upload a video, ask, show the ranked choices
// and the answer's attention over the sampled frames, or an answer in words as it is generated
// (words.js). Requests go through authFetch (token.js: the access token, when the server has one).
// No libraries, works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const PALETTE = ["#c98a22", "#d1603d", "#4e9a6f", "#3d7fd1", "#8a5ad1", "#c2477a",
                 "#2f9fa8", "#7a8b2f", "#a86f3d", "#5f6c8a"];
const state = { examples: [], byId: new Map(), source: "example", mode: "choices", health: null, busy: false,
                colours: new Map(), maxChoices: LETTERS.length };  // maxChoices: what fits the model

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function colour(label) {  // one colour per activity, in order of first appearance
  if (!state.colours.has(label)) state.colours.set(label, PALETTE[state.colours.size % PALETTE.length]);
  return state.colours.get(label);
}

function pct(p) {
  const v = p * 100;
  return (v >= 99.95 ? "100" : v < 0.05 && v > 0 ? "<0.1" : v.toFixed(1)) + "%";
}

function ms(seconds) {
  return seconds < 1 ? `${(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms` : `${seconds.toFixed(2)} s`;
}

async function api(path, options) {
  const response = await authFetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (err) { /* not JSON */ }
  if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status}`);
  return body;
}

// ------------------------------------------------------------------ the form

function renumber() {
  const items = [...$("choices").children];
  items.forEach((li, k) => {
    li.querySelector(".letter").textContent = LETTERS[k];
    li.querySelector("input").setAttribute("aria-label", `choice ${LETTERS[k]}`);
    li.querySelector("button").disabled = items.length <= 2;
  });
  $("add-choice").disabled = items.length >= state.maxChoices;
  $("choice-count").textContent = `${items.length} of 2–${state.maxChoices}`;
  $("choices-hint").classList.toggle("over", items.length > state.maxChoices);
}

function addChoice(text = "", focus = false) {  // the button's: no more than fit the model
  if ($("choices").children.length >= state.maxChoices) return;
  appendChoice(text, focus);
}

function appendChoice(text, focus = false) {
  const li = el("li", "choice");
  const input = el("input");
  input.type = "text";
  input.value = text;
  input.autocomplete = "off";
  const remove = el("button", "remove", "×");
  remove.type = "button";
  remove.title = "remove this choice";
  remove.addEventListener("click", () => { li.remove(); renumber(); });
  li.append(el("span", "letter"), input, remove);
  $("choices").append(li);
  renumber();
  if (focus) input.focus();
}

function setChoices(choices) {
  $("choices").replaceChildren();
  const list = choices && choices.length ? choices : ["", ""];
  list.forEach((c) => appendChoice(c));  // all of a link's choices, even too many: the server says so
  if (list.length < 2) appendChoice("");
}

function currentChoices() {  // blank fields are left out
  return [...$("choices").querySelectorAll("input")].map((i) => i.value).filter((c) => c.trim() !== "");
}

function showsExample(ex) {  // the form still holds the example's own question and choices
  return ex && $("question").value === (ex.question || "") &&
    JSON.stringify(currentChoices()) === JSON.stringify(ex.choices || []);
}

function showExample(id) {
  const ex = state.byId.get(id);
  if (!ex) return;
  $("example").value = id;
  $("question").value = ex.question || "";
  setChoices(ex.choices);
  const meta = [ex.id];
  if (ex.type) meta.push(`type ${ex.type}`);
  if (ex.n_frames) meta.push(`${ex.n_frames} video frames`);
  if (!ex.question) meta.push("no question of its own: ask yours");
  $("example-meta").textContent = meta.join(" · ");
}

function setMode(mode) {
  state.mode = mode;
  for (const seg of document.querySelectorAll(".seg")) {
    const on = seg.dataset.mode === mode;
    seg.classList.toggle("active", on);
    seg.setAttribute("aria-checked", String(on));
  }
  $("choices-box").hidden = mode === "words";
  $("words-hint").hidden = mode !== "words";
}

function setSource(source) {
  if (source === "upload" && state.source === "example" && showsExample(state.byId.get($("example").value))) {
    $("question").value = "";
    setChoices([]);
  }
  state.source = source;
  for (const tab of document.querySelectorAll(".tab")) {
    const on = tab.dataset.pane === source;
    tab.classList.toggle("active", on);
    tab.setAttribute("aria-selected", String(on));
  }
  $("pane-example").hidden = source !== "example";
  $("pane-upload").hidden = source !== "upload";
  if (source === "example" && $("example").value) showExample($("example").value);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// ------------------------------------------------------------------ asking

async function ask() {
  if (state.busy) return;
  showError("");
  const question = $("question").value;
  if (state.mode === "choices" && !currentChoices().length && question.trim()) setMode("words");
  const words = state.mode === "words";
  const choices = words ? [] : currentChoices();
  let options;
  let example = null;
  if (state.source === "example") {
    example = state.byId.get($("example").value);
    if (!example) return showError("pick an example first");
    const body = words ? { example: example.id, question } : { example: example.id, question, choices };
    options = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  } else {
    const file = $("video").files[0];
    if (!file) return showError("choose a video file first");
    const form = new FormData();
    form.append("video", file);
    form.append("question", question);
    choices.forEach((c) => form.append("choices", c));
    if ($("subtitles").files[0]) form.append("subtitles", $("subtitles").files[0]);
    options = { method: "POST", body: form };
  }
  state.busy = true;
  $("ask").disabled = true;
  $("ask").textContent = words ? "Answering…" : "Asking…";
  $("result").dataset.state = "loading";
  const clientStart = performance.now();
  try {
    let answer;
    if (words) {
      answer = await stream("/api/ask/stream", options, question);
      renderWords(answer, (performance.now() - clientStart) / 1000);
    } else {
      answer = await api("/api/ask", options);
      render(answer, (performance.now() - clientStart) / 1000);
    }
    $("result").dataset.state = "done";
    if (example) shareLink(example, question, choices, words);
  } catch (err) {
    $("result").dataset.state = "error";
    showError(err.message);
  } finally {
    state.busy = false;
    $("ask").disabled = false;
    $("ask").textContent = "Ask";
  }
}

function shareLink(example, question, choices, words) {
  const params = new URLSearchParams({ example: example.id });
  const own = question === example.question && JSON.stringify(choices) === JSON.stringify(example.choices);
  if (words) {
    params.set("q", question);
    params.set("mode", "words");
  } else if (!own) {
    params.set("q", question);
    choices.forEach((c) => params.append("c", c));
  }
  history.replaceState(null, "", "?" + params.toString());
}

// ------------------------------------------------------------------ ranked choices

function render(answer, clientSeconds) {
  $("placeholder").hidden = true;
  $("answer").hidden = false;
  $("ranked-view").hidden = false;
  $("words-view").hidden = true;
  const top = answer.ranked[0];
  $("asked").textContent = answer.question || "";
  $("top-letter").textContent = `(${LETTERS[answer.index]})`;
  $("top-choice").textContent = answer.choice;
  $("top-pct").textContent = pct(top.probability);
  const badge = $("badge");
  badge.hidden = answer.correct === undefined;
  if (answer.correct !== undefined) {
    const right = answer.correct === answer.index;
    badge.className = "badge " + (right ? "right" : "wrong");
    badge.textContent = right ? "✓ the dataset's answer" : `✗ the dataset says (${LETTERS[answer.correct]})`;
  }

  const ranked = $("ranked");
  ranked.replaceChildren();
  const order = answer.choices || answer.ranked.map((r) => r.choice);
  answer.ranked.forEach((r, k) => {
    const row = el("div", "row" + (k === 0 ? " best" : ""));
    const letter = order.indexOf(r.choice);
    row.append(el("span", "rank", String(k + 1)),
               el("span", "letter", letter >= 0 ? `(${LETTERS[letter]})` : ""),
               el("span", "text", r.choice));
    const bar = el("span", "bar");
    const fill = el("span", "fill");
    fill.style.width = `${Math.max(r.probability * 100, 0.4)}%`;
    bar.append(fill);
    row.append(bar, el("span", "pct", pct(r.probability)));
    row.title = `mean cross-entropy ${r.score.toFixed(4)} (lower is better)`;
    ranked.append(row);
  });

  renderFrames(answer, true);
  const t = answer.timings || {};
  const parts = [`model ${ms(t.model || 0)}`, `queue ${ms(t.queue || 0)}`];
  if (t.video !== undefined) parts.unshift(`video ${ms(t.video)}`);
  const batch = answer.batch_size > 1 ? ` · scored in a batch of ${answer.batch_size}` : "";
  const slots = (answer.frame_attention || []).length;
  $("timings").textContent = `Answered in ${ms(t.total || 0)} on the server (${parts.join(", ")})` +
    ` · ${ms(clientSeconds)} in the browser${batch} · ${answer.n_frames} video frames in ${slots} slots`;
}

function renderFrames(answer, withAttention) {
  // An answer in words has no attention: the frames the model saw, without bars.
  const attention = withAttention ? answer.frame_attention || [] : [];
  const n = withAttention ? attention.length : (answer.thumbnails || answer.frames || []).length;
  const most = Math.max(...attention, 1e-9);
  $("frames-hint").textContent = withAttention ? "bars: how much the answer attends to each frame (last layer)"
    : "what the model saw (the video's slots)";
  const strip = $("frames");
  strip.replaceChildren();
  strip.style.setProperty("--slots", String(Math.max(n, 1)));
  for (let j = 0; j < n; j++) {
    const slot = el("figure", "slot");
    const tile = el("div", "tile");
    const thumb = answer.thumbnails ? answer.thumbnails[j] : undefined;
    const label = answer.frames ? answer.frames[j] : undefined;
    if (thumb) {
      const img = el("img");
      img.src = thumb;
      img.alt = `frame ${j + 1}`;
      tile.append(img);
    } else if (label) {
      tile.style.background = colour(label);
      tile.append(el("span", "activity", label));
    } else {
      tile.classList.add("padding");
      tile.append(el("span", "activity", "padding"));
    }
    if (!withAttention) {
      slot.append(tile, el("figcaption", "", String(j + 1)));
      strip.append(slot);
      continue;
    }
    const meter = el("div", "meter");
    const level = el("div", "level");
    level.style.height = `${(attention[j] / most) * 100}%`;
    if (attention[j] === most) slot.classList.add("peak");
    meter.append(level);
    slot.append(tile, meter, el("figcaption", "", `${j + 1} · ${pct(attention[j])}`));  // percent, as ask --explain
    slot.title = `slot ${j + 1}: ${(attention[j] * 100).toFixed(2)}% of the answer's attention`;
    strip.append(slot);
  }
}

// ------------------------------------------------------------------ start

function showRoom(health) {  // how many choices fit the model (its --max_seq_len)
  const most = health.max_choices;
  if (!health.max_seq_len || most === undefined) return;
  state.maxChoices = Math.max(2, Math.min(most, LETTERS.length));
  $("choices-hint").textContent = most >= 2
    ? `This model reads at most ${health.max_seq_len} tokens: up to ${most} one-word choices fit, fewer long ones.`
    : `This model reads at most ${health.max_seq_len} tokens: too few for choices; ask in words.`;
  renumber();
}

async function start() {
  document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => setSource(tab.dataset.pane)));
  $("example").addEventListener("change", () => showExample($("example").value));
  $("add-choice").addEventListener("click", () => addChoice("", true));
  document.querySelectorAll(".seg").forEach((seg) => seg.addEventListener("click", () => setMode(seg.dataset.mode)));
  $("ask").addEventListener("click", ask);
  document.querySelector(".ask-card").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.target.tagName === "INPUT" && e.target.type === "text") ask();
  });
  setChoices([]);
  try {
    const health = await api("/api/health");  // open even with a token: it says whether one is needed
    state.health = health;
    showRoom(health);
    const file = health.checkpoint.split(/[\\/]/).pop();
    $("model").textContent = `${health.model} · ${file} · ${health.device}`;
    $("model").title = health.checkpoint;
    const most = (health.generation || {}).max_new_tokens;
    $("words-hint").textContent = "The model answers in its own words" + (most ? ` (up to ${most} tokens)` : "") +
      ", shown as it writes them, each token with its probability.";
    if (health.token_required && !auth.token) await askToken("");
    const examples = await api("/api/examples");
    state.examples = examples;
    for (const ex of examples) {
      state.byId.set(ex.id, ex);
      const text = ex.question || ex.id;
      $("example").append(new Option(text.length > 60 ? text.slice(0, 59) + "…" : text, ex.id));
      (ex.frames || []).forEach(colour);
    }
    $("upload-hint").textContent = health.uploads
      ? `Up to ${health.max_upload_mb} MB and ${health.max_seconds} s of video.`
      : "This server was started without --clip_model, so it cannot read videos.";
    $("video").disabled = !health.uploads;
    $("subtitles").disabled = !health.uploads;
    if (!examples.length) {
      $("example").append(new Option("(no examples on this server)", ""));
      setSource("upload");
    }
  } catch (err) {
    if (!state.health) $("model").textContent = "offline";
    return showError(err.message);
  }
  const params = new URLSearchParams(location.search);
  const wanted = params.get("example");
  if (state.examples.length) showExample(state.byId.has(wanted) ? wanted : state.examples[0].id);
  if (wanted && !state.byId.has(wanted)) {
    showError(`unknown example "${wanted}": pick one from the list`);
  } else if (wanted) {
    if (params.has("q")) $("question").value = params.get("q");
    if (params.getAll("c").length) setChoices(params.getAll("c"));
    if (params.get("mode") === "words") setMode("words");
    ask();
  }
}

start();
