// The access token of `flipvqa serve --token`: asked once (when /api/health says the server needs
// one, or on a 401), kept for this tab in sessionStorage (gone when the tab closes) and sent as
// "Authorization: Bearer" with every API request. The streamed answers too: words.js reads them
// with fetch, which sends headers (EventSource could not, and a token in the URL lands in logs).
"use strict";

const TOKEN_KEY = "flipvqa-token";
const auth = { token: readToken(), asking: null };  // asking: the open prompt, shared by refused requests

function readToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (err) { return ""; }
}

function keepToken(token) {
  auth.token = token;
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch (err) { /* storage blocked: kept in memory until the page reloads */ }
}

function askToken(why) {  // the token typed into the dialog; rejects when it is cancelled
  if (auth.asking) return auth.asking;
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  const error = document.getElementById("token-error");
  error.textContent = why || "";
  error.hidden = !why;
  input.value = "";
  auth.asking = new Promise((resolve, reject) => {
    dialog.addEventListener("close", () => {
      auth.asking = null;
      const token = input.value.trim();
      if (dialog.returnValue === "use" && token) {
        keepToken(token);
        resolve(token);
      } else {
        reject(new Error("this server needs its access token: reload the page to give it"));
      }
    }, { once: true });
  });
  dialog.returnValue = "";
  dialog.showModal();
  input.focus();
  return auth.asking;
}

async function authFetch(path, options = {}) {
  // fetch with the token; a 401 asks for it (again) and sends the request once more.
  for (;;) {
    const headers = new Headers(options.headers || {});
    const sent = auth.token;
    if (sent) headers.set("Authorization", "Bearer " + sent);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      throw new Error("the server cannot be reached (" + err.message + ")");
    }
    if (response.status !== 401) return response;
    if (auth.token === sent) keepToken("");  // (another request may have brought a new one meanwhile)
    if (!auth.token) await askToken(sent ? "The server refused that token: try again." : "");
  }
}
