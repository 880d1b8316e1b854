"""Neuronpedia export in the layout SAEDashboard's `neuronpedia_export.export_neuronpedia_dashboards`
writes (github.com/jbloomAus/SAEDashboard, `sae_dashboard/neuronpedia/neuronpedia_export.py`):

    <out>/<model_id>/<source_id>/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl
        features/batch-<n>.jsonl.gz     one `Feature` record per feature
        activations/batch-<n>.jsonl.gz  one `Activation` record per shown context

Field names and defaults follow that module's inlined `neuronpedia-utils` dataclasses; `source_id`
is `<layer>-<source set>` as there; `index` is the feature's int (the dataclass says str, the
runner's batch JSON, which the exporter copies, holds an int). Top contexts carry `binMin=-1, binMax=<feature max>,
binContains=-1` and the sampled bands their interval and share, as SAEDashboard's converter
parses them from its sequence-group titles.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

CREATOR_ID = "ssae-ray"
"""`creatorId` written on every row (Neuronpedia's import assigns its own; see the README)."""


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def layer_of(hook: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook)
    if not m:
        raise ValueError(f"hook {hook!r} names no layer (expected blocks.<L>.<hook point>)")
    return int(m.group(1))


def _dump(rows: list[dict[str, Any]], path: Path, gz: bool = False) -> None:
    text = "".join(json.dumps(r, default=str, allow_nan=False) + "\n" for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(text, compresslevel=5))
    else:
        path.write_bytes(text)


class NeuronpediaWriter:
    """Writes one SAE's source folder; `add` features in order, `close` flushes the last batch."""

    def __init__(
        self, out: Path, model_id: str, set_name: str, hook: str, meta: dict[str, Any], batch: int = 256
    ):
        self.model_id, self.set_name = slug(model_id), slug(set_name)
        self.source_id = f"{layer_of(hook)}-{self.set_name}"
        self.dir = out / self.model_id / self.source_id
        self.batch, self.n_batch, self.n_act = batch, 0, 0
        self.features: list[dict[str, Any]] = []
        self.acts: list[dict[str, Any]] = []
        self.now = datetime.now().isoformat()
        self.cuid = f"c{os.getpid():04x}{int(time.time()):08x}"  # SAEDashboard's FastPseudoCuid scheme
        c = {"creatorId": CREATOR_ID, "createdAt": self.now}
        _dump([{"name": self.set_name, "description": meta["description"], "creatorName": "ssae-ray", **c,
                "visibility": "PUBLIC", "isNewUi": False, "featured": False, "descriptionShort": meta["description"],
                "urls": [], "creatorEmail": None, "creatorNameShort": "ssae-ray", "defaultSourceSetName": None,
                "defaultSourceId": None, "defaultUmapSourceIds": []}], self.dir / "release.jsonl")  # fmt: skip
        _dump([{"id": self.model_id, "instruct": False, **c, "displayNameShort": self.model_id,
                "displayName": meta["model"], "tlensId": None, "dimension": meta["d_model"], "visibility": "PUBLIC",
                "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False,
                "layers": meta["n_layers"], "neuronsPerLayer": 0, "owner": "", "updatedAt": self.now,
                "website": None}], self.dir / "model.jsonl")  # fmt: skip
        _dump([{"modelId": self.model_id, "name": self.set_name, **c, "hasDashboards": True, "visibility": "PUBLIC",
                "description": meta["description"], "type": "", "creatorName": "ssae-ray", "urls": [],
                "creatorEmail": None, "releaseName": self.set_name, "defaultOfModelId": None, "defaultRange": 1,
                "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False, "showHeadAttribution": False,
                "showUmap": False}], self.dir / "sourceset.jsonl")  # fmt: skip
        _dump([{"id": self.source_id, "modelId": self.model_id, "setName": self.set_name, **c,
                "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None,
                "saelensRelease": None, "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None,
                "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
                "hasUmapClusters": False, "num_prompts": meta["n_prompts"], "num_tokens_in_prompt": meta["n_ctx"],
                "dataset": meta["dataset"], "notes": meta["description"]}], self.dir / "source.jsonl")  # fmt: skip

    def add(self, f: int, feature: dict[str, Any], activations: list[dict[str, Any]]) -> None:
        """`feature`: maxActApprox, frac_nonzero, pos/neg str/values, histogram fields; `activations`:
        tokens, values, binMin, binMax, binContains, dataIndex."""
        c = {"modelId": self.model_id, "layer": self.source_id, "index": f, "creatorId": CREATOR_ID,
             "createdAt": self.now}  # fmt: skip
        self.features.append({**c, "hasVector": False, "vector": [], "vectorLabel": None,
                              "vectorDefaultSteerStrength": 10, "hookName": None, "topkCosSimIndices": [],
                              "topkCosSimValues": [], **{k: [] for k in _EMPTY_LISTS}, **feature,
                              "decoder_weights_dist": [], "sourceSetName": self.set_name})  # fmt: skip
        for a in activations:
            v = a["values"]
            m = max(v)
            self.n_act += 1
            self.acts.append({"id": f"{self.cuid}{self.n_act:08x}"[:25], **c, "tokens": a["tokens"],
                              "maxValue": m, "maxValueTokenIndex": v.index(m), "minValue": min(v), "values": v,
                              "dataSource": a.get("dataSource"), "dataIndex": a.get("dataIndex"), "dfaValues": [],
                              "dfaTargetIndex": None, "dfaMaxValue": None, "lossValues": [],
                              "logitContributions": None, "binMin": a["binMin"], "binMax": a["binMax"],
                              "binContains": a["binContains"], "qualifyingTokenIndex": v.index(m),
                              "zIndices": None, "zValues": None})  # fmt: skip
        if len(self.features) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.features:
            return
        name = f"batch-{self.n_batch}.jsonl"
        _dump(self.features, self.dir / "features" / name, gz=True)
        _dump(self.acts, self.dir / "activations" / name, gz=True)
        self.features, self.acts, self.n_batch = [], [], self.n_batch + 1


_EMPTY_LISTS = (
    "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices",
    "correlated_neurons_pearson", "correlated_neurons_l1", "correlated_features_indices",
    "correlated_features_pearson", "correlated_features_l1",
)  # fmt: skip


def read_export(source_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(features, activations) of one exported source folder, in batch order."""

    def rows(sub: str) -> list[dict[str, Any]]:
        files = sorted(
            (source_dir / sub).glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split("-")[1].split(".")[0])
        )
        return [json.loads(line) for p in files for line in gzip.decompress(p.read_bytes()).splitlines()]

    return rows("features"), rows("activations")
