"""Neuronpedia export (sae_ray.formats.neuronpedia): the files, read back, and the SAE in them."""

from __future__ import annotations

import gzip
import json
from datetime import datetime

import pytest
import torch

import sae_ray
from sae_ray.analysis.report import Analysis, AnalysisMeta, empty_contexts, write_analysis
from sae_ray.formats.neuronpedia import export_neuronpedia
from sae_ray.sae import SAEConfig, create_sae

D, D_IN, K, S, W, H = 8, 4, 3, 8, 2, 10
DEAD = (6, 7)  # latents that never fired: no contexts


def make_analysis(path) -> Analysis:
    g = torch.Generator().manual_seed(0)
    meta = AnalysisMeta(sae="models:/tiny/1", model="tiny-model", hook="blocks.0.hook_resid_post", d_in=D_IN,
                        d_sae=D, architecture="topk", split="eval", rows=100, top_k=K, samples=S, window=W)
    stats = {"frequency": torch.rand(D, generator=g), "mean_act": torch.rand(D, generator=g),
             "max_act": torch.rand(D, generator=g) * 5 + 1, "hist_counts": torch.randint(0, 9, (D, H), generator=g),
             "hist_edges": torch.logspace(-3, 2, H + 1)}
    ctx = {**empty_contexts(D, K, 2 * W + 1, "top"), **empty_contexts(D, S, 2 * W + 1, "sample")}
    for kind, n in (("top", K), ("sample", S)):
        ctx[f"{kind}_values"][:] = torch.rand(D, n, generator=g)
        ctx[f"{kind}_rows"][:] = torch.arange(n)
        ctx[f"{kind}_tokens"][:] = torch.randint(0, 5, (D, n, 2 * W + 1), generator=g, dtype=torch.int32)
        ctx[f"{kind}_acts"][:] = torch.rand(D, n, 2 * W + 1, generator=g).half()
        ctx[f"{kind}_rows"][list(DEAD)] = -1
    ctx["top_rows"][0, 2] = -1  # an empty slot
    ctx["top_acts"][1, 0, 0] = float("nan")  # a token with no buffer row: value 0 in the export
    ctx["top_tokens"][2, 0, 0] = -1  # outside the text: left out
    vocab = {0: "the", 1: "<b>", 2: " cat", 3: "&amp;", 4: "\n"}
    lens = {"promoted_ids": torch.randint(0, 5, (D, 3), generator=g), "promoted_values": torch.rand(D, 3, generator=g),
            "suppressed_ids": torch.randint(0, 5, (D, 3), generator=g),
            "suppressed_values": -torch.rand(D, 3, generator=g)}
    return Analysis.open(write_analysis(path, meta, stats, ctx, vocab, lens))


def make_sae(d_sae: int = D):
    cfg = SAEConfig("topk", D_IN, d_sae, k=2, model_name="tiny-model", hook_name="blocks.0.hook_resid_post")
    return create_sae(cfg)


def read_gz(folder) -> list[list[dict]]:
    return [[json.loads(line) for line in gzip.decompress(p.read_bytes()).decode().splitlines()]
            for p in sorted(folder.glob("batch-*.jsonl.gz"))]


def first_top(rows, index):
    """The row of latent `index`'s first top context."""
    return next(r for r in rows if r["index"] == index and r["id"].endswith("-top-0"))


@pytest.fixture
def exported(tmp_path):
    analysis, sae = make_analysis(tmp_path / "analysis"), make_sae()
    src = export_neuronpedia(sae, analysis, tmp_path / "np", "tiny-model", "sae-ray-topk", batch_size=3)
    return analysis, sae, src


def test_layout_and_metadata_rows(exported):
    _, _, src = exported
    assert src.name == "0-sae-ray-topk" and src.parent.name == "tiny-model"
    assert (src.parent.parent / "README.md").is_file()
    want = {"model.jsonl": {"id", "instruct", "creatorId", "displayName", "layers", "neuronsPerLayer", "owner"},
            "release.jsonl": {"name", "description", "creatorName", "creatorId", "urls"},
            "sourceset.jsonl": {"modelId", "name", "creatorId", "description", "creatorName", "releaseName",
                                "visibility"},
            "source.jsonl": {"id", "modelId", "setName", "creatorId", "hasDashboards", "saelensConfig", "hfRepoId",
                             "hfFolderId", "visibility", "num_prompts", "num_tokens_in_prompt", "dataset"}}
    for name, keys in want.items():
        lines = (src / name).read_text().splitlines()
        assert len(lines) == 1
        row = json.loads(lines[0])
        assert keys <= row.keys(), (name, keys - row.keys())
        datetime.fromisoformat(row["createdAt"])
    source = json.loads((src / "source.jsonl").read_text())
    assert source["id"] == "0-sae-ray-topk" and source["setName"] == "sae-ray-topk"
    assert source["saelensConfig"]["d_sae"] == D


