"""A static HTML dashboard of an analysis directory (sae_ray.analysis.report), and a local server for it.

`write_dashboard(analysis, out)` writes plain HTML with a little inline JS, no build step and nothing
fetched from elsewhere, so the folder can be opened from disk, served, or logged as an MLflow artifact:

    index.html         the meta (SAE, model, hook, rows, split), the links, and a table of the latents
                       (id, frequency, max and mean activation, the centre tokens of its top contexts),
                       rendered by JS from a JSON of its rows embedded in the page: sortable by clicking
                       a column header, filtered by a search box (a latent id, or text in those tokens;
                       index.html#TEXT opens with TEXT in it)
    latents/<i>.html   one latent: its statistics, an SVG histogram of its activations, its top contexts
                       and its sampled contexts by activation interval (each token shaded by the latent's
                       activation there, value in its tooltip, the context's centre outlined), the logit
                       lens and concept hits (when there are any), the meta, and the links

Every text from the corpus, the vocab or the meta goes through html.escape; whitespace tokens are
shown visibly (newline as ↵). `serve_dashboard(dir)` serves such a folder on 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import threading
from html import escape
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sae_ray.analysis.report import Analysis, AnalysisMeta, Context, LatentReport

MAX_LATENTS = 1000
"""By default the dashboard has pages for at most this many latents, the most frequent ones."""

STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:70em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
th.sort{cursor:pointer;background:#eee}.tok{white-space:pre;font-family:monospace;padding:0 1px}
.tok.c{outline:2px solid #06c}.ctx{margin:3px 0;line-height:1.8}.val{color:#666;font-size:85%;margin-right:8px}
.note{color:#a50}svg rect{fill:#f60}"""


def show(token: str) -> str:
    """A token's text made visible (newline ↵, tab ⇥, CR ␍, a blank token's spaces ·, empty ∅); not escaped."""
    t = token.replace("\r", "␍").replace("\n", "↵").replace("\t", "⇥")
    return "∅" if t == "" else t.replace(" ", "·") if not t.strip() else t


def _page(title: str, body: str) -> str:
    """A whole HTML document around `body` (title escaped here)."""
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><link rel="icon" href="data:,">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table (no header row if `header` is empty); every cell is escaped."""
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>\n" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>\n" for r in rows)
    return f"<table>{head}{body}</table>"


def _meta_and_links(meta: AnalysisMeta, links: dict[str, str]) -> str:
    """The meta table, then the links (http(s) values as <a>, others such as models:/NAME/VERSION as text)."""
    rows = [[k, str(getattr(meta, k))] for k in ("sae", "model", "hook", "architecture", "d_sae", "rows",
                                                 "split", "registry", "run_id") if getattr(meta, k) is not None]
    out = "<h2>Analysis</h2>" + _table([], rows)
    if links:
        items = "".join(
            f'<li>{escape(k)}: <a href="{escape(v)}">{escape(v)}</a></li>' if v.startswith(("http://", "https://"))
            else f"<li>{escape(k)}: <code>{escape(v)}</code></li>" for k, v in links.items())
        out += f"<h2>Links</h2><ul>{items}</ul>"
    return out


def _context(c: Context, max_act: float) -> str:
    """One context as a line of token spans: background alpha = act / max_act, title = act, centre outlined."""
    spans = []
    for j, (tok, act) in enumerate(zip(c.tokens, c.acts)):
        alpha = 0.0 if act is None or max_act <= 0 else min(max(act / max_act, 0.0), 1.0)
        title = "no activation (no buffer row)" if act is None else f"{act:.4g}"
        cls = "tok c" if j == c.centre else "tok"
        spans.append(f'<span class="{cls}" style="background:rgba(255,102,0,{alpha:.3f})" '
                     f'title="{title}">{escape(show(tok))}</span>')
    return f'<div class="ctx"><span class="val">{c.value:.4g}</span>{"".join(spans)}</div>'


def _histogram(edges: list[float], counts: list[int]) -> str:
    """Inline SVG bars, one per bin (the edges are log-spaced, so the bars are equally wide)."""
    top = max(counts, default=0)
    if top == 0:
        return "<p>No firing rows.</p>"
    w, h, bw = 600, 120, 600 / len(counts)
    bars = "".join(f'<rect x="{k * bw:.1f}" y="{h - 100 * n / top:.1f}" width="{bw * 0.9:.1f}" '
                   f'height="{100 * n / top:.1f}"><title>{edges[k]:.3g} to {edges[k + 1]:.3g}: {n}</title></rect>'
                   for k, n in enumerate(counts))
    labels = (f'<text x="0" y="{h + 14}" font-size="11">{edges[0]:.3g}</text>'
              f'<text x="{w}" y="{h + 14}" font-size="11" text-anchor="end">{edges[-1]:.3g}</text>')
    return f'<svg width="{w}" height="{h + 18}" role="img" aria-label="activation histogram">{bars}{labels}</svg>'


def latent_page(r: LatentReport, meta: AnalysisMeta, links: dict[str, str]) -> str:
    """The HTML of latents/<r.index>.html."""
    parts = [f'<p><a href="../index.html">&larr; all latents</a></p><h1>Latent {r.index}</h1>',
             _table(["frequency", "mean activation", "max activation"],
                    [[f"{r.frequency:.4g}", f"{r.mean_act:.4g}", f"{r.max_act:.4g}"]]),
             "<h2>Activations (firing rows, log-spaced bins)</h2>", _histogram(r.hist_edges, r.hist_counts),
             "<h2>Top contexts</h2>", "".join(_context(c, r.max_act) for c in r.top) or "<p>None.</p>"]
    if r.quantiles:
        parts.append("<h2>Sampled contexts by activation interval</h2>")
        for label, contexts in r.quantiles:
            parts.append(f"<h3>{escape(label)}</h3>" + "".join(_context(c, r.max_act) for c in contexts))
    if r.promoted or r.suppressed:
        parts.append("<h2>Logit lens</h2>")
        for name, pairs in (("promoted", r.promoted), ("suppressed", r.suppressed)):
            rows = [[show(t), f"{v:.4g}"] for t, v in pairs]
            parts.append(f"<h3>{name}</h3>" + _table(["token", "logit change"], rows))
    if r.concepts:
        parts.append("<h2>Concepts</h2>" + _table(
            ["concept", "precision", "recall", "rate in", "rate out", "mean ratio"],
            [[n, *(f"{x:.3g}" for x in (h.precision, h.recall, h.rate_in, h.rate_out, h.mean_ratio))]
             for n, h in r.concepts]))
    parts.append(_meta_and_links(meta, links))
    return _page(f"Latent {r.index} · {meta.sae}", "\n".join(parts))


INDEX_JS = """
let key = "frequency", desc = true;
function cell(tr, child) { const td = document.createElement("td"); td.append(child); tr.append(td); }
function render() {
  const q = document.getElementById("q").value.trim().toLowerCase();
  const rows = ROWS.filter(r => !q || String(r.id) === q || r.tokens.some(t => t.toLowerCase().includes(q)));
  rows.sort((a, b) => desc ? b[key] - a[key] : a[key] - b[key]);
  const body = document.getElementById("rows");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr"); tr.className = "row";
    const a = document.createElement("a"); a.href = "latents/" + r.id + ".html"; a.textContent = r.id;
    cell(tr, a);
    for (const k of ["frequency", "max_act", "mean_act"]) cell(tr, r[k].toPrecision(4));
    cell(tr, r.tokens.slice(0, 3).join(" | "));
    body.append(tr);
  }
  document.getElementById("count").textContent = rows.length + " of " + ROWS.length + " latents";
}
for (const th of document.querySelectorAll("th.sort")) th.onclick = () => {
  desc = th.dataset.key === key ? !desc : true; key = th.dataset.key; render(); };
