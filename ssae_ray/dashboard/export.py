"""The Neuronpedia export: per SAE the folder SAEDashboard's exporter writes and Neuronpedia's importer
reads, with the values SAEDashboard would give (github.com/jbloomAus/SAEDashboard and
github.com/hijohnnylin/neuronpedia, cited by path):

    <out>/<model id>/<layer>-<source set>/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl
        features/batch-<n>.jsonl.gz     one Neuron row per feature that fires
        activations/batch-<n>.jsonl.gz  its Activation rows (top tokens, then interval samples)
        skipped_indexes.json            the features left out (never fire), as SAEDashboard records them

Rows carry the fields of the dataclasses of `sae_dashboard/neuronpedia/neuronpedia_export.py`
(`SourceRelease`, `Model`, `SourceSet`, `Source`, `Feature`, `Activation`), filled as
`export_neuronpedia_dashboards` and `neuronpedia_converter.NeuronpediaConverter` fill them from the
runner's data (`ssae_ray/dashboard/stats.py` computes that data). Neuronpedia's importer
(`apps/webapp/app/api/admin/import/route.ts`) creates release, model, source set and source with
Prisma's `create` when none with that key exists (so every field must be a column of the model in
`apps/webapp/prisma/schema.prisma`, and `creatorId` an existing user), then inserts each features
file into `Neuron` and each activations file into `Activation` with `INSERT ... SELECT FROM
jsonb_to_recordset(...) ON CONFLICT DO NOTHING` (`apps/webapp/lib/db/import.ts`,
`importJsonlString`, which reads the columns from a file's first line: no file may be empty).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ssae_ray.collect import histc_centres
from ssae_ray.config import Config
from ssae_ray.dashboard.stats import FeatureStats
from ssae_ray.eval.logit_lens import FeatureLogits

HTML_ANOMALIES = {
    "âĢĶ": "—", "âĢĵ": "–", "âĢľ": "“", "âĢĿ": "”", "âĢĺ": "‘", "âĢĻ": "’", "âĢĭ": " ",
    "Ġ": " ", "Ċ": "\n", "ĉ": "\t",
}  # fmt: skip
"""The swaps SAEDashboard makes in vocabulary strings (`neuronpedia_runner.py`, `HTML_ANOMALIES`)."""
OUT_OF_RANGE_TOKEN = "<|outofrange|>"
"""The string of an id past the tokenizer's vocabulary (`neuronpedia_runner.py`, `get_vocab_dict`)."""


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def layer_of(hook: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook)
    if not m:
        raise ValueError(f"hook {hook!r} names no layer (expected blocks.<L>.<hook point>)")
    return int(m.group(1))


def vocab_strings(tokenizer: Any, vocab_size: int) -> list[str]:
    """SAEDashboard's `get_vocab_dict` (`neuronpedia_runner.py`) as a list: each id's vocabulary
    string (`tokenizer.vocab`, so a SentencePiece word keeps its `▁` and a byte-level BPE word its
    leading space) with `HTML_ANOMALIES` swapped, `OUT_OF_RANGE_TOKEN` up to the model's vocab size."""
    vocab = tokenizer.get_vocab()
    out = [OUT_OF_RANGE_TOKEN] * max(vocab_size, max(vocab.values(), default=-1) + 1)
    for s, i in vocab.items():
        if i < vocab_size:  # `to_str_tokens_safe`: ids past the model's vocabulary are out of range
            for bad, good in HTML_ANOMALIES.items():
                s = s.replace(bad, good)
            out[i] = s
    return out


def default_model_id(source: str) -> str:
    """Neuronpedia's model ids are the Hub name without the organisation, lower-cased
    (`google/gemma-2-2b` -> `gemma-2-2b`, `EleutherAI/pythia-70m-deduped` -> `pythia-70m-deduped`)."""
    return re.split(r"[/:]", source.rstrip("/"))[-1].lower()


def dataset_id(cfg: Config) -> str | None:
    """The in-domain test source's Hub dataset id, when it is one (not a local file or folder)."""
    np_cfg, c = cfg.dashboard.neuronpedia, cfg.corpus
    if np_cfg.dataset:
        return np_cfg.dataset
    src = c.sources.get("test")
    path = src.path if src is not None else c.test_path
    if path and re.fullmatch(r"[\w.\-]+/[\w.\-]+", path) and not Path(path).exists():
        return path
    return None


