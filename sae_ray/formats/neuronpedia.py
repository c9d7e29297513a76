"""Neuronpedia export: an analysis (sae_ray.analysis.report) as the files Neuronpedia imports.

`export_neuronpedia(sae, analysis, out, model_id, source_set)` writes

    out/README.md                        how to import it
    out/<model_id>/<source_id>/          source_id = "<layer>-<source_set>" (layer: N of blocks.N.…,
        release.jsonl  model.jsonl         else the whole hook name)
        sourceset.jsonl  source.jsonl    one row each (SourceRelease, Model, SourceSet, Source)
        features/batch-<k>.jsonl.gz      one Neuron row per latent, batch_size latents a file
        activations/batch-<k>.jsonl.gz   one Activation row per top and quantile context of those latents
        saelens/                         the SAE (cfg.json + sae_weights.safetensors, `save_saelens`)

Where the layout comes from (read, not copied):
- hijohnnylin/neuronpedia apps/webapp/app/api/admin/import/route.ts: the files it reads under
  <modelId>/<sourceId>/; apps/webapp/lib/db/import.ts: Neuron and Activation rows are inserted as
  JSON records (columns: the first line's keys; unknown keys ignored; an explicit null is kept);
  apps/webapp/prisma/schema.prisma: the columns and which are required (index is a String
  column, so we write it as a string); apps/webapp/lib/utils/s3.ts: the route reads the public
  neuronpedia-datasets bucket, v1/<modelId>/<sourceId>/.
- zazer0/neuronpedia utils/neuronpedia-utils/neuronpedia_utils/db_models/*.py and
  convert-saedashboard-to-neuronpedia-export.py, and jbloomAus/SAEDashboard
  sae_dashboard/neuronpedia/neuronpedia_export.py: the row fields and their defaults, the
  source id, gzip'd JSONL batches, the fallback creator id (the seeded "bot" user).
- jbloomAus/SAEDashboard sae_dashboard/neuronpedia/neuronpedia_converter.py: values rounded to
  3 decimals; top activations have binMin = binContains = -1 and binMax = the top activation;
  interval ones have the interval's bounds and the share of activations in it.
- hijohnnylin/neuronpedia apps/webapp/components/activations-list.tsx sorts contexts by binMax,
  highest first: so top contexts carry the latent's max activation, not -1, as binMax.

Required columns we have no value for get the defaults those db_models use (0, "", []).
"""

from __future__ import annotations

import gzip
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sae_ray.analysis.report import Analysis, Context, LatentReport
from sae_ray.formats.saelens import save_saelens, to_saelens_cfg

DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"
"""The "bot" user a Neuronpedia database is seeded with; every row needs an existing user."""


def source_id_for(hook: str, source_set: str) -> str:
    """"<N>-<source_set>" for a blocks.N.… hook, else "<hook>-<source_set>"."""
    match = re.match(r"blocks\.(\d+)\.", hook)
    return f"{match[1] if match else hook}-{source_set}"


def _r3(x: float | None) -> float:
    return 0.0 if x is None else round(float(x), 3)


def _activation(ctx: Context, rid: str, common: dict[str, Any], bins: tuple[float, float, float]) -> dict[str, Any]:
    values = [_r3(a) for a in ctx.acts]
    top = max(values)
    return {"id": rid, "tokens": ctx.tokens, **common, "maxValue": top, "maxValueTokenIndex": values.index(top),
            "minValue": min(values), "values": values, "dataSource": None, "dataIndex": None,
            "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "lossValues": [],
            "logitContributions": None, "binMin": bins[0], "binMax": bins[1], "binContains": bins[2],
            "qualifyingTokenIndex": ctx.centre}


def _rows(r: LatentReport, source_id: str, common: dict[str, Any]) -> list[dict[str, Any]]:
    """The Activation rows of one latent: its top contexts, then each quantile interval's."""
    prefix = f"{common['modelId']}-{source_id}-{r.index}"
    rows = [_activation(c, f"{prefix}-top-{j}", common, (-1.0, _r3(r.max_act), -1.0)) for j, c in enumerate(r.top)]
    n = sum(len(part) for _, part in r.quantiles)
    for q, (_, part) in enumerate(r.quantiles):
        bins = (_r3(min(c.value for c in part)), _r3(max(c.value for c in part)), round(len(part) / n, 4))
        rows += [_activation(c, f"{prefix}-q{q}-{j}", common, bins) for j, c in enumerate(part)]
    return rows


def _feature(r: LatentReport, common: dict[str, Any], hook: str) -> dict[str, Any]:
    e = r.hist_edges
    return {**common, "maxActApprox": r.max_act, "hasVector": False, "vector": [], "vectorLabel": None,
            "vectorDefaultSteerStrength": 10, "hookName": hook,
            **{k: [] for k in ("topkCosSimIndices", "topkCosSimValues", "neuron_alignment_indices",
                               "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices",
                               "correlated_neurons_pearson", "correlated_neurons_l1", "correlated_features_indices",
                               "correlated_features_pearson", "correlated_features_l1")},
            "neg_str": [t for t, _ in r.suppressed], "neg_values": [_r3(v) for _, v in r.suppressed],
            "pos_str": [t for t, _ in r.promoted], "pos_values": [_r3(v) for _, v in r.promoted],
            "frac_nonzero": r.frequency, "freq_hist_data_bar_heights": [float(c) for c in r.hist_counts],
            "freq_hist_data_bar_values": [round((e[b] + e[b + 1]) / 2, 6) for b in range(len(e) - 1)],
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": []}


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows).encode()


