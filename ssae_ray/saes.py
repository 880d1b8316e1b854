"""GSAEs and SSAEs as sae-lens `StandardSAE`s: load (release or disk), save, random, slice, fit check."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from torch import Tensor

if TYPE_CHECKING:
    from ssae_ray.config import Config
    from ssae_ray.models import LM

log = logging.getLogger("ssae_ray")


class SAEMismatchError(ValueError):
    """An SAE that does not fit the model or hook it is used with."""


def _metadata(hook_name: str, model_name: str | None = None) -> dict:
    return {"hook_name": hook_name, "model_name": model_name}


def make_random_sae(
    d_in: int, d_sae: int, hook_name: str, seed: int = 0, device: str = "cpu", model_name: str | None = None
) -> StandardSAE:
    """A StandardSAE with unit-norm decoder rows, W_enc = W_dec^T and zero biases (the sae-lens /
    Anthropic initialisation), seeded."""
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, device=device)
    cfg.metadata.hook_name = hook_name
    cfg.metadata.model_name = model_name
    g = torch.Generator().manual_seed(seed)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.to(device)


def sae_hash(sae: SAE) -> str:
    """Content hash of an SAE's weights (W_enc, b_enc, W_dec, b_dec): keys stages that depend on it."""
    import hashlib

    h = hashlib.sha256()
    for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def hook_of(sae: SAE) -> str | None:
    return getattr(sae.cfg.metadata, "hook_name", None)


def save_sae(sae: SAE, folder: str | Path) -> Path:
    """Save in sae-lens format (`cfg.json` + `sae_weights.safetensors`), atomically."""
    from ssae_ray.stages import atomic_dir

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        sae.save_model(tmp)
    return folder


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise SAEMismatchError(f"no sae-lens SAE at {path} (expected cfg.json and sae_weights.safetensors)")
    return SAE.load_from_disk(path, device=device)


def load_release(release: str, sae_id: str, device: str = "cpu") -> SAE:
    """`SAE.from_pretrained(release, sae_id)`; needs the Hugging Face hub."""
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except Exception as e:  # network / unknown release: say which
        raise SAEMismatchError(
            f"cannot load sae-lens release {release!r} sae_id {sae_id!r}: {e}. "
            "Releases need the Hugging Face hub; offline, point sae.source at a folder of saved SAEs."
        ) from e


def slice_sae(sae: SAE, k: int) -> StandardSAE:
    """Keep the first k latents (the paper's compression experiment)."""
    d_sae = sae.cfg.d_sae
    if not 0 < k <= d_sae:
        raise SAEMismatchError(f"cannot slice an SAE of width {d_sae} to {k} latents")
    cfg = StandardSAEConfig(d_in=sae.cfg.d_in, d_sae=k, device=str(sae.W_dec.device))
    # all metadata travels (hook, model, the training activation scale `act_scale`, ...)
    cfg.metadata = type(sae.cfg.metadata)(**sae.cfg.metadata.to_dict())
    out = StandardSAE(cfg)
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc[:, :k])
        out.b_enc.copy_(sae.b_enc[:k])
        out.W_dec.copy_(sae.W_dec[:k])
        out.b_dec.copy_(sae.b_dec)
    return out


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - FVU: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over tokens."""
    x = x.reshape(-1, x.shape[-1]).float()
    x_hat = x_hat.reshape(-1, x.shape[-1]).float()
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return float(1 - resid / total)


def check_sae_fits(sae: SAE, acts: Tensor, hook: str, min_ev: float) -> float:
    """Refuse an SAE whose width does not match the hook or whose explained variance on `acts`
    ([N, d] or [B, T, d] of this hook; position 0 already dropped) is below `min_ev`."""
    d = acts.shape[-1]
    if sae.cfg.d_in != d:
        raise SAEMismatchError(
            f"the SAE for {hook} has d_in={sae.cfg.d_in} but the model's activations there have "
            f"d={d}: wrong hook or wrong model for this SAE"
        )
    with torch.no_grad():
        x = acts.reshape(-1, d).to(sae.W_dec.dtype).to(sae.W_dec.device)
        ev = explained_variance(x, sae.decode(sae.encode(x)))
    if not math.isfinite(ev):
        raise SAEMismatchError(
            f"the SAE for {hook} has a non-finite explained variance ({ev}) on the model's activations at "
            "that hook: its weights or those activations hold NaN/inf (a diverged or corrupt SAE file, "
            "or an LM dtype that overflows, e.g. model.dtype=float16)"
        )
    if ev < min_ev:
        raise SAEMismatchError(
            f"the SAE for {hook} explains only {ev:.3f} of the variance of the model's activations at "
            f"that hook (need >= {min_ev}): a wrong hook, model or activation processing "
            "(normalisation, BOS handling). Set sae.min_explained_variance to override."
        )
    log.info("SAE at %s explains %.3f of the variance", hook, ev)
    return ev


def load_gsaes(cfg: Config, lm: LM, folder: str | Path | None = None) -> dict[str, SAE]:
    """The GSAEs of `cfg.sae.hooks`: random (tests), from a sae-lens release, or from a folder
    holding one saved SAE per hook (`<folder>/<hook>/`), e.g. the pipeline's pretrained GSAEs."""
    from ssae_ray.models import validate_hooks

    hooks = list(cfg.sae.hooks)
    validate_hooks(lm, hooks)
    device = str(lm.device)
    src = cfg.sae.source
    saes: dict[str, SAE] = {}
    if src == "random":
        for i, h in enumerate(hooks):
            saes[h] = make_random_sae(lm.d_model, cfg.sae.d_sae, h, seed=cfg.seed + i, device=device)
    elif src == "release":
        if len(cfg.sae.sae_ids) != len(hooks):
            raise SAEMismatchError(
                f"sae.source=release needs one sae.sae_ids entry ('<release>:<sae_id>') per hook: "
                f"{len(hooks)} hooks, {len(cfg.sae.sae_ids)} ids"
            )
        for h, rid in zip(hooks, cfg.sae.sae_ids, strict=True):
            release, _, sae_id = rid.partition(":")
            saes[h] = load_release(release, sae_id or h, device)
    else:
        root = Path(folder if folder is not None else src).expanduser()
        if src == "pretrain" and folder is None:
            raise SAEMismatchError("sae.source=pretrain: pass the folder of the pretrained GSAEs")
        for h in hooks:
            saes[h] = load_sae(root / h, device)
    for h, sae in saes.items():
        if sae.cfg.d_in != lm.d_model and not h.endswith("hook_z"):
            raise SAEMismatchError(
                f"the SAE for {h} has d_in={sae.cfg.d_in} but the model's width is {lm.d_model}"
            )
        if cfg.sae.slice_to is not None:
            saes[h] = slice_sae(sae, cfg.sae.slice_to)
    return saes
