"""GSAE releases shipped with the package, loaded like a sae-lens release from the Hub.

A shipped release is a folder `ssae_ray/releases/<release>/` in sae-lens' layout, one SAE folder
per `sae_id` (the hook: `<sae_id>/cfg.json` + `<sae_id>/sae_weights.safetensors`, weights stored
as float16 to keep the repository small; they load as float32), plus:

- `manifest.json`: the recipe that trained it (the preset and the hash of every config field the
  GSAE depends on, `recipe_hash`), the corpus and LM it was trained on (hashes), its training
  (steps, tokens, why it stopped), the held-out metrics of training (FVU, L0, spliced CE on the
  documents held out of pretraining), a `check`: FVU, L0 and spliced CE of the shipped float16
  weights, loaded through this module, on the first `check.tokens` held-out tokens in fp32, and
  each file's sha256;
- `heldout.jsonl.gz`: the held-out documents (never trained on), so anyone can re-score it.

`sae.source: release` with `sae.sae_ids: ["<release>:<sae_id>"]` loads a shipped release through
`saes.load_release`, the path of every sae-lens release (`SAE.from_pretrained` for hub releases,
the same sae-lens disk reader here), then the pipeline's checks (hook, BOS, architecture, fit).
A file whose sha256 differs from its manifest is refused.

`ssae-ray pretrain --preset <recipe>` rebuilds the GSAE from scratch and compares the rebuild
with the shipped release of the same recipe (`compare`); `--ship` writes a release (`ship`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from ssae_ray.config import Config, config_hash
from ssae_ray.stages import atomic_dir, file_sha256, write_json_atomic

log = logging.getLogger("ssae_ray")

RELEASES_DIR = Path(__file__).resolve().parent / "releases"
"""Where shipped releases live (package data)."""
LOCAL_RELEASE = "smollm2-135m-wiki-gsae"
"""The converged GSAE of the `local-converged` recipe, which the `local` preset finetunes."""
STORE_DTYPE = torch.float16
CHECK_TOKENS = 1500
"""Held-out tokens the manifest's `check` metrics (and the test that reproduces them) score."""
VERSION = 1


class ReleaseError(ValueError):
    """A shipped release is missing, incomplete or does not match its manifest."""


# ---------------------------------------------------------------------------------------------
# Reading


def shipped_releases() -> list[str]:
    if not RELEASES_DIR.is_dir():
        return []
    return sorted(p.name for p in RELEASES_DIR.iterdir() if (p / "manifest.json").is_file())


def release_dir(release: str) -> Path | None:
    d = RELEASES_DIR / release
    return d if (d / "manifest.json").is_file() else None


def read_release_manifest(release: str) -> dict[str, Any]:
    d = release_dir(release)
    if d is None:
        raise ReleaseError(
            f"no shipped release {release!r}; shipped: {', '.join(shipped_releases()) or 'none'}"
        )
    return json.loads((d / "manifest.json").read_text())


def verify_release(release: str, sae_id: str | None = None) -> dict[str, Any]:
    """The manifest, after checking that every file of `sae_id` (all when None) has its sha256."""
    m = read_release_manifest(release)
    d = RELEASES_DIR / release
    ids = [sae_id] if sae_id is not None else list(m["saes"])
    for i in ids:
        if i not in m["saes"]:
            raise ReleaseError(f"release {release!r} has no sae_id {i!r}; it has: {', '.join(m['saes'])}")
        for name, sha in m["saes"][i]["files"].items():
            p = d / i / name
            if not p.is_file():
                raise ReleaseError(
                    f"release {release!r} is incomplete: {p} is missing (reinstall the package)"
                )
            if file_sha256(p) != sha:
                raise ReleaseError(
                    f"release {release!r}: {i}/{name} does not match its manifest (sha256); the shipped "
                    "file was changed without re-shipping: rebuild it with `ssae-ray pretrain --preset "
                    f"{m['recipe']['preset']} --ship`"
                )
    return m


def load_shipped(release: str, sae_id: str, device: str = "cpu") -> Any:
    """The SAE `sae_id` of shipped release `release`, read by sae-lens' disk loader (as a hub
    release is once downloaded), as float32."""
    from sae_lens import SAE

    verify_release(release, sae_id)
    return SAE.load_from_disk(RELEASES_DIR / release / sae_id, device=device, dtype="float32")