const q = document.getElementById("q");
q.value = decodeURIComponent(location.hash.slice(1));  // index.html#cat opens filtered on "cat"
q.oninput = render;
render();
"""


def script_json(value: object) -> str:
    """JSON safe to embed in a <script> block: <, > and & written as \\u escapes."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def index_page(rows: list[dict], meta: AnalysisMeta, links: dict[str, str], left_out: int) -> str:
    """The HTML of index.html; `rows` are {id, frequency, max_act, mean_act, tokens: [str]}."""
    note = (f'<p class="note">{left_out} more latents fired but have no page: only the {len(rows)} '
            "most frequent are here.</p>" if left_out else "")
    heads = "".join(f'<th class="sort" data-key="{k}">{n}</th>' for k, n in
                    (("id", "latent"), ("frequency", "frequency"), ("max_act", "max act"), ("mean_act", "mean act")))
    body = (f"<h1>Latents of {escape(meta.sae)}</h1>{note}"
            '<p><input id="q" placeholder="latent id or token text" size="40"> <span id="count"></span></p>'
            f'<table><thead><tr>{heads}<th>top tokens</th></tr></thead><tbody id="rows"></tbody></table>'
            "<noscript>The table needs JavaScript; the pages are under latents/.</noscript>"
            f"{_meta_and_links(meta, links)}"
            f"<script>const ROWS = {script_json(rows)};{INDEX_JS}</script>")
    return _page(f"Latents · {meta.sae}", body)


def write_dashboard(analysis: Analysis, out: str | Path, latents: list[int] | None = None,
                    links: dict[str, str] | None = None) -> Path:
    """Write the site into `out` (index.html, latents/<i>.html); returns `out`.

    `latents`: the latents to give pages (ValueError if one is out of range); default every latent that
    fired, the MAX_LATENTS most frequent if more, with a note on the index of how many were left out.
    `links`: {name: url or reference} shown on every page, e.g. {"registry": "models:/NAME/VERSION"}.
    """
    links = dict(links or {})
    freq = analysis.stats["frequency"]
    left_out = 0
    if latents is None:
        fired = sorted((i for i in range(analysis.d_sae) if float(freq[i]) > 0), key=lambda i: -float(freq[i]))
        latents, left_out = fired[:MAX_LATENTS], max(len(fired) - MAX_LATENTS, 0)
    else:
        latents = [analysis.check_latent(i) for i in latents]
    out = Path(out)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in latents:
        r = analysis.latent(i)
        (out / "latents" / f"{i}.html").write_text(latent_page(r, analysis.meta, links), encoding="utf-8")
        tokens = list(dict.fromkeys(show(c.tokens[c.centre]) for c in r.top))
        rows.append({"id": i, "frequency": r.frequency, "max_act": r.max_act, "mean_act": r.mean_act, "tokens": tokens})
    (out / "index.html").write_text(index_page(rows, analysis.meta, links, left_out), encoding="utf-8")
    return out


def serve_dashboard(directory: str | Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """Serve `directory` over HTTP from a daemon thread; returns the server (port 0: any free one, see
    `server.server_address`; stop it with `server.shutdown()`)."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(directory))
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="sae-ray-dashboard").start()
    return server
