"""SSAE training: losses (ERM, TERM, adaptive λ; per architecture), GSAE architectures (exact
import and export), the multi-SAE loop, the activation cache, Ray Train wiring and GSAE pretraining."""

from ssae_ray.training.archs import ARCHS, TrainForm, arch_of, export_form, import_gsae
from ssae_ray.training.cache import (
    cache_activations,
    iter_cache_batches,
    lm_batches,
    open_cache,
    shuffle_buffer,
)
from ssae_ray.training.loop import FinetuneResult, finetune
from ssae_ray.training.losses import (
    AdaptiveLambda,
    LossScale,
    TrainingError,
    sae_forward,
    sae_loss,
    term_loss,
    tilted_loss,
)
from ssae_ray.training.pretrain import pretrain_gsaes
from ssae_ray.training.ray_train import run_finetune

__all__ = [
    "ARCHS",
    "AdaptiveLambda",
    "FinetuneResult",
    "LossScale",
    "TrainForm",
    "TrainingError",
    "arch_of",
    "cache_activations",
    "export_form",
    "import_gsae",
    "finetune",
    "iter_cache_batches",
    "lm_batches",
    "open_cache",
    "pretrain_gsaes",
    "run_finetune",
    "sae_forward",
    "sae_loss",
    "shuffle_buffer",
    "term_loss",
    "tilted_loss",
]
