// Influence search web UI: plain JS against the live v1 API (no build step).
// Every piece of API text goes into the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STOPWORDS = new Set(
  ("a an and are as at be by for from has have he her his in is it its of on or she that the " +
   "their them they this to was were which who will with").split(" "));
let lastQuery = null; // {prompt, completion, exact} of the results on screen
let selectedId = null;

// ---- API -------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json", Accept: "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["X-API-Key"] = key;
  return h;
}

class ApiError extends Error {
  constructor(status, body) {
    super(plainError(status, body));
    this.status = status;
    this.code = body && body.error ? body.error.code : "http_" + status;
  }
}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, { error: { code: "network", message: "" } });
  }
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) {
    if (response.status === 503) {
      const retry = response.headers.get("Retry-After");
      if (data && data.error && retry) data.error.retry_after = retry;
    }
    throw new ApiError(response.status, data);
  }
  return data;
}

// Turn an API error body into one sentence a person can act on.
function plainError(status, body) {
  const err = body && body.error ? body.error : null;
  if (status === 0) return "Cannot reach the service. Is it running?";
  if (!err) return `The service answered ${status} without an explanation.`;
  const d = err.details || {};
  switch (err.code) {
    case "input_too_long":
      if (d.field && d.n_tokens !== undefined && d.limit !== undefined)
        return `${d.field} too long: ${d.n_tokens} tokens, limit ${d.limit}`;
      return err.message;
    case "empty_completion": return "The completion is empty: type the output to explain.";
    case "empty_generation": return "The model ended its generation at once: nothing to trace. Try another prompt.";
    case "invalid_span": return err.message;
    case "unauthorized": return "This service needs an API key: enter it above.";
    case "forbidden": return "The API key was not accepted.";
    case "not_found": return err.message || "Not found.";
    case "validation_error": return `Invalid input: ${err.message}`;
    default:
      if (status === 503) {
        const wait = err.retry_after ? ` Try again in ${err.retry_after} s.` : " Try again shortly.";
        return `The service is busy or not ready: ${err.message}.${wait}`;
      }
      return err.message || `Error ${status} (${err.code}).`;
  }
}

// ---- serving info and modes ------------------------------------------------------------
async function loadServing() {
  try {
    const info = await api("GET", "/v1/index");
    $("serving-model").textContent = info.model;
    $("serving-index").textContent =
      info.index_version.slice(0, 12) + (info.faiss ? ` (${info.faiss})` : "");
    $("serving-index").title = info.index_version;
    $("serving-size").textContent = String(info.size);
  } catch (err) {
    $("serving-model").textContent = "unavailable";
    $("serving-index").textContent = err.message;
  }
}

// The two questions by what they ask; the methods by name.
const MODE_LABELS = {
  influence: "influence: which examples moved the model to say this",
  attribution: "attribution: which passages state this",
  bm25: "method: bm25 (lexical)",
  hybrid: "method: hybrid (bm25 + gradient)",
};

// The modes the server accepts, read from its OpenAPI schema.
async function loadModes() {
  let modes = ["influence"];
  try {
    const spec = await (await fetch("/openapi.json")).json();
    const mode = spec.components.schemas.InfluenceQuery.properties.mode || {};
    const found = mode.enum || (mode.const ? [mode.const] : null);
    if (found && found.length) modes = found;
  } catch (err) { /* keep the default */ }
  const select = $("mode");
  const options = modes.map((m) => new Option(MODE_LABELS[m] || m, m));
  // Influence beside attribution: both rankings side by side (a UI view over two queries).
  if (modes.includes("influence") && modes.includes("attribution"))
    options.push(new Option("compare: influence beside attribution", "compare"));
  select.replaceChildren(...options);
}