def test_feature_rows(exported):
    analysis, _, src = exported
    batches = read_gz(src / "features")
    assert [len(b) for b in batches] == [3, 3, 2]
    rows = [r for b in batches for r in b]
    assert [r["index"] for r in rows] == [str(i) for i in range(D)]  # Neuron.index is a String column
    for b in batches:  # the importer takes its columns from a file's first line
        assert all(r.keys() == b[0].keys() for r in b)
    for r in rows:
        rep = analysis.latent(int(r["index"]))
        assert (r["modelId"], r["layer"], r["hookName"]) == ("tiny-model", "0-sae-ray-topk", "blocks.0.hook_resid_post")
        assert r["hasVector"] is False and r["vector"] == [] and r["topkCosSimIndices"] == []
        assert r["maxActApprox"] == pytest.approx(rep.max_act) and r["frac_nonzero"] == pytest.approx(rep.frequency)
        assert r["freq_hist_data_bar_heights"] == rep.hist_counts
        e = rep.hist_edges
        assert r["freq_hist_data_bar_values"] == pytest.approx([(e[b] + e[b + 1]) / 2 for b in range(H)], rel=1e-4)
        assert r["pos_str"] == [t for t, _ in rep.promoted] and r["neg_str"] == [t for t, _ in rep.suppressed]
        assert all(isinstance(v, float) for v in r["pos_values"] + r["neg_values"])
        datetime.fromisoformat(r["createdAt"])


def test_activation_rows(exported):
    analysis, _, src = exported
    batches = read_gz(src / "activations")
    rows = [r for b in batches for r in b]
    assert len({r["id"] for r in rows}) == len(rows)
    for b in batches:
        assert all(r.keys() == b[0].keys() for r in b)
    for i in range(D):
        rep = analysis.latent(i)
        mine = [r for r in rows if r["index"] == str(i)]
        contexts = rep.top + [c for _, part in rep.quantiles for c in part]
        assert len(mine) == len(contexts) == (0 if i in DEAD else len(rep.top) + S)
        for r, c in zip(mine, contexts):
            assert r["tokens"] == c.tokens and r["qualifyingTokenIndex"] == c.centre
            assert r["values"] == [0.0 if a is None else round(a, 3) for a in c.acts]
            assert r["maxValueTokenIndex"] == int(torch.tensor(r["values"]).argmax())
            assert r["maxValue"] == max(r["values"]) and r["minValue"] == min(r["values"])
            assert r["dfaValues"] == [] and r["dataSource"] is None
        for r in mine[:len(rep.top)]:
            assert r["binMin"] == -1 and r["binContains"] == -1 and r["binMax"] == round(rep.max_act, 3)
        for r in mine[len(rep.top):]:
            assert 0 <= r["binMin"] <= r["binMax"] and 0 < r["binContains"] <= 1
    assert len([r for r in rows if r["index"] == "0"]) == K - 1 + S  # the empty slot is left out
    assert first_top(rows, "1")["values"][0] == 0.0  # NaN act -> 0
    assert len(first_top(rows, "2")["tokens"]) == 2 * W  # a token outside the text is left out
    assert len(batches) == 2  # batch 2 holds only the dead latents 6 and 7: no activations file


def test_saelens_folder_loads_back(exported):
    _, sae, src = exported
    loaded = sae_ray.load_sae(str(src / "saelens"))
    assert torch.equal(loaded.W_dec.detach(), sae.W_dec.detach())


def test_latent_subset(tmp_path):
    analysis = make_analysis(tmp_path / "a")
    src = export_neuronpedia(make_sae(), analysis, tmp_path / "np", "m", "s", latents=[5, 1])
    assert [r["index"] for b in read_gz(src / "features") for r in b] == ["5", "1"]


def test_bad_input(tmp_path):
    analysis = make_analysis(tmp_path / "a")
    with pytest.raises(ValueError, match=r"d_sae=16.*d_sae=8"):
        export_neuronpedia(make_sae(16), analysis, tmp_path / "np", "m", "s")
    with pytest.raises(ValueError, match="latent 9 is out of range"):
        export_neuronpedia(make_sae(), analysis, tmp_path / "np", "m", "s", latents=[1, 9])
    assert not (tmp_path / "np").exists()  # nothing written before the checks