class Source(NamedTuple):
    """Who and what one exported SAE is, in Neuronpedia's terms."""

    model_id: str
    set_name: str
    source_id: str
    release: str
    creator_id: str
    created_at: str


def source_for(cfg: Config, sae_name: str, hook: str) -> Source:
    """The model, source set, source, release and creator of one SAE, from `dashboard.neuronpedia`."""
    np_cfg = cfg.dashboard.neuronpedia
    prefix = np_cfg.set_name or slug(cfg.name)
    set_name = slug(f"{prefix}-{sae_name}")
    model_id = np_cfg.model or default_model_id(cfg.model.source)
    # UTC with milliseconds: the importer's `new Date(...)` reads it the same anywhere (SAEDashboard's
    # zone-less times are read as the server's local time) and timestamp(3) keeps all of it.
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return Source(model_id, set_name, f"{layer_of(hook)}-{set_name}", np_cfg.release or prefix,
                  np_cfg.creator_id, now)  # fmt: skip


def metadata_rows(cfg: Config, src: Source, meta: dict[str, Any], correlations: bool) -> dict[str, dict]:
    """release / model / sourceset / source rows: `SourceRelease`, `Model`, `SourceSet` and `Source` of
    `neuronpedia_export.py`, filled as its `_maybe_write_*` / `_write_source` do. `Source.saelensConfig`
    is left out: a null for Prisma's `Json?` is rejected by its `create` (it needs `Prisma.DbNull`)."""
    np_cfg, c = cfg.dashboard.neuronpedia, {"creatorId": src.creator_id, "createdAt": src.created_at}
    title = np_cfg.release_title or f"{cfg.name}: specialized SAEs (ssae-ray)"
    owner = cfg.model.source.split("/")[0] if "/" in cfg.model.source else ""
    release = {"name": src.release, "description": title, "creatorName": np_cfg.creator_name, **c,
               "visibility": "PUBLIC", "isNewUi": False, "featured": False, "descriptionShort": title,
               "urls": [np_cfg.url] if np_cfg.url else [], "creatorEmail": None,
               "creatorNameShort": np_cfg.creator_name, "defaultSourceSetName": None, "defaultSourceId": None,
               "defaultUmapSourceIds": []}  # fmt: skip
    model = {"id": src.model_id, "instruct": src.model_id.endswith("-it"), **c, "displayNameShort": src.model_id,
             "displayName": src.model_id, "tlensId": None, "dimension": meta["d_model"], "visibility": "PUBLIC",
             "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False,
             "layers": meta["n_layers"], "neuronsPerLayer": 0, "owner": owner, "updatedAt": src.created_at,
             "website": None}  # fmt: skip
    sourceset = {"modelId": src.model_id, "name": src.set_name, **c, "hasDashboards": True, "visibility": "PUBLIC",
                 "description": meta["description"], "type": "", "creatorName": np_cfg.creator_name, "urls": [],
                 "creatorEmail": None, "releaseName": src.release, "defaultOfModelId": None, "defaultRange": 1,
                 "defaultShowBreaks": True, "showDfa": False, "showCorrelated": correlations,
                 "showHeadAttribution": False, "showUmap": False}  # fmt: skip
    source = {"id": src.source_id, "modelId": src.model_id, "setName": src.set_name, **c, "hasDashboards": True,
              "inferenceEnabled": False, "inferenceHosts": [], "saelensRelease": None, "saelensSaeId": None,
              "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC", "defaultOfModelId": None,
              "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
              "num_prompts": meta["n_prompts"], "num_tokens_in_prompt": meta["n_ctx"], "dataset": dataset_id(cfg),
              "notes": meta["description"]}  # fmt: skip
    return {"release": release, "model": model, "sourceset": sourceset, "source": source}


def _r5(xs: Any) -> list[float]:
    """`FeatureProcessor.round_list` (`neuronpedia_converter.py`): 5 decimals."""
    return [round(float(x), 5) for x in xs]


def _pct(share: float) -> float:
    """A share as SAEDashboard's titles carry it: formatted `:.3%`, parsed back and divided by 100
    (`sae_vis_runner.py` "DENSITY = ...", `sequence_data_generator.py` "CONTAINS ...";
    `neuronpedia_converter.py`, `_process_feature_histograms` / `_parse_sequence_group_title`)."""
    return float(f"{share:.3%}".rstrip("%")) / 100