README = """# Neuronpedia export ({model_id} / {source_id})

Written by sae-ray (`sae_ray.formats.neuronpedia.export_neuronpedia`) from the analysis of
{sae}. Layout: `{model_id}/{source_id}/` holds release.jsonl, model.jsonl, sourceset.jsonl,
source.jsonl (one row each), features/batch-*.jsonl.gz (one Neuron row per latent),
activations/batch-*.jsonl.gz (its top and quantile contexts) and saelens/ (the SAE weights,
SAELens format). Rows name creatorId {creator_id!r}, which must be a user of the database.

How to import:
- Neuronpedia's admin import, GET /api/admin/import?modelId={model_id}&sourceId={source_id}
  (localhost or an admin user), reads exactly this folder, but from the public
  `neuronpedia-datasets` bucket under `v1/{model_id}/{source_id}/`. To publish on neuronpedia.org,
  hand the folder to the Neuronpedia maintainers (https://github.com/hijohnnylin/neuronpedia).
- On a local instance, make that route read your copy (its downloads are in
  apps/webapp/lib/utils/s3.ts), or insert the rows as it does (apps/webapp/lib/db/import.ts).

The layout follows hijohnnylin/neuronpedia (apps/webapp/app/api/admin/import/route.ts,
apps/webapp/prisma/schema.prisma), zazer0/neuronpedia (utils/neuronpedia-utils) and
jbloomAus/SAEDashboard (sae_dashboard/neuronpedia/neuronpedia_export.py).
"""


def export_neuronpedia(sae, analysis: Analysis, out: str | Path, model_id: str, source_set: str,
                       latents: list[int] | None = None, batch_size: int = 128,
                       creator_id: str = DEFAULT_CREATOR_ID, creator_name: str = "sae-ray") -> Path:
    """Write `analysis` (of `sae`) as a Neuronpedia import folder (module docstring); returns
    out/<model_id>/<source_id>. latents: which ones (default all). ValueError for a latent out
    of range, an SAE whose d_sae is not the analysis's, or a batch_size below 1."""
    meta = analysis.meta
    if sae.n_stack is not None:
        raise ValueError(f"this is a stack of {sae.n_stack} SAEs; export each one of sae.unstack() with its analysis")
    if sae.cfg.d_sae != analysis.d_sae:
        raise ValueError(f"the SAE has d_sae={sae.cfg.d_sae} but the analysis at {analysis.path} has "
                         f"d_sae={analysis.d_sae} ({meta.sae}): export the SAE the analysis was made of")
    latents = list(range(analysis.d_sae)) if latents is None else [analysis.check_latent(i) for i in latents]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected an integer >= 1")
    source_id = source_id_for(meta.hook, source_set)
    root = Path(out)
    src = root / model_id / source_id
    now = datetime.now(timezone.utc).isoformat()
    who = {"creatorId": creator_id, "createdAt": now}
    description = f"{meta.architecture} SAE, {meta.d_sae} latents, {meta.hook}"
    for name, row in {
        "release.jsonl": {"name": source_set, "description": description, "descriptionShort": description,
                          "urls": [], "creatorName": creator_name, "creatorNameShort": creator_name,
                          "creatorEmail": None, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
                          "defaultSourceSetName": source_set, "defaultSourceId": source_id,
                          "defaultUmapSourceIds": [], **who},
        "model.jsonl": {"id": model_id, "instruct": model_id.endswith("-it"), "displayNameShort": model_id,
                        "displayName": meta.model, "tlensId": None, "dimension": meta.d_in, "visibility": "PUBLIC",
                        "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False,
                        "layers": 0, "neuronsPerLayer": 0, "owner": "", "website": None, **who, "updatedAt": now},
        "sourceset.jsonl": {"modelId": model_id, "name": source_set, "hasDashboards": True, "visibility": "PUBLIC",
                            "description": description, "type": "", "creatorName": creator_name, "urls": [],
                            "creatorEmail": None, "releaseName": source_set, "defaultOfModelId": None,
                            "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                            "showHeadAttribution": False, "showUmap": False, **who},
        "source.jsonl": {"id": source_id, "modelId": model_id, "setName": source_set, "hasDashboards": True,
                         "inferenceEnabled": False, "saelensConfig": to_saelens_cfg(sae.cfg, sae.saved_architecture),
                         "saelensRelease": None, "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None,
                         "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False,
                         "hasUmapLogSparsity": False, "hasUmapClusters": False, "num_prompts": None,
                         "num_tokens_in_prompt": sae.cfg.context_size or None, "dataset": sae.cfg.dataset_path or None,
                         "notes": f"sae-ray analysis of {meta.sae}: {meta.rows} rows ({meta.split} split)", **who},
    }.items():
        src.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(json.dumps(row, allow_nan=False) + "\n")
    for sub in ("features", "activations"):
        (src / sub).mkdir(exist_ok=True)
        for old in (src / sub).glob("batch-*.jsonl.gz"):  # a re-export must not keep stale batches
            old.unlink()
    for k, start in enumerate(range(0, len(latents), batch_size)):
        features, activations = [], []
        for i in latents[start:start + batch_size]:
            r = analysis.latent(i)
            common = {"modelId": model_id, "layer": source_id, "index": str(i), **who}
            features.append(_feature(r, common, meta.hook))
            activations += _rows(r, source_id, common)
        (src / "features" / f"batch-{k}.jsonl.gz").write_bytes(gzip.compress(_jsonl(features), mtime=0))
        if activations:  # the importer reads an empty file's first line as JSON and fails
            (src / "activations" / f"batch-{k}.jsonl.gz").write_bytes(gzip.compress(_jsonl(activations), mtime=0))
    save_saelens(sae, src / "saelens")
    (root / "README.md").write_text(README.format(model_id=model_id, source_id=source_id, sae=meta.sae,
                                                   creator_id=creator_id))
    return src
