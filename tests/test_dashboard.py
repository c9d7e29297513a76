"""The static dashboard (sae_ray.analysis.dashboard): pages, escaping, the server, and a real headless Chromium.

The analysis is synthetic (6 latents; latent 5 never fired; latent 0's top context is centred on the
token `<script>alert(1)</script>`). The browser test skips, saying why, when no Chromium is installed;
it leaves a screenshot of a latent page in tests/artifacts/.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch

from sae_ray.analysis import dashboard
from sae_ray.analysis.dashboard import serve_dashboard, write_dashboard
from sae_ray.analysis.report import Analysis, AnalysisMeta, ConceptHit, empty_contexts, write_analysis, write_concepts

D, K, S, W = 6, 3, 8, 2
EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
VOCAB = {0: "the", 1: EVIL, 2: " cat", 3: "&amp;", 4: "\n", 5: " dog"}
ARTIFACTS = Path(__file__).parent / "artifacts"


def make_analysis(path: Path, lens: bool = True) -> Analysis:
    """A small analysis directory: latent i has frequency (5 - i) / 10 and max activation 5 - i."""
    meta = AnalysisMeta(sae="models:/tiny-sae/1", model="<b>tiny</b>", hook="blocks.0.hook_resid_post", d_in=4,
                        d_sae=D, architecture="topk", split="eval", rows=100, top_k=K, samples=S, window=W)
    fired = torch.arange(D) < D - 1
    stats = {"frequency": (D - 1 - torch.arange(D)).float() / 10, "max_act": (D - 1 - torch.arange(D)).float(),
             "mean_act": fired.float() * 0.5, "hist_edges": torch.logspace(-3, 2, 11),
             "hist_counts": torch.arange(10).repeat(D, 1) * fired[:, None]}
    ctx = {**empty_contexts(D, K, 2 * W + 1, "top"), **empty_contexts(D, S, 2 * W + 1, "sample")}
    for kind, n in (("top", K), ("sample", S)):
        for i in range(D - 1):
            ctx[f"{kind}_values"][i] = torch.linspace(float(D - 1 - i), 0.1, n)
            ctx[f"{kind}_rows"][i] = torch.arange(n)
            ctx[f"{kind}_tokens"][i] = (torch.arange(2 * W + 1) + i + torch.arange(n)[:, None]).int() % len(VOCAB)
            ctx[f"{kind}_acts"][i] = torch.rand(n, 2 * W + 1).half()
    ctx["top_tokens"][0, 0, W] = 1  # latent 0's top context is centred on EVIL
    ctx["top_acts"][0, 0, 0] = float("nan")  # a token without a buffer row
    lens_t = None
    if lens:
        lens_t = {"promoted_ids": torch.tensor([[1, 2]] * D), "promoted_values": torch.tensor([[2.0, 1.0]] * D),
                  "suppressed_ids": torch.tensor([[5, 0]] * D), "suppressed_values": torch.tensor([[-2.0, -1.0]] * D)}
    write_analysis(path, meta, stats, ctx, VOCAB, lens_t)
    write_concepts(path, {"animals": [ConceptHit(latent=0, precision=0.9, recall=0.5, rate_in=0.4,
                                                 rate_out=0.01, mean_ratio=7.0)]})
    return Analysis.open(path)


LINKS = {"registry": "models:/tiny-sae/1", "run": "http://127.0.0.1:5000/#/runs/abc", "bad": "javascript:alert(1)"}


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> Analysis:
    return make_analysis(tmp_path_factory.mktemp("analysis"))


@pytest.fixture(scope="module")
def site(analysis, tmp_path_factory) -> Path:
    """The dashboard of the default latents (0..4), with LINKS."""
    return write_dashboard(analysis, tmp_path_factory.mktemp("site"), links=LINKS)


def latent_links(html: str) -> list[int]:
    """The latent ids of the index table's links, in order."""
    return [int(i) for i in re.findall(r'<a href="latents/(\d+)\.html">', html)]


def index_rows(html: str) -> list[dict]:
    """The JSON rows embedded in index.html, parsed back."""
    return json.loads(html.split("const ROWS = ", 1)[1].split(";\n", 1)[0])


def test_pages_for_the_latents_that_fired(analysis, site, tmp_path):
    assert sorted(p.name for p in (site / "latents").iterdir()) == [f"{i}.html" for i in range(D - 1)]
    rows = index_rows((site / "index.html").read_text())
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]  # most frequent first
    assert rows[0]["tokens"][0] == EVIL and rows[0]["frequency"] == pytest.approx(0.5)
    assert "more latents fired" not in (site / "index.html").read_text()
    # explicit latents: a never-fired one gets a page too
    out = write_dashboard(analysis, tmp_path / "s", latents=[5, 2])
    assert sorted(p.name for p in (out / "latents").iterdir()) == ["2.html", "5.html"]
    assert "No firing rows." in (out / "latents" / "5.html").read_text()