def density(n_nonzero: int, n_tokens: int) -> float:
    """`frac_nonzero`: non-zero activations over all tokens, a Python division (`SaeVisRunner.run`)."""
    return _pct(n_nonzero / n_tokens)


def interval_share(count: int, n_tokens: int) -> float:
    """`binContains` of an interval: the float32 mean of its token mask (`get_indices_dict`)."""
    return _pct(float(np.float32(count / n_tokens)))


class SAEInputs(NamedTuple):
    """What one SAE's export reads."""

    stats: FeatureStats
    logits: FeatureLogits
    w_dec: torch.Tensor
    contexts: Any
    """The scanned `TokenBatch`."""


def feature_row(src: Source, x: SAEInputs, i: int, vocab: list[str], bins: int) -> dict[str, Any]:
    """The `Feature` row of the `i`-th exported feature (maxActApprox is set from its activations)."""
    st, fl, f = x.stats, x.logits, x.stats.features[i]
    row = x.w_dec[f].detach().float().cpu()
    align = row.topk(min(3, row.numel()))  # `data_parsing_fns.add_neuron_alignment_data`
    lo, hi = float(st.lo[i]), float(st.hi[i])
    lh = fl.hist_heights[f]
    corr = {}
    for kind, c in (("neurons", st.neurons), ("features", st.corr_features)):
        corr |= {f"correlated_{kind}_indices": c.index[i] if c else [],
                 f"correlated_{kind}_pearson": _r5(c.pearson[i]) if c else [],
                 f"correlated_{kind}_l1": _r5(c.cosine[i]) if c else []}  # fmt: skip
    return {"modelId": src.model_id, "layer": src.source_id, "index": f, "creatorId": src.creator_id,
            "createdAt": src.created_at, "maxActApprox": 0.0, "hasVector": False, "vector": [], "vectorLabel": None,
            "vectorDefaultSteerStrength": 10, "hookName": None, "topkCosSimIndices": [], "topkCosSimValues": [],
            "neuron_alignment_indices": align.indices.tolist(), "neuron_alignment_values": _r5(align.values),
            "neuron_alignment_l1": _r5(align.values.abs() / row.abs().sum()), **corr,
            "neg_str": [vocab[t] for t in fl.bottom_ids[f].tolist()], "neg_values": _r5(fl.bottom_values[f]),
            "pos_str": [vocab[t] for t in fl.top_ids[f].tolist()], "pos_values": _r5(fl.top_values[f]),
            "frac_nonzero": density(int(st.n_nonzero[i]), st.n_tokens),
            "freq_hist_data_bar_heights": st.hist[i].tolist(),
            "freq_hist_data_bar_values": _r5(histc_centres(torch.tensor([lo]), torch.tensor([hi]), bins)[0]),
            "logits_hist_data_bar_heights": [int(h) for h in lh.tolist()],
            "logits_hist_data_bar_values": _r5(fl.hist_centres[f]), "decoder_weights_dist": [],
            "sourceSetName": src.set_name}  # fmt: skip


class Texts(NamedTuple):
    """The scanned contexts as Python lists (read per row, so no per-element tensor access)."""

    ids: list[list[int]]
    lengths: list[int]
    docs: list[int]
    width: int

    @classmethod
    def of(cls, contexts: Any) -> Texts:
        return cls(contexts.input_ids.tolist(), contexts.attention_mask.sum(1).tolist(),
                   contexts.doc_index.tolist(), int(contexts.input_ids.shape[1]))  # fmt: skip


