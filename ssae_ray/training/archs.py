"""GSAE architectures: the trainable form of any SAE sae-lens loads that the loop can finetune, and
the way back to the sae-lens class it came from.

| arch | sae-lens class | activation | sparsity objective (per token) |
| --- | --- | --- | --- |
| `relu` | `StandardSAE` | ReLU(pre) | lam ||f||_1 (Eq. 1) |
| `jumprelu` | `JumpReLUSAE` (Gemma Scope, Llama Scope) | pre [pre > θ] | lam L0, θ trained by a straight-through estimator |
| `topk` | `TopKSAE` (sparsify) | top k of pre per token | k fixed; MSE + auxiliary dead-latent loss |
| `batchtopk` | `JumpReLUSAE` with `metadata.training_architecture == "batchtopk"` (sae-lens saves BatchTopK SAEs for inference as JumpReLU) | top k·N of the batch in training, JumpReLU at θ at inference | as `topk`; θ follows the smallest kept activation |

The trainable form (`TrainForm`) is one parametrisation for all of them, in the space the loop
trains in (inputs c·x, see `loop.py`): pre = (c·x - b_dec) W_enc + b_enc, unit-norm decoder rows,
x_hat = f W_dec + b_dec. A GSAE with decoder-row norms n, `apply_b_dec_to_input=False` or an
unfolded `expected_average_only_in` scale is brought to it exactly: latent j is multiplied by
c·n_j (W_enc columns by n_j, b_enc and θ by c·n_j, W_dec rows divided by n_j), b_dec·W_enc moves
into b_enc, the input scale into the weights. `import_gsae` then checks that the form computes
the loaded GSAE's reconstructions and activations before anything reads it. `export_form`
applies the exact inverse (the n_j fixed at import), so an SSAE exported after 0 steps equals
its GSAE, weights included, and is saved in the GSAE's own sae-lens class and config.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from sae_lens import SAE, JumpReLUSAE, StandardSAE, TopKSAE
from torch import Tensor

from ssae_ray.training.losses import TrainingError, batch_topk_acts, jumprelu, topk_acts

log = logging.getLogger("ssae_ray")

ARCHS = ("relu", "jumprelu", "topk", "batchtopk")
SPARSITY_KNOB = {"relu": "lam", "jumprelu": "lam", "topk": "k", "batchtopk": "k"}
"""The sparsity knob of each architecture: λ (L1 or L0 coefficient) or k."""
IMPORT_RTOL = 1e-5
"""Largest relative error (||a - b|| / ||b|| over a batch, float64) of the imported form's
reconstructions and activations against the loaded GSAE's."""


class SAEArchError(TrainingError):
    """An SAE the loop cannot finetune, or whose import does not reproduce it."""


def arch_of(sae: SAE) -> str:
    """The architecture the loop finetunes `sae` as; refuses those it cannot train faithfully."""
    kind = type(sae)
    if kind is StandardSAE:
        return "relu"
    if kind is JumpReLUSAE:
        trained_as = getattr(sae.cfg.metadata, "training_architecture", None)
        return "batchtopk" if trained_as == "batchtopk" else "jumprelu"
    if kind is TopKSAE:
        return "topk"
    raise SAEArchError(
        f"cannot finetune a sae-lens {kind.__name__} (architecture {sae.cfg.architecture()!r}"
        f"{', hook ' + str(sae.cfg.metadata.hook_name) if sae.cfg.metadata.hook_name else ''}): supported are "
        "StandardSAE (ReLU), JumpReLUSAE (JumpReLU; BatchTopK saved for inference) and TopKSAE. Transcoders, "
        "gated, matching-pursuit and temporal SAEs are not SAEs of one hook this loop can train."
    )


def batchtopk_k(sae: SAE) -> float:
    details = getattr(sae.cfg.metadata, "training_architecture_details", None) or {}
    k = details.get("k") if isinstance(details, dict) else None
    if k is None:
        raise SAEArchError(
            "this JumpReLUSAE was trained as BatchTopK (metadata.training_architecture) but its metadata "
            "records no k (training_architecture_details.k); set train.k"
        )
    return float(k)


