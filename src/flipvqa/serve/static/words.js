// Answers in words on the page of `flipvqa serve`: POST /api/ask/stream, read its Server-Sent Events
// with fetch and a stream reader (EventSource can neither POST nor send the token), and show the answer as it grows, each
// token with its probability. Loaded before app.js, whose helpers ($, el, pct, ms, renderFrames)
// these functions call when a question is asked.
"use strict";

function probColour(p) {  // red (unlikely) to green (sure)
  return `hsl(${Math.round(Math.max(0, Math.min(1, p)) * 120)}, 55%, 40%)`;
}

function visible(text) {  // a token's white space made visible
  return text.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u2205";
}

async function stream(path, options, question) {
  // POST (with the access token: token.js), then read the Server-Sent Events ("event: token" ...,
  // then "done" or "error") as they come.
  const response = await authFetch(path, options);
  if (!response.ok) {  // refused before streaming: one line of JSON
    let body = null;
    try { body = await response.json(); } catch (err) { /* not JSON */ }
    throw new Error((body && body.error) || `HTTP ${response.status}`);
  }
  startWords(question);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue;
      const payload = JSON.parse(data.join("\n"));
      if (event === "token") addToken(payload);
      else if (event === "done") return payload;
      else if (event === "error") throw new Error(payload.error || "the answer failed");
    }
  }
  throw new Error("the answer stopped before it ended (the connection closed)");
}

function startWords(question) {
  $("placeholder").hidden = true;
  $("answer").hidden = false;
  $("ranked-view").hidden = true;
  $("words-view").hidden = false;
  $("result").dataset.state = "streaming";
  $("asked").textContent = question;
  $("words-text").textContent = "";
  $("words-text").classList.add("growing");
  $("cut").hidden = true;
  $("tokens").replaceChildren();
  $("frames").replaceChildren();
  $("frames-hint").textContent = "";
  $("timings").textContent = "";
}

function addToken(t) {  // a streamed token: the answer grows
  $("words-text").textContent += t.token;
  $("tokens").append(tokenChip(t));
}

function tokenChip(t) {  // the token, a small bar of its probability, the number
  const chip = el("span", "tok");
  const pctText = pct(t.probability);
  chip.title = `${JSON.stringify(t.token)}: probability ${pctText}`;
  const line = el("span", "p-line");
  const fill = el("span", "p-fill");
  fill.style.width = `${Math.max(t.probability * 100, 2)}%`;
  fill.style.background = probColour(t.probability);
  line.append(fill);
  const label = el("span", "p-pct", pctText);
  label.style.color = probColour(t.probability);
  chip.append(el("span", "tok-text", visible(t.token)), line, label);
  return chip;
}

function renderWords(answer, clientSeconds) {
  // The final answer replaces what grew (same tokens: the server's own).
  $("words-text").classList.remove("growing");
  $("words-text").textContent = answer.answer || "(an empty answer: the model ended at once)";
  $("tokens").replaceChildren(...answer.tokens.map(tokenChip));
  const cut = $("cut");
  cut.hidden = !answer.cut;
  cut.textContent = `cut at ${answer.tokens.length} tokens (max_new_tokens)`;
  renderFrames(answer, false);
  const t = answer.timings || {};
  const parts = [`model ${ms(t.model || 0)}`, `queue ${ms(t.queue || 0)}`];
  if (t.first_token !== undefined) parts.unshift(`first token ${ms(t.first_token)}`);
  if (t.video !== undefined) parts.unshift(`video ${ms(t.video)}`);
  const batch = answer.batch_size > 1 ? ` · generated in a batch of ${answer.batch_size}` : "";
  const s = answer.settings || {};
  const how = s.temperature > 0 ? `sampled at temperature ${s.temperature}, top-p ${s.top_p}, seed ${s.seed}`
    : "greedy";
  $("timings").textContent = `Answered in ${ms(t.total || 0)} on the server (${parts.join(", ")})` +
    ` · ${ms(clientSeconds)} in the browser${batch} · ${answer.tokens.length} tokens, ${how}` +
    ` · ${answer.n_frames} video frames`;
}
