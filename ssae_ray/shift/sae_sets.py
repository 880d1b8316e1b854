"""The four SAE sets of Table 1: GSAE, SSAE (the GSAEs finetuned on text retrieved with a few
Bias-in-Bios seed bios), and their compressed variants (GSAEs sliced to `compressed_width`, and
those finetuned the same way). Composes the corpus, retrieval and training stages; every step is
cached by content hash, so a rerun reuses what is done."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ssae_ray.config import Config
from ssae_ray.models import LM, parse_hook
from ssae_ray.saes import fit_check, load_gsaes, load_sae, sae_hash, save_sae, slice_sae
from ssae_ray.shift.data import BiosData
from ssae_ray.shift.probe import probe_layer
from ssae_ray.stages import file_sha256, read_manifest, run_stage, stage_key

log = logging.getLogger("ssae_ray")
SAESet = dict[str, nn.Module]


def upstream_hooks(cfg: Config, lm: LM) -> list[str]:
    """The configured hooks at or before the probe layer (later ones cannot change the classifier)."""
    layer = probe_layer(lm, cfg.shift.layer)
    hooks = [h for h in cfg.sae.hooks if parse_hook(h).layer <= layer]
    if not hooks:
        raise ValueError(
            f"no sae.hooks at or before the probe layer {layer} (shift.layer={cfg.shift.layer}): "
            f"hooks {list(cfg.sae.hooks)}; add earlier hooks or a later shift.layer"
        )
    return hooks


def gsaes(cfg: Config, lm: LM, say: Callable[[str], None]) -> tuple[SAESet, Path | None]:
    """The GSAEs of the preset: pretrained on the general corpus (`pretrain`), a release, a folder
    or random (tests). Returns them and the corpus folder when one was built."""
    corpus_dir = None
    folder = None
    if cfg.sae.source == "pretrain":
        from ssae_ray.data import build_corpus, load_split
        from ssae_ray.training.pretrain import pretrain_gsaes

        say("corpus")
        corpus_dir = build_corpus(cfg, lm.tokenizer)
        texts = [t for t in load_split(corpus_dir, "corpus").column("text").to_pylist() if t]
        say("pretraining GSAEs on the general corpus (cached)")
        folder = pretrain_gsaes(cfg, lm, texts)
    saes = load_gsaes(cfg, lm, folder)
    hooks = upstream_hooks(cfg, lm)
    return {h: saes[h] for h in hooks}, corpus_dir


def write_seed_bios(cfg: Config, data: BiosData) -> Path:
    """The first `n_seed_examples` ambiguous-set training bios as the retrieval seed (JSONL)."""
    n = cfg.shift.n_seed_examples
    bios = data.ambiguous["train"]
    if n < 1 or n > len(bios.text):
        raise ValueError(
            f"shift.n_seed_examples={n} must be in 1..{len(bios.text)} (the ambiguous train set)"
        )
    texts = bios.text[:n]
    key = stage_key("bib-seed-v1", texts)

    def build(tmp: Path) -> dict[str, Any]:
        (tmp / "seed.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return {"n": n}

    return run_stage(cfg.root, "shift_seed", key, build) / "seed.jsonl"


def finetuned(cfg: Config, lm: LM, saes: SAESet, texts: list[str], tag: str, sel_key: str) -> SAESet:
    """`saes` finetuned on the activations of `texts` (cached as a stage keyed by the GSAE weights,
    the selection and the train config)."""
    from ssae_ray.resources import disk_plan
    from ssae_ray.training import cache_activations, finetune
    from ssae_ray.training.cache import cache_plan

    sha = {h: sae_hash(s) for h, s in saes.items()}
    key = stage_key("shift-ssae-v1", tag, sha, sel_key, cfg.train, cfg.model.source)

    # What one finetune reads (steps x batch_tokens plus the margin), not the whole selection
    # (19 hooks x 8M tokens x 512 x fp16 would be ~156 GB); planned and checked before any capture.
    plan = cache_plan(cfg, texts, list(saes), {h: int(s.cfg.d_in) for h, s in saes.items()}, lm.tokenizer)
    if read_manifest(Path(cfg.root).expanduser() / "shift_ssae" / key) is None:
        what = f"activation cache: {plan.n_tokens:,} tokens x {len(saes)} hooks ({cfg.train.cache_dtype})"
        items = [] if plan.cached else [(what, plan.bytes)]
        weights = sum(4 * sum(p.numel() for p in s.parameters()) for s in saes.values())
        items.append((f"{len(saes)} finetuned SAEs", weights))
        disk_plan(cfg.root, items, f"SHIFT {tag} finetune")

    def build(tmp: Path) -> dict[str, Any]:
        cache = cache_activations(cfg, lm, plan.texts, list(saes), plan.max_tokens)
        result = finetune(cfg, {h: copy.deepcopy(s) for h, s in saes.items()}, cache)
        for h, s in result.saes.items():
            save_sae(s.to("cpu"), tmp / h)
        last = result.history[-1] if result.history else {}
        return {"hooks": list(saes), "tag": tag, "final": last}

    folder = run_stage(cfg.root, "shift_ssae", key, build)
    return {h: load_sae(folder / h, str(lm.device)) for h in saes}


def build_sae_sets(
    cfg: Config,
    lm: LM,
    data: BiosData,
    say: Callable[[str], None] = log.info,
    with_ssae: bool = True,
    with_compressed: bool = True,
) -> tuple[dict[str, SAESet], dict[str, Any]]:
    """{"GSAE", "SSAE", "Comp. GSAE", "Comp. SSAE"} -> {hook: SAE}, and notes on how they were made."""
    import pyarrow.parquet as pq

    g, corpus_dir = gsaes(cfg, lm, say)
    fit_check(cfg, lm, g, data.balanced["train"].text[:32])  # as on every path where GSAEs enter
    sets: dict[str, SAESet] = {"GSAE": g}
    width = min(s.cfg.d_sae for s in g.values())
    comp = cfg.shift.compressed_width
    if with_compressed and comp < width:
        sets["Comp. GSAE"] = {h: slice_sae(s, comp) for h, s in g.items()}
    elif with_compressed:
        log.warning("shift: compressed_width %d >= GSAE width %d; no compression rows", comp, width)
    info: dict[str, Any] = {"gsae_width": width, "hooks": list(g)}
    if not with_ssae:
        return sets, info
    from ssae_ray.data import build_corpus
    from ssae_ray.retrieval import build_index, retrieve

    seed_path = write_seed_bios(cfg, data)
    seed_texts = [json.loads(line)["text"] for line in seed_path.read_text().splitlines() if line.strip()]
    if corpus_dir is None:
        say("corpus")
        corpus_dir = build_corpus(cfg, lm.tokenizer)  # the retrieval corpus; its seed split is not used
    say("retrieval index (cached)")
    index_dir = build_index(cfg, corpus_dir)
    say(f"retrieving {cfg.retrieval.token_budget} tokens with {cfg.shift.n_seed_examples} seed bios "
        f"({cfg.retrieval.strategy})")  # fmt: skip
    sel_dir = retrieve(cfg, corpus_dir, index_dir, seed_texts=seed_texts)
    texts = [t for t in pq.read_table(sel_dir / "selection.parquet").column("text").to_pylist() if t]
    sel_key = (read_manifest(sel_dir) or {}).get("key", file_sha256(sel_dir / "selection.parquet"))
    say(f"finetuning SSAEs on {len(texts)} retrieved passages")
    sets["SSAE"] = finetuned(cfg, lm, g, texts, "ssae", sel_key)
    if "Comp. GSAE" in sets:
        say("finetuning compressed SSAEs")
        sets["Comp. SSAE"] = finetuned(cfg, lm, sets["Comp. GSAE"], texts, "comp-ssae", sel_key)
    info.update(selection=str(sel_dir), n_passages=len(texts), strategy=cfg.retrieval.strategy,
                seed_bios=cfg.shift.n_seed_examples)  # fmt: skip
    return {k: sets[k] for k in ("GSAE", "SSAE", "Comp. GSAE", "Comp. SSAE") if k in sets}, info