// ---- results ---------------------------------------------------------------------------
// A word: letters and digits, joined across inner punctuation ("2.0", "don't", "e-mail");
// everything between words is kept as it is.
const WORD = /[\p{L}\p{N}]+(?:[.,'\u2019\-][\p{L}\p{N}]+)*/u;
function words(text) {
  return text.match(/[\p{L}\p{N}]+(?:[.,'\u2019\-][\p{L}\p{N}]+)*|[^\p{L}\p{N}]+/gu) || [];
}
const isWord = (w) => WORD.test(w) && w.match(WORD)[0] === w;

// Words to highlight: the completion's whole words that are no stop words, and the
// capitalized words (entities) of the prompt. Punctuation is never highlighted.
function highlightTerms(prompt, completion) {
  const completionTerms = new Set();
  for (const w of words(completion)) {
    if (isWord(w) && !STOPWORDS.has(w.toLowerCase())) completionTerms.add(w.toLowerCase());
  }
  const entities = new Set();
  for (const w of words(prompt)) {
    if (isWord(w) && /^\p{Lu}/u.test(w) && !STOPWORDS.has(w.toLowerCase()))
      entities.add(w.toLowerCase());
  }
  return { completionTerms, entities };
}

function highlighted(text, terms) {
  const frag = document.createDocumentFragment();
  for (const w of words(text)) {
    const low = w.toLowerCase();
    let cls = null;
    if (terms.completionTerms.has(low)) cls = "hl-completion";
    else if (terms.entities.has(low)) cls = "hl-entity";
    if (cls) {
      const mark = document.createElement("mark");
      mark.className = cls;
      mark.textContent = w;
      frag.append(mark);
    } else {
      frag.append(document.createTextNode(w));
    }
  }
  return frag;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Bars are relative to the best result on screen (realistic influence cosines are a few
// hundredths: an absolute 0-1 bar would look empty); the raw score and the rank are shown.
function renderResults(data, terms, list = $("results"), shared = null) {
  list.replaceChildren();
  const top = Math.max(...data.results.map((r) => Math.abs(r.score)), 0);
  for (const r of data.results) {
    const li = el("li", "card");
    li.dataset.id = String(r.id);
    const open = el("button", "card-open");
    open.type = "button";
    const both = shared !== null && shared.has(r.id);
    open.setAttribute("aria-label", `Rank ${r.rank}: example ${r.id}, score ${r.score.toFixed(3)}` +
                      `${both ? ", in both rankings" : ""}. Open details`);
    const head = el("div", "card-head");
    head.append(el("span", "rank", `#${r.rank}`));
    const bar = el("span", "bar");
    const fill = el("span", r.score >= 0 ? "fill" : "fill negative");
    const share = top > 0 ? Math.abs(r.score) / top : 0;
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    bar.title = `${(share * 100).toFixed(0)}% of the top score`;
    bar.append(fill);
    head.append(bar, el("span", "score", r.score.toFixed(3)));
    const meta = el("div", "card-meta");
    meta.append(el("span", "source", r.source || "unknown source"),
                el("span", "id", `id ${r.id}`));
    if (r.document_id) meta.append(el("span", "doc", `doc ${r.document_id}`));
    if (both) {
      li.classList.add("shared");
      meta.append(el("span", "shared-badge", "in both"));
    }
    const text = el("p", "card-text");
    text.append(highlighted(r.text || "", terms));
    open.append(head, meta, text);
    open.addEventListener("click", () => openDetail(r.id, r.score));
    li.append(open);
    list.append(li);
  }
  $("legend").hidden = data.results.length === 0;
}

function showError(box, message) {
  box.textContent = message;
  box.hidden = !message;
}

function timing(data, roundTrip) {
  const t = data.timings_ms;
  const r = data.rescore;
  const exact = r
    ? `; ${r.candidates} candidates re-scored exactly, ` +
      (r.certified ? `top results certain at ${r.confidence}` : "stopped at the cap, not certain")
    : "; first stage only";
  return `in ${roundTrip.toFixed(0)} ms (server ${t.total.toFixed(0)} ms: encode ${t.encode.toFixed(0)} ms, ` +
         `search ${t.search.toFixed(0)} ms, re-score ${(t.rescore || 0).toFixed(0)} ms${exact}) ` +
         `from index ${data.index_version.slice(0, 12)}`;
}

function showGenerated(data) {
  const box = $("generated");
  if (!data || !data.generation) { box.hidden = true; return; }
  $("generated-text").textContent = data.completion;
  const g = data.generation;
  $("generated-info").textContent =
    `(${g.n_tokens} tokens, ${g.finish_reason === "eos" ? "the model ended it" : "stopped at the token limit"})`;
  box.hidden = false;
}

// One query, or (mode "compare") the same query by influence and by BM25 side by side. With
// `generate`, the model writes the completion first; compare's BM25 side then searches the
// generated text.
async function search(generate) {
  const prompt = $("prompt").value;
  const k = Number.parseInt($("k").value, 10) || 10;
  const mode = $("mode").value;
  const body = { prompt, k };
  if (generate) body.generate = { max_new_tokens: Number.parseInt($("max-new").value, 10) || 16 };
  else body.completion = $("completion").value;
  if (mode && mode !== "influence" && mode !== "compare") body.mode = mode;
  if ($("second-stage").value === "off") body.rescore = 0;
  showError($("error"), "");
  $("status").textContent = generate ? "Generating and tracing…" : "Searching…";
  for (const b of [$("submit"), $("generate")]) b.disabled = true;
  $("results").setAttribute("aria-busy", "true");
  const started = performance.now();
  try {
    const data = await api("POST", "/v1/influence", body);
    const completion = data.completion !== null && data.completion !== undefined ? data.completion : body.completion;
    if (generate) $("completion").value = completion;
    // The cards show the exact stage's scores when it ran: explain that score, not the first stage's.
    lastQuery = { prompt, completion, exact: data.rescore !== null && data.rescore !== undefined };
    showGenerated(data);
    const terms = highlightTerms(prompt, completion);
    if (mode === "compare") {
      const lexical = await api("POST", "/v1/influence", { prompt, completion, k, mode: "attribution" });
      const roundTrip = performance.now() - started;
      const ids = new Set(data.results.map((r) => r.id));
      const shared = new Set(lexical.results.filter((r) => ids.has(r.id)).map((r) => r.id));
      $("results").replaceChildren();
      renderResults(data, terms, $("compare-influence"), shared);
      renderResults(lexical, terms, $("compare-attribution"), shared);
      $("compare-influence-method").textContent = data.method;
      $("compare-attribution-method").textContent = lexical.method;
      $("compare-summary").textContent =
        `The two rankings share ${shared.size} of their top ${k} passages (marked "in both").`;
      $("compare").hidden = false;
      $("status").textContent = `${data.results.length} + ${lexical.results.length} results ` +
                                `in ${roundTrip.toFixed(0)} ms from index ${data.index_version.slice(0, 12)}`;
    } else {
      const roundTrip = performance.now() - started;
      $("compare").hidden = true;
      renderResults(data, terms);
      $("status").textContent = `${data.results.length} results ${timing(data, roundTrip)}`;
    }
  } catch (err) {
    $("results").replaceChildren();
    $("compare").hidden = true;
    $("legend").hidden = true;
    $("status").textContent = "";
    showGenerated(null);
    showError($("error"), err.message);
  } finally {
    for (const b of [$("submit"), $("generate")]) b.disabled = false;
    $("results").removeAttribute("aria-busy");
  }
}

async function runQuery(event) {
  event.preventDefault();
  await search(false);
}

// ---- detail and per-token view ---------------------------------------------------------
async function openDetail(id, score) {
  selectedId = id;
  const dialog = $("detail");
  $("detail-title").textContent = `Training example ${id}`;
  $("detail-meta").replaceChildren();
  $("detail-text").textContent = "Loading…";
  $("heatmap-figure").hidden = true;
  $("explain-status").textContent = "";
  showError($("explain-error"), "");
  if (!dialog.open) dialog.showModal();
  try {
    const ex = await api("GET", `/v1/examples/${id}`);
    if (selectedId !== id) return;
    const meta = $("detail-meta");
    const rows = [["Score", score.toFixed(4)], ["Source", ex.source || "–"],
                  ["Document", ex.document_id || "–"],
                  ["Tokens", `${ex.token_start}–${ex.token_end}`],
                  ["Characters", `${ex.char_start}–${ex.char_end}`]];
    for (const [k, v] of rows) meta.append(el("dt", null, k), el("dd", null, String(v)));
    const text = $("detail-text");
    text.replaceChildren(lastQuery ? highlighted(ex.text, highlightTerms(lastQuery.prompt, lastQuery.completion))
                                   : document.createTextNode(ex.text));
  } catch (err) {
    $("detail-text").textContent = "";
    showError($("explain-error"), err.message);
  }
}

function heatColor(c, scale) {
  const a = scale > 0 ? Math.min(1, Math.abs(c) / scale) : 0;
  return c >= 0 ? `rgba(220, 80, 20, ${(0.85 * a).toFixed(3)})` : `rgba(30, 100, 220, ${(0.85 * a).toFixed(3)})`;
}

async function explain() {
  if (selectedId === null || !lastQuery) return;
  const id = selectedId;
  showError($("explain-error"), "");
  $("explain-status").textContent = "Computing per-token contributions…";
  $("explain").disabled = true;
  const started = performance.now();
  try {
    const data = await api("POST", "/v1/influence/explain",
                           { prompt: lastQuery.prompt, completion: lastQuery.completion, id, exact: lastQuery.exact });
    if (selectedId !== id) return;
    const scale = Math.max(...data.tokens.map((t) => Math.abs(t.contribution)), 0);
    const map = $("heatmap");
    map.replaceChildren();
    // A token with no characters in the example's text (an end-of-sequence token added when
    // it was indexed) is a marker, not its literal spelling.
    const special = (t) => t.end <= t.start;
    const label = (t) => (special(t) ? "end of sequence" : JSON.stringify(t.text));
    data.tokens.forEach((t, i) => {
      const span = el("span", special(t) ? "tok special" : "tok", special(t) ? "\u2403" : t.text);
      span.dataset.contribution = String(t.contribution);
      span.dataset.position = String(i);
      span.style.backgroundColor = heatColor(t.contribution, scale);
      span.title = `token ${i}, ${label(t)}: ${t.contribution >= 0 ? "+" : ""}${t.contribution.toExponential(2)}`;
      map.append(span);
    });
    const top = data.tokens.map((t, i) => ({ ...t, position: i }))
      .sort((a, b) => Math.abs(b.contribution) - Math.abs(a.contribution)).slice(0, 8);
    $("top-tokens").replaceChildren(...top.map((t) =>
      el("li", null, `token ${t.position} ${label(t)} ${t.contribution >= 0 ? "+" : ""}${t.contribution.toFixed(4)}`)));
    $("heatmap-figure").hidden = false;
    $("explain-status").textContent =
      `${data.exact ? "Exact influence score" : "Influence score (first stage)"} ${data.score.toFixed(4)} ` +
      `split over ${data.tokens.length} tokens ` +
      `in ${(performance.now() - started).toFixed(0)} ms`;
  } catch (err) {
    $("explain-status").textContent = "";
    showError($("explain-error"), err.message);
  } finally {
    $("explain").disabled = false;
  }
}

// ---- wiring ----------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  const saved = sessionStorage.getItem("influence-api-key");
  if (saved) $("api-key").value = saved;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("influence-api-key", $("api-key").value.trim());
    loadServing();
  });
  $("query-form").addEventListener("submit", runQuery);
  $("generate").addEventListener("click", () => search(true));
  $("detail-close").addEventListener("click", () => $("detail").close());
  $("explain").addEventListener("click", explain);
  $("detail").addEventListener("close", () => {
    const card = document.querySelector(`.card[data-id="${selectedId}"] button`);
    if (card) card.focus();
  });
  loadServing();
  loadModes();
});