def test_cap_leaves_a_note(analysis, tmp_path, monkeypatch):
    monkeypatch.setattr(dashboard, "MAX_LATENTS", 2)
    out = write_dashboard(analysis, tmp_path / "s")
    assert sorted(p.name for p in (out / "latents").iterdir()) == ["0.html", "1.html"]
    assert "3 more latents fired but have no page: only the 2 most frequent are here." in (out / "index.html").read_text()


def test_everything_is_escaped(site):
    page = (site / "latents" / "0.html").read_text()
    assert ESCAPED in page and "&amp;amp;" in page and "&lt;b&gt;tiny&lt;/b&gt;" in page
    assert "↵" in page and "\n</span>" not in page  # the newline token is visible
    for p in [site / "index.html", *(site / "latents").iterdir()]:
        html = p.read_text()
        assert "<script>alert" not in html and "<b>tiny" not in html, p
    index = (site / "index.html").read_text()
    assert index.count("<script") == 1 and index.count("</script") == 1  # nothing in the JSON closes the block
    script = index.split("<script>", 1)[1].split("</script>", 1)[0]
    assert "<" not in script.split(";\n", 1)[0] and "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in script
    assert "\\u0026amp;" in script


def test_latent_page_sections(site, tmp_path):
    page = (site / "latents" / "0.html").read_text()
    for text in ("Latent 0", "<svg", "Top contexts", "interval 1/4", "Logit lens", "promoted", "suppressed",
                 "Concepts", "animals", 'href="../index.html"', "blocks.0.hook_resid_post", "models:/tiny-sae/1"):
        assert text in page, text
    assert '<span class="tok c" style="background:rgba(255,102,0,' in page  # the centre, outlined
    assert 'title="no activation (no buffer row)"' in page
    assert '<a href="http://127.0.0.1:5000/#/runs/abc">' in page and "<code>models:/tiny-sae/1</code>" in page
    assert 'href="javascript' not in page  # only http(s) links become <a>
    assert "Concepts" not in (site / "latents" / "1.html").read_text()  # no hits for latent 1
    out = write_dashboard(make_analysis(tmp_path / "a", lens=False), tmp_path / "s", latents=[0])
    assert "Logit lens" not in (out / "latents" / "0.html").read_text()


@pytest.mark.parametrize("bad", [D, -1, 2.0])
def test_latent_out_of_range(analysis, tmp_path, bad):
    with pytest.raises(ValueError, match=rf"0\.\.{D - 1}"):
        write_dashboard(analysis, tmp_path / "s", latents=[0, bad])


def test_serve_binds_localhost_by_default(site):
    assert inspect.signature(serve_dashboard).parameters["host"].default == "127.0.0.1"
    server = serve_dashboard(site, port=0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/latents/0.html", timeout=10) as r:
            assert r.status == 200 and ESCAPED in r.read().decode()
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """`chromium(*args) -> stdout` of a headless Chromium run (60 s at most); skips when none is installed."""
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if binary is None:
        pytest.skip("Chromium not installed: apt-get install chromium")
    profile = tmp_path_factory.mktemp("chromium-profile")

    def run(*args: str) -> str:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               f"--user-data-dir={profile}", "--virtual-time-budget=2000", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run


def test_in_a_real_browser(site, chromium):
    server = serve_dashboard(site, port=0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        dom = chromium("--dump-dom", f"{url}/index.html")
        assert dom.count('<tr class="row">') == D - 1, dom[:3000]  # the rows JS rendered from the JSON
        assert 'href="latents/0.html"' in dom and "5 of 5 latents" in dom
        assert ESCAPED in dom and "<script>alert" not in dom and dom.count("<script") == 1
        order = latent_links(dom)
        assert order == [0, 1, 2, 3, 4]  # sorted by frequency, highest first

        dom = chromium("--dump-dom", f"{url}/index.html#dog")  # the search box, filled from the URL
        shown = latent_links(dom)
        assert shown and all(" dog" in r["tokens"] for r in index_rows((site / "index.html").read_text())
                             if r["id"] in shown)
        assert f"{len(shown)} of 5 latents" in dom and len(shown) < D - 1

        dom = chromium("--dump-dom", f"{url}/latents/0.html")
        assert "Top contexts" in dom and f'<span class="tok c"' in dom and "> cat</span>" in dom and "↵" in dom
        assert f"{ESCAPED}</span>" in dom  # the centre of the top context, as text
        assert "<script" not in dom  # the token is text, never an element

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard_latent_0.png"
        shot.unlink(missing_ok=True)
        chromium(f"--screenshot={shot}", "--window-size=1200,900", f"{url}/latents/0.html")
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    finally:
        server.shutdown()
        server.server_close()
