"""GSAEs and SSAEs as sae-lens SAEs (ReLU `StandardSAE`, `JumpReLUSAE`, `TopKSAE`, BatchTopK saved as
JumpReLU): load (release, sae-lens folder or sparsify checkpoint), save, random, slice, and the checks
every GSAE passes where it enters: its hook, architecture, BOS convention, exact import into the
trainable form (`training.archs`) and explained variance on the model's activations."""

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
    d_in: int,
    d_sae: int,
    hook_name: str,
    seed: int = 0,
    device: str = "cpu",
    model_name: str | None = None,
    arch: str = "relu",
    k: float = 32,
    threshold: float = 0.0,
) -> SAE:
    """A seeded SAE with unit-norm decoder rows, W_enc = W_dec^T and zero biases (the sae-lens /
    Anthropic initialisation) of architecture `arch` (see `training.archs`): a StandardSAE, a
    JumpReLUSAE (thresholds `threshold`), a TopKSAE (`k`) or a BatchTopK SAE as sae-lens saves it
    for inference (a JumpReLUSAE recording `training_architecture="batchtopk"` and k)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    from ssae_ray.training.archs import ARCHS

    if arch not in ARCHS:
        raise SAEMismatchError(f"unknown SAE architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch == "relu":
        sae: SAE = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, device=device))
    elif arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=int(k), device=device))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, device=device))
        if arch == "batchtopk":
            sae.cfg.metadata.training_architecture = "batchtopk"
            sae.cfg.metadata.training_architecture_details = {"k": float(k)}
    sae.cfg.metadata.hook_name = hook_name
    sae.cfg.metadata.model_name = model_name
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        if arch in ("jumprelu", "batchtopk"):
            sae.threshold.fill_(threshold)
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
    """An SAE saved by sae-lens (`cfg.json` + `sae_weights.safetensors`) or by sparsify
    (`cfg.json` + `sae.safetensors`, see `load_sparsify`)."""
    path = Path(path)
    if (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file():
        return load_sparsify(path, device)
    if not (path / "cfg.json").is_file():
        raise SAEMismatchError(f"no sae-lens SAE at {path} (expected cfg.json and sae_weights.safetensors)")
    return SAE.load_from_disk(path, device=device)


def load_sparsify(path: str | Path, device: str = "cpu") -> SAE:
    """An EleutherAI sparsify TopK checkpoint folder (`cfg.json` with d_in, k, num_latents or
    expansion_factor; `sae.safetensors` with encoder.weight [d_sae, d_in], encoder.bias, W_dec
    [d_sae, d_in], b_dec) as a sae-lens `TopKSAE` computing what sparsify computes: top k of
    ReLU((x - b_dec) W_enc^T + b_enc), decoded by W_dec + b_dec. (sae-lens' own
    `sparsify_disk_loader` transposes W_dec and sets `apply_b_dec_to_input` from `normalize_decoder`,
    while sparsify's encoder always subtracts b_dec.) A folder named `layers.<L>` records the hook
    `blocks.<L>.hook_resid_post` (sparsify trains on layer outputs); sparsify contexts start with BOS."""
    import json
    import re

    from sae_lens import TopKSAE, TopKSAEConfig
    from safetensors.torch import load_file

    path = Path(path)
    raw = json.loads((path / "cfg.json").read_text())
    unsupported = {k: raw[k] for k in ("transcode", "skip_connection", "signed", "multi_topk") if raw.get(k)}
    if raw.get("activation", "topk") != "topk":
        unsupported["activation"] = raw["activation"]
    if unsupported:
        raise SAEMismatchError(
            f"the sparsify checkpoint at {path} uses {unsupported}: only plain TopK SAEs are supported"
        )
    w = load_file(str(path / "sae.safetensors"))
    W_enc = w["encoder.weight"].float()
    d_sae, d_in = W_enc.shape
    if w["W_dec"].shape != (d_sae, d_in):
        raise SAEMismatchError(
            f"the sparsify checkpoint at {path} has W_dec {tuple(w['W_dec'].shape)}, expected {(d_sae, d_in)}"
        )
    m = re.fullmatch(r"layers[._](\d+)", path.name)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=int(raw["k"]), device=device)
    cfg.metadata.hook_name = f"blocks.{m.group(1)}.hook_resid_post" if m else None
    cfg.metadata.prepend_bos = True
    cfg.metadata.model_name = raw.get("model")
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc.T)
        sae.b_enc.copy_(w["encoder.bias"].float())
        sae.W_dec.copy_(w["W_dec"].float())
        sae.b_dec.copy_(w["b_dec"].float())
    return sae.to(device)


def sae_folder(root: str | Path, hook: str) -> Path:
    """The SAE folder of `hook` under `root`: `<root>/<hook>/`, or sparsify's `<root>/layers.<L>/`
    for `blocks.<L>.hook_resid_post` (a sparsify run folder can be `sae.source` as it is)."""
    import re

    root = Path(root)
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook)
    if not (root / hook).exists() and m and (root / f"layers.{m.group(1)}" / "sae.safetensors").is_file():
        return root / f"layers.{m.group(1)}"
    return root / hook


def load_release(release: str, sae_id: str, device: str = "cpu") -> SAE:
    """`SAE.from_pretrained(release, sae_id)` (needs the Hugging Face hub), or a release shipped
    with this package (`ssae_ray/release.py`: read by the same sae-lens disk loader, its files
    checked against the release's manifest)."""
    from ssae_ray import release as shipped

    if shipped.release_dir(release) is not None:
        return shipped.load_shipped(release, sae_id, device)
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except Exception as e:  # network / unknown release: say which
        raise SAEMismatchError(
            f"cannot load sae-lens release {release!r} sae_id {sae_id!r}: {e}. "
            "Releases need the Hugging Face hub; offline, point sae.source at a folder of saved SAEs."
        ) from e


def slice_sae(sae: SAE, k: int) -> SAE:
    """Keep the first k latents (the paper's compression experiment), in the SAE's own sae-lens
    class and config (thresholds kept; a TopK SAE keeps its k, which must fit the new width)."""
    d_sae = sae.cfg.d_sae
    if not 0 < k <= d_sae:
        raise SAEMismatchError(f"cannot slice an SAE of width {d_sae} to {k} latents")
    if getattr(sae.cfg, "k", None) is not None and type(sae).__name__ == "TopKSAE" and sae.cfg.k > k:
        raise SAEMismatchError(f"cannot slice a TopK SAE with k={sae.cfg.k} to {k} latents (fewer than k)")
    d = (
        sae.cfg.to_dict()
    )  # all metadata travels (hook, model, the training activation scale `act_scale`, ...)
    d.update(d_sae=k, device=str(sae.W_dec.device))
    out = type(sae)(type(sae.cfg).from_dict(d))
    with torch.no_grad():
        out.W_enc.data = sae.W_enc[:, :k].detach().clone()
        out.b_enc.data = sae.b_enc[:k].detach().clone()
        out.W_dec.data = sae.W_dec[:k].detach().clone()
        out.b_dec.data = sae.b_dec.detach().clone()
        if hasattr(sae, "threshold"):
            out.threshold.data = sae.threshold[:k].detach().clone()
    return out.to(sae.W_dec.device)


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - FVU: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over tokens."""
    x = x.reshape(-1, x.shape[-1]).float()
    x_hat = x_hat.reshape(-1, x.shape[-1]).float()
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return float(1 - resid / total)


def check_sae_fits(sae: SAE, acts: Tensor, hook: str, min_ev: float) -> float:
    """Refuse an SAE whose width does not match the hook, whose explained variance on `acts`
    ([N, d] or [B, T, d] of this hook; position 0 already dropped) is below `min_ev`, or whose
    trainable form (`training.archs.import_gsae`) does not reproduce it on those activations."""
    d = acts.shape[-1]
    if sae.cfg.d_in != d:
        raise SAEMismatchError(
            f"the SAE for {hook} has d_in={sae.cfg.d_in} but the model's activations there have "
            f"d={d}: wrong hook or wrong model for this SAE"
        )
    from ssae_ray.training.archs import check_form, import_gsae

    with torch.no_grad():
        x = acts.reshape(-1, d).to(sae.W_dec.dtype).to(sae.W_dec.device)
        ev = explained_variance(x, sae.decode(sae.encode(x)))
    if not math.isfinite(ev):
        raise SAEMismatchError(
            f"the SAE for {hook} has a non-finite explained variance ({ev}) on the model's activations at "
            "that hook: its weights or those activations hold NaN/inf (a diverged or corrupt SAE file, "
            "or an LM dtype that overflows, e.g. model.dtype=float16)"
        )
    with (
        torch.no_grad()
    ):  # the trainable form computes this GSAE's function on the model's own activations too
        check_form(import_gsae(sae, check=False), sae, x[:1024])
    if ev < min_ev:
        raise SAEMismatchError(
            f"the SAE for {hook} explains only {ev:.3f} of the variance of the model's activations at "
            f"that hook (need >= {min_ev}): a wrong hook, model or activation processing "
            f"(normalisation, BOS handling){_unfolded_hint(sae, x)}. Set sae.min_explained_variance to override."
        )
    log.info("SAE at %s explains %.3f of the variance", hook, ev)
    return ev


def _unfolded_hint(sae: SAE, x: Tensor) -> str:
    """Why an SAE trained on scaled activations fails on raw ones: sae-lens folds a release's
    `norm_scaling_factor` (sqrt(d_in) / E||x|| on its training data) into the weights where its
    registry lists one; where it lists none (gemma-2b-res-jb blocks.10 and .17) the SAE loads
    unfolded and sees activations several times too large. The hint gives what the SAE explains
    with the factor estimated from `x`."""
    if getattr(sae.cfg, "normalize_activations", "none") != "expected_average_only_in":
        return ""
    import copy

    c = float(sae.cfg.d_in**0.5 / x.float().norm(dim=-1).mean().clamp_min(1e-12))
    folded = copy.deepcopy(sae)
    folded.fold_activation_norm_scaling_factor(c)
    with torch.no_grad():
        ev = explained_variance(x, folded.decode(folded.encode(x)))
    return (
        f"; it records normalize_activations='expected_average_only_in' with no norm scaling factor folded "
        f"in (its sae-lens release lists none), so it reads activations at the wrong scale: with the factor "
        f"estimated from these activations ({c:.4g}) it would explain {ev:.3f}"
    )


def check_gsae(sae: SAE, hook: str, prepend_bos: bool | None = None) -> str:
    """Refuse a GSAE put on a hook other than its own (`metadata.hook_name`), trained with the
    other BOS convention than `prepend_bos` (`metadata.prepend_bos`), of an architecture the loop
    cannot finetune, or whose import into the trainable form changes its function. Returns its
    architecture (`training.archs.ARCHS`)."""
    from ssae_ray.training.archs import arch_of, import_gsae

    own = hook_of(sae)
    if own is not None and own != hook:
        raise SAEMismatchError(
            f"the SAE given for hook {hook} was trained on {own} (its metadata.hook_name): put it on {own} "
            "or load the SAE of this hook"
        )
    bos = getattr(sae.cfg.metadata, "prepend_bos", None)
    if prepend_bos is not None and isinstance(bos, bool) and bos != prepend_bos:
        raise SAEMismatchError(
            f"the SAE for {hook} was trained {'with' if bos else 'without'} a BOS token at the start of each "
            f"context (metadata.prepend_bos={bos}) but model.prepend_bos={prepend_bos}: set "
            f"model.prepend_bos={str(bos).lower()}"
        )
    try:
        arch = arch_of(sae)
        import_gsae(sae)
    except ValueError as e:
        raise SAEMismatchError(str(e)) from e
    return arch


def fit_check(cfg: Config, lm: LM, saes: dict[str, SAE], texts: list[str]) -> dict[str, float]:
    """`check_sae_fits` of every GSAE on the model's activations over (up to 32 contexts of)
    `texts`, tokenised as the GSAEs were trained (`model.prepend_bos`); position 0 dropped."""
    from ssae_ray.models import capture, tokenize_docs

    if not texts:
        raise SAEMismatchError("the fit check needs some text to run the model on; none was given")
    tb = tokenize_docs(lm.tokenizer, texts[:64], cfg.model.context_len, max_contexts=32,
                       prepend_bos=cfg.model.prepend_bos)  # fmt: skip
    acts = capture(lm, tb.input_ids, tb.attention_mask, list(saes))
    keep = tb.attention_mask[:, 1:].bool()
    return {
        h: check_sae_fits(sae, acts[h][:, 1:][keep], h, cfg.sae.min_explained_variance)
        for h, sae in saes.items()
    }


def load_gsaes(cfg: Config, lm: LM, folder: str | Path | None = None) -> dict[str, SAE]:
    """The GSAEs of `cfg.sae.hooks`: random (tests), from a sae-lens release, or from a folder
    holding one saved SAE per hook (`<folder>/<hook>/`, sae-lens or sparsify format), e.g. the
    pipeline's pretrained GSAEs. Each passes `check_gsae` (hook, BOS, architecture, exact import)."""
    from ssae_ray.models import validate_hooks

    hooks = list(cfg.sae.hooks)
    validate_hooks(lm, hooks)
    device = str(lm.device)
    src = cfg.sae.source
    saes: dict[str, SAE] = {}
    if src == "random":
        for i, h in enumerate(hooks):
            saes[h] = make_random_sae(lm.d_model, cfg.sae.d_sae, h, seed=cfg.seed + i, device=device,
                                      arch=cfg.sae.arch, k=cfg.sae.k)  # fmt: skip
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
            saes[h] = load_sae(sae_folder(root, h), device)
    for h, sae in saes.items():
        if sae.cfg.d_in != lm.d_model and not h.endswith("hook_z"):
            raise SAEMismatchError(
                f"the SAE for {h} has d_in={sae.cfg.d_in} but the model's width is {lm.d_model}"
            )
        check_gsae(sae, h, cfg.model.prepend_bos)
        if cfg.sae.slice_to is not None:
            saes[h] = slice_sae(sae, cfg.sae.slice_to)
    return saes