def heldout_texts(release: str) -> list[str]:
    d = release_dir(release)
    if d is None:
        raise ReleaseError(f"no shipped release {release!r}")
    with gzip.open(d / "heldout.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# The recipe and its hash


def recipe_fields(cfg: Config) -> dict[str, Any]:
    """Every config field the pretrained GSAE depends on (not the finetune, sweep or eval)."""
    t = dataclasses.asdict(cfg.train)
    m, s, c = cfg.model, cfg.sae, cfg.corpus
    return {
        "model": {k: getattr(m, k) for k in ("source", "gguf_file", "tiny_arch", "dtype", "context_len", "prepend_bos")},
        "sae": {"hooks": list(s.hooks), "d_sae": s.d_sae, "arch": s.arch, "k": s.k},
        "corpus": {k: getattr(c, k) for k in ("kind", "n_seed", "test_fraction", "split_seed", "max_docs")},
        "train": {k: v for k, v in t.items()
                  if k.startswith("pretrain_") or k in ("batch_tokens", "scale_activations", "dead_window_tokens",
                                                        "seed", "jumprelu_bandwidth", "aux_coefficient")},
        "seed": cfg.seed,
    }  # fmt: skip


def recipe_hash(cfg: Config) -> str:
    return config_hash(recipe_fields(cfg))


# ---------------------------------------------------------------------------------------------
# Metrics


def heldout_metrics(
    lm: Any,
    sae: Any,
    hook: str,
    texts: list[str],
    tokens: int,
    context_len: int,
    prepend_bos: bool,
    batch_size: int = 8,
) -> dict[str, float]:
    """FVU, L0 and spliced CE of `sae` at `hook` on the first `tokens` tokens of `texts`."""
    from ssae_ray.eval.evaluate import evaluate_sae, prepare_test_set

    ts = prepare_test_set(lm, "heldout", texts, [hook], context_len, tokens, batch_size, prepend_bos)
    e = evaluate_sae(lm, sae, hook, ts, batch_size)
    return {"fvu": e.fvu, "l0": e.l0, "ce_spliced": e.ce_spliced, "ce_clean": e.ce_clean,
            "tokens": int(ts.tokens.attention_mask[:, 1:].sum())}  # fmt: skip


def fp32(lm: Any) -> Any:
    """`lm` with its forwards in fp32 (the release check is compared across machines)."""
    from ssae_ray.precision import Precision

    return lm._replace(precision=Precision("fp32", "release check"))


def decoder_cosines(a: Any, b: Any) -> torch.Tensor:
    """Cosine of each decoder row of `a` with the same row of `b`."""
    wa, wb = a.W_dec.detach().float(), b.W_dec.detach().float()
    return torch.nn.functional.cosine_similarity(wa, wb, dim=-1)


def best_match_cosines(a: Any, b: Any, chunk: int = 512) -> torch.Tensor:
    """For each decoder row of `a`, its highest cosine with any decoder row of `b` (latents of two
    independent trainings come in any order)."""
    wa = torch.nn.functional.normalize(a.W_dec.detach().float(), dim=-1)
    wb = torch.nn.functional.normalize(b.W_dec.detach().float(), dim=-1)
    return torch.cat([(wa[s : s + chunk] @ wb.T).max(-1).values for s in range(0, wa.shape[0], chunk)])


# ---------------------------------------------------------------------------------------------
# Writing a release (`ssae-ray pretrain --ship`) and comparing a rebuild with it


def pretrain_heldout(cfg: Config, lm: Any, corpus_dir: Path) -> list[str]:
    """The documents pretraining held out for validation, exactly as `pipeline._gsaes` and
    `training.pretrain.split_validation` draw them."""
    from ssae_ray.pipeline import _texts
    from ssae_ray.training.pretrain import split_validation

    texts = _texts(corpus_dir, "corpus")
    random.Random(cfg.seed).shuffle(texts)
    return split_validation(lm.tokenizer, texts, cfg.train.pretrain_val_tokens)[1]


def lm_hash(cfg: Config) -> dict[str, Any]:
    from ssae_ray.models import _resolve_source

    folder, gguf = _resolve_source(cfg.model, cfg.root / "models")
    out: dict[str, Any] = {"source": cfg.model.source}
    if gguf is not None:
        out.update(file=gguf, sha256=file_sha256(Path(folder) / gguf))
    return out


def ship(cfg: Config, lm: Any, gsae_dir: Path, corpus_dir: Path, release: str = LOCAL_RELEASE,
         dest: Path | None = None) -> Path:  # fmt: skip
    """Write the GSAEs of `gsae_dir` (the pretrain stage of `cfg`) as release `release` under
    `dest` (default: the package's releases folder), with its manifest and held-out documents."""
    from ssae_ray.saes import load_sae, save_sae
    from ssae_ray.stages import read_manifest

    pm = read_manifest(gsae_dir) or {}
    dest = Path(dest) if dest is not None else RELEASES_DIR
    heldout = pretrain_heldout(cfg, lm, corpus_dir)
    if not heldout:
        raise ReleaseError(
            "the recipe holds out no documents (train.pretrain_val_tokens=0): nothing to check"
        )
    with atomic_dir(dest / release) as tmp:
        saes: dict[str, Any] = {}
        for h in cfg.sae.hooks:
            sae = load_sae(gsae_dir / h)
            with torch.no_grad():
                for p in sae.parameters():
                    p.data = p.data.to(STORE_DTYPE)
            save_sae(sae, tmp / h)
            c = json.loads((tmp / h / "cfg.json").read_text())
            c["dtype"] = "float32"  # loads as float32 (sae-lens casts on load)
            (tmp / h / "cfg.json").write_text(json.dumps(c, indent=2, sort_keys=True))
            saes[h] = {
                "files": {n: file_sha256(tmp / h / n) for n in ("cfg.json", "sae_weights.safetensors")}
            }
        with gzip.open(tmp / "heldout.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as f:
            for t in heldout:
                f.write(json.dumps({"text": t}) + "\n")
        lm32 = fp32(lm)
        for h in cfg.sae.hooks:
            from sae_lens import SAE

            sae = SAE.load_from_disk(tmp / h, dtype="float32")
            saes[h]["check"] = heldout_metrics(lm32, sae, h, heldout, CHECK_TOKENS, cfg.model.context_len,
                                               cfg.model.prepend_bos, cfg.eval.batch_size)  # fmt: skip
            saes[h]["bytes"] = sum((tmp / h / n).stat().st_size for n in saes[h]["files"])
        fv = pm.get("final_validation", {})
        manifest = {
            "version": VERSION,
            "release": release,
            "recipe": {"preset": cfg.name, "config_hash": recipe_hash(cfg), "fields": recipe_fields(cfg),
                       "stage_folder": gsae_dir.name},
            "corpus": {"stage": corpus_dir.name, "corpus_sha256": file_sha256(corpus_dir / "corpus.parquet")},
            "lm": lm_hash(cfg),
            "training": {k: pm.get(k) for k in ("steps", "tokens_seen", "epochs", "stop_reason", "stable_end_step",
                                                "seconds_capture", "seconds_train", "resamples")},
            "lm_precision": getattr(getattr(lm, "precision", None), "name", None),
            "heldout": {"docs": len(heldout), "tokens": cfg.train.pretrain_val_tokens,
                        "ce_tokens": cfg.train.pretrain_ce_tokens,
                        "metrics": {h: fv.get(h, {}) for h in cfg.sae.hooks}},
            "check_note": f"FVU, L0 and spliced CE of the shipped float16 weights loaded as float32, on the first "
                          f"{CHECK_TOKENS} tokens of heldout.jsonl.gz, model.precision=fp32",
            "saes": saes,
        }  # fmt: skip
        write_json_atomic(tmp / "manifest.json", manifest)
    log.info("shipped release %s at %s", release, dest / release)
    return dest / release


def compare(cfg: Config, lm: Any, gsae_dir: Path, release: str) -> str:
    """A markdown table: the rebuilt GSAEs in `gsae_dir` against shipped `release` (held-out
    metrics on the check tokens, decoder rows' best-match cosine)."""
    from ssae_ray.saes import load_sae

    m = verify_release(release)
    texts = heldout_texts(release)
    rows = ["| hook | SAE | held-out FVU | L0 | spliced CE |", "| --- | --- | --- | --- | --- |"]
    notes = []
    lm32 = fp32(lm)
    for h in cfg.sae.hooks:
        if h not in m["saes"]:
            continue
        shipped = load_shipped(release, h)
        rebuilt = load_sae(gsae_dir / h)
        a = m["saes"][h]["check"]
        b = heldout_metrics(lm32, rebuilt, h, texts, CHECK_TOKENS, cfg.model.context_len, cfg.model.prepend_bos,
                            cfg.eval.batch_size)  # fmt: skip
        for name, v in (("shipped", a), ("rebuilt", b)):
            rows.append(f"| `{h}` | {name} | {v['fvu']:.4f} | {v['l0']:.2f} | {v['ce_spliced']:.4f} |")
        cos = best_match_cosines(rebuilt, shipped)
        same = (
            decoder_cosines(rebuilt, shipped).median().item()
            if rebuilt.cfg.d_sae == shipped.cfg.d_sae
            else math.nan
        )
        notes.append(
            f"`{h}`: Δ FVU {b['fvu'] - a['fvu']:+.4f}, Δ L0 {b['l0'] - a['l0']:+.2f}, Δ CE {b['ce_spliced'] - a['ce_spliced']:+.4f} "
            f"nats; decoder rows: median best-match cosine {cos.median().item():.3f} "
            f"({int((cos >= 0.9).sum())} of {cos.numel()} ≥ 0.9), same-index median {same:.3f}"
        )  # fmt: skip
    same_recipe = m["recipe"]["config_hash"] == recipe_hash(cfg)
    head = (f"rebuild of release {release} (recipe {m['recipe']['preset']}, config hash {m['recipe']['config_hash']}"
            f"{'' if same_recipe else '; THIS config differs: ' + recipe_hash(cfg)}):")  # fmt: skip
    return "\n".join([head, *rows, *notes])


def release_for_recipe(cfg: Config) -> str | None:
    """The shipped release built by this config's recipe, else one built by an earlier version of
    the same preset (`compare` then says that the recipes differ), else None."""
    h = recipe_hash(cfg)
    recipes = {r: read_release_manifest(r)["recipe"] for r in shipped_releases()}
    same = [r for r, m in recipes.items() if m["config_hash"] == h]
    named = [r for r, m in recipes.items() if m["preset"] == cfg.name]
    return (same or named or [None])[0]


def remove(release: str) -> None:  # pragma: no cover - maintenance
    shutil.rmtree(RELEASES_DIR / release)