@dataclass
class TrainForm:
    """An SAE in the loop's trainable form (see the module docstring); weights float32."""

    arch: str
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    """[d_sae, d_in], unit-norm rows."""
    b_dec: Tensor
    threshold: Tensor | None
    """[d_sae] θ of `jumprelu` (trained) and `batchtopk` (inference threshold), else None."""
    k: float | None
    """Latents per token of `topk` (exact) and `batchtopk` (batch average), else None."""
    row_norms: Tensor
    """[d_sae] the GSAE's decoder-row norms n_j, folded at import and unfolded at export."""
    act_scale: float
    like: SAE = field(repr=False)
    """The GSAE (config, class and metadata of the export)."""
    select: Tensor | None = None
    """`topk` from a GSAE with `rescale_acts_by_decoder_norm=False`: rank latents by pre / n_j, as
    the GSAE does (None: by pre)."""

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def params(self) -> list[Tensor]:
        """The tensors Adam trains (θ for `jumprelu`; `batchtopk`'s θ is a running statistic)."""
        ps = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        return ps + [self.threshold] if self.arch == "jumprelu" and self.threshold is not None else ps

    def pre(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def encode(self, x: Tensor) -> Tensor:
        """Inference activations of scaled inputs [N, d_in] (BatchTopK: the JumpReLU at θ)."""
        return self.activate(self.pre(x))

    def activate(self, pre: Tensor) -> Tensor:
        if self.arch == "relu":
            return pre.relu()
        if self.arch in ("jumprelu", "batchtopk"):
            assert self.threshold is not None
            return jumprelu(pre.relu(), self.threshold)
        return topk_acts(pre, int(self.k or 0), self.select)

    def train_acts(self, pre: Tensor) -> Tensor:
        """Training activations: `batchtopk` keeps the top k·N of the batch, others as `activate`."""
        return batch_topk_acts(pre, float(self.k or 0)) if self.arch == "batchtopk" else self.activate(pre)

    def decode(self, f: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, f, self.W_dec)


def _fold_input_scale(sae: SAE, norm_scaling_factor: float | None) -> SAE:
    """A copy of `sae` whose input normalisation is folded into its weights, or `sae` itself."""
    mode = getattr(sae.cfg, "normalize_activations", "none") or "none"
    if mode == "none":
        return sae
    if mode in ("layer_norm", "constant_norm_rescale"):
        raise SAEArchError(
            f"the SAE at {sae.cfg.metadata.hook_name} normalises each token at run time "
            f"(normalize_activations={mode!r}); that cannot be folded into its weights, so it cannot be "
            "finetuned here"
        )
    if mode == "expected_average_only_in" and norm_scaling_factor is not None:
        out = copy.deepcopy(sae)
        out.fold_activation_norm_scaling_factor(norm_scaling_factor)
        return out
    # sae-lens applies neither mode at inference (its trainer folds them into the weights when it
    # saves; `from_pretrained` folds a release's known factor): the loaded SAE already reads raw
    # activations, which the fit check confirms
    log.warning(
        "the SAE at %s records normalize_activations=%r but no scaling factor to fold; it is imported as "
        "sae-lens runs it (on raw activations)",
        sae.cfg.metadata.hook_name,
        mode,
    )
    return sae


@torch.no_grad()
def import_gsae(sae: SAE, act_scale: float = 1.0, device: str | torch.device = "cpu",
                norm_scaling_factor: float | None = None, check: bool = True) -> TrainForm:  # fmt: skip
    """The trainable form of `sae` (any `arch_of` SAE) at activation scale `act_scale`, checked
    (`check_form`) against `sae` on a probe batch built from its own weights."""
    arch = arch_of(sae)
    src = _fold_input_scale(sae, norm_scaling_factor)
    c = float(act_scale)
    dev = torch.device(device)
    W_enc, b_enc, W_dec, b_dec = (
        p.detach().to(dev, torch.float64) for p in (src.W_enc, src.b_enc, src.W_dec, src.b_dec)
    )
    n = W_dec.norm(dim=1).clamp_min(1e-12)
    if not src.cfg.apply_b_dec_to_input:  # (x - b_dec) W + (b_enc + b_dec W) = x W + b_enc
        b_enc = b_enc + b_dec @ W_enc
    threshold = k = select = None
    if arch in ("jumprelu", "batchtopk"):
        threshold = (src.threshold.detach().to(dev, torch.float64) * c * n).float()
        k = batchtopk_k(src) if arch == "batchtopk" else None
    if arch == "topk":
        k = float(src.cfg.k)
        if not src.cfg.rescale_acts_by_decoder_norm and not torch.allclose(n, torch.ones_like(n), rtol=1e-6):
            select = (1 / n).float()
    form = TrainForm(
        arch,
        (W_enc * n).float().contiguous(),
        (b_enc * c * n).float(),
        (W_dec / n[:, None]).float().contiguous(),
        (b_dec * c).float(),
        threshold,
        k,
        n.float(),
        c,
        sae,
        select,
    )
    if check:
        check_form(form, src, probe_inputs(src))
    return form


def probe_inputs(sae: SAE, n: int = 256, seed: int = 0) -> Tensor:
    """[n, d_in] float64 inputs that make an SAE's latents fire: b_dec plus sparse positive
    combinations of its decoder rows, plus noise at the decoder-row scale."""
    g = torch.Generator().manual_seed(seed)
    W_dec = sae.W_dec.detach().double().cpu()
    m = W_dec.shape[0]
    codes = torch.rand(n, m, generator=g, dtype=torch.float64) * (
        torch.rand(n, m, generator=g) < min(1.0, 8 / m)
    )
    scale = float(W_dec.norm(dim=1).mean())
    x = codes @ W_dec * 4 + 0.1 * scale * torch.randn(n, W_dec.shape[1], generator=g, dtype=torch.float64)
    return x + sae.b_dec.detach().double().cpu()


@torch.no_grad()
def check_form(form: TrainForm, sae: SAE, x: Tensor, rtol: float = IMPORT_RTOL) -> None:
    """Refuse a trainable form whose reconstructions or activations (times c·n_j, the fold) on raw
    inputs `x` [N, d_in] differ from `sae`'s by more than `rtol` (relative, over the batch). Both
    sides run in float64, so what is compared is the fold itself (and the weights' rounding)."""
    ref = copy.deepcopy(sae).to(dtype=torch.float64, device="cpu")
    x = x.reshape(-1, x.shape[-1]).to(torch.float64).cpu()
    f_ref = ref.encode(x)
    xh_ref = ref.decode(f_ref)
    fd = _as64(form)
    f = fd.encode(x * form.act_scale)
    xh = fd.decode(f) / form.act_scale
    f = f / (form.act_scale * fd.row_norms)
    err_x = float((xh - xh_ref).norm() / xh_ref.norm().clamp_min(1e-300))
    err_f = float((f - f_ref).norm() / f_ref.norm().clamp_min(1e-300))
    if not (err_x <= rtol and err_f <= rtol):
        raise SAEArchError(
            f"importing the {type(sae).__name__} at {sae.cfg.metadata.hook_name} into the trainable form changed "
            f"its function (relative error: reconstructions {err_x:.2e}, activations {err_f:.2e}; allowed "
            f"{rtol:g}); this SAE cannot be finetuned faithfully"
        )


def _as64(form: TrainForm) -> TrainForm:
    def d(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to("cpu", torch.float64)

    return TrainForm(form.arch, d(form.W_enc), d(form.b_enc), d(form.W_dec), d(form.b_dec), d(form.threshold),  # type: ignore[arg-type]
                     form.k, d(form.row_norms), form.act_scale, form.like, d(form.select))  # type: ignore[arg-type]  # fmt: skip


@torch.no_grad()
def export_form(form: TrainForm, hook: str) -> SAE:
    """The form as an SAE of its GSAE's sae-lens class and config (float32, reading raw
    activations): the exact inverse of `import_gsae` with the GSAE's row norms n_j, the activation
    scale recorded in `metadata.act_scale`, and `k` / θ updated. BatchTopK goes out as sae-lens
    saves it for inference: a JumpReLUSAE whose θ is the running batch threshold."""
    like = form.like
    d = like.cfg.to_dict()
    d.update(d_sae=form.d_sae, dtype="float32", device=str(form.W_enc.device))
    if d.get("normalize_activations") in ("expected_average_only_in", "covariance_whitening"):
        d["normalize_activations"] = "none"  # folded (or a no-op at inference)
    meta = dict(d.get("metadata") or {})
    meta.update(hook_name=hook, act_scale=form.act_scale)
    if form.arch == "topk":
        d["k"] = int(form.k or 0)
    if form.arch == "batchtopk":
        details = dict(meta.get("training_architecture_details") or {})
        details["k"] = form.k
        meta["training_architecture_details"] = details
    d["metadata"] = meta
    out = type(like)(type(like.cfg).from_dict(d))
    c, n = form.act_scale, form.row_norms.to(form.W_enc.device)
    W_enc = form.W_enc / n
    b_enc = form.b_enc / (c * n)
    b_dec = form.b_dec / c
    if not out.cfg.apply_b_dec_to_input:
        b_enc = b_enc - b_dec @ W_enc
    out.W_enc.data = W_enc.contiguous()
    out.b_enc.data = b_enc.clone()
    out.W_dec.data = (form.W_dec * n[:, None]).contiguous()
    out.b_dec.data = b_dec.clone()
    if form.threshold is not None:
        out.threshold.data = form.threshold / (c * n)
    return out