def activation_rows(
    src: Source, x: SAEInputs, i: int, vocab: list[str], texts: Texts
) -> list[dict[str, Any]]:
    """The `Activation` rows of the `i`-th exported feature: its top tokens (`binMin` -1, `binMax` its
    max, `binContains` -1), then each interval's samples from the highest interval down, each showing
    its whole context but position 0 (`neuronpedia_converter.py`, `_create_activation`)."""
    st, f = x.stats, x.stats.features[i]
    groups = [(st.top, 0, -1.0, float(f"{float(st.hi[i]):.3f}"), -1.0)]
    bounds = st.bounds[i].tolist()
    for j in reversed(range(len(bounds) - 1)):
        lo, hi = float(f"{bounds[j]:.3f}"), float(f"{bounds[j + 1]:.3f}")
        groups.append((st.samples, j, lo, hi, interval_share(int(st.interval_n[i, j]), st.n_tokens)))
    out: list[dict[str, Any]] = []
    for kept, g, b_min, b_max, b_contains in groups:
        for code, vals in zip(kept.code[i, g].tolist(), kept.rows[i, g].numpy()):
            if code < 0:
                continue
            c, pos = divmod(code, texts.width)
            n = texts.lengths[c]
            # `SequenceData.feat_acts`: Python's round to 4 decimals (most are exact zeros: kept as they are)
            values = [round(v, 4) if v else 0.0 for v in vals[1:n].tolist()]
            m = max(values)
            out.append({"id": activation_id(src, f, len(out)), "tokens": [vocab[k] for k in texts.ids[c][1:n]],
                        "index": f, "layer": src.source_id, "modelId": src.model_id, "maxValue": m,
                        "maxValueTokenIndex": values.index(m), "minValue": min(values), "values": values,
                        "creatorId": src.creator_id, "dataSource": None, "dataIndex": str(texts.docs[c]),
                        "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": src.created_at,
                        "lossValues": [], "logitContributions": None, "binMin": b_min, "binMax": b_max,
                        "binContains": b_contains, "qualifyingTokenIndex": pos - 1, "zIndices": None,
                        "zValues": None})  # fmt: skip
    return out


def activation_id(src: Source, feature: int, n: int) -> str:
    """A 25-character cuid-shaped id that is a hash of (model, source, feature, row): unique across
    SAEs and exports of different sources (SAEDashboard's `FastPseudoCuid` is pid + second +
    counter, so two SAEs exported in the same second collide and `ON CONFLICT DO NOTHING` drops the
    second's rows), and the same when one source is exported again, so a re-import adds nothing, as
    for its `Neuron` rows."""
    key = f"{src.model_id}\0{src.source_id}\0{feature}\0{n}"
    return "c" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode()


def write_source(
    out: Path, cfg: Config, src: Source, x: SAEInputs, meta: dict[str, Any], vocab: list[str]
) -> Path:
    """Write one SAE's source folder under `out` (a fresh folder: the dashboard writes atomically)."""
    d = out / src.model_id / src.source_id
    rows = metadata_rows(cfg, src, meta, x.stats.neurons is not None)
    d.mkdir(parents=True, exist_ok=True)
    for name, row in rows.items():
        (d / f"{name}.jsonl").write_bytes(_jsonl([row]))
    bins, texts = cfg.dashboard.neuronpedia.hist_bins, Texts.of(x.contexts)
    for n, batch in enumerate(x.stats.batches):
        feats, acts = [], []
        for i in batch:
            feat, rows_i = feature_row(src, x, i, vocab, bins), activation_rows(src, x, i, vocab, texts)
            feat["maxActApprox"] = max((a["maxValue"] for a in rows_i), default=0.0)
            feats.append(feat)
            acts += rows_i
        for sub, part in (("features", feats), ("activations", acts)):
            if part:  # the importer JSON.parses a file's first line: never an empty file
                (d / sub).mkdir(exist_ok=True)
                (d / sub / f"batch-{n}.jsonl.gz").write_bytes(gzip.compress(_jsonl(part), compresslevel=5))
    alive = set(x.stats.features)
    skipped = [f for f in range(int(x.w_dec.shape[0])) if f not in alive]
    (d / "skipped_indexes.json").write_text(json.dumps({
        "model_id": src.model_id, "layer": src.source_id, "sae_set": src.set_name, "skipped_indexes": skipped,
        "reason": f"no activation > 0 on the {x.stats.n_tokens} scanned tokens"}))  # fmt: skip
    return d


def read_export(source_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(features, activations) of one exported source folder, in batch order."""

    def rows(sub: str) -> list[dict[str, Any]]:
        files = sorted(
            (source_dir / sub).glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split("-")[1].split(".")[0])
        )
        return [json.loads(line) for p in files for line in gzip.decompress(p.read_bytes()).splitlines()]

    return rows("features"), rows("activations")
