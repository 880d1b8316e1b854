"""The physics pipeline as a composition of cached stages.

    corpus -> LM -> GSAEs (pretrained / released / random) -> index -> selections (per strategy)
    -> activation caches -> Ray Tune sweep (one MLflow child run per trial) -> evaluation on the
    test sets -> report, all logged under the sweep's MLflow parent run.

Each `stage_*` function takes the config and returns the folder it wrote (or found cached).
`run_physics` runs them in order and records the wall time of each stage.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from ssae_ray.config import Config
from ssae_ray.stages import BUILDS, StageError, read_manifest, run_stage, stage_key, write_json_atomic

log = logging.getLogger("ssae_ray")
T = TypeVar("T")

_MEMO: dict[tuple[str, str], Any] = {}


def _memo(name: str, cfg: Config, fn: Callable[[], T]) -> T:
    """Stages are cached on disk; within one process also skip re-checking them."""
    from ssae_ray.config import config_hash

    key = (name, config_hash(cfg))
    if key not in _MEMO:
        _MEMO[key] = fn()
    return _MEMO[key]


class Timer:
    """Wall time per stage, and whether it was served from cache."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def __call__(self, name: str, fn: Callable[[], T], cached: bool | None = None) -> T:
        """Run one stage; it counts as cached when it built no stage folder (or as `cached` says)."""
        t0 = time.perf_counter()
        before = BUILDS[0]
        log.info("== stage %s", name)
        out = fn()
        secs = time.perf_counter() - t0
        cached = (BUILDS[0] == before) if cached is None else cached
        self.rows.append({"stage": name, "seconds": round(secs, 1), "cached": cached})
        log.info("== stage %s done in %.1f s%s", name, secs, " (cached)" if cached else "")
        return out

    def table(self) -> str:
        lines = ["| stage | seconds | cached |", "| --- | --- | --- |"]
        lines += [
            f"| {r['stage']} | {r['seconds']:.1f} | {'yes' if r['cached'] else ''} |" for r in self.rows
        ]
        total = sum(r["seconds"] for r in self.rows)
        lines.append(f"| **total** | {total:.1f} | |")
        return "\n".join(lines)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["stage", "seconds", "cached"])
            w.writeheader()
            w.writerows(self.rows)
        return path


# ---------------------------------------------------------------------------------------------
# The stages


def _lm(cfg: Config):
    from ssae_ray.models import load_lm

    return load_lm(cfg.model, cfg.root / "models")


def offload(cfg: Config) -> bool:
    """Whether the LM work of this job goes to GPU workers: the driver joined (or was handed) a Ray
    cluster with GPUs and holds none itself (a CPU head). The driver then loads no LM; caching,
    the GSAE fit check, TracIn, test-set preparation and evaluation run as Ray tasks holding a GPU
    (`resources.on_gpu_worker`). A local run (no `ray.address`) keeps everything in this process."""
    import ray

    if not (os.environ.get("RAY_ADDRESS") or cfg.ray.address or ray.is_initialized()):
        return False
    from ssae_ray.resources import offload_to_gpu_workers
    from ssae_ray.runtime import init_ray

    init_ray(cfg.ray)
    return offload_to_gpu_workers()


def with_lm(cfg: Config, lm: Any, fn: Callable[..., T], *args: Any, name: str = "") -> T:
    """`fn(lm, *args)` here with the driver's LM (loaded if not given), or, when `offload(cfg)`, in a
    Ray task holding a GPU that loads the LM on that GPU (`fn` and `args` travel by pickle)."""
    if lm is not None or not offload(cfg):
        return fn(lm if lm is not None else _lm(cfg), *args)
    from ssae_ray.multinode import was_checked
    from ssae_ray.resources import on_gpu_worker

    return on_gpu_worker(_call_with_lm, cfg, fn, *args, name=name or getattr(fn, "__name__", "lm-task"),
                         checked=was_checked(cfg.root))  # fmt: skip


def _call_with_lm(cfg: Config, fn: Callable[..., T], *args: Any, checked: bool = False) -> T:
    from ssae_ray.multinode import check_here
    from ssae_ray.runtime import setup_logging

    setup_logging()
    check_here(cfg.root, checked)  # a node that joined after the preflight must see the work dir too
    return fn(_lm(cfg), *args)


def _tokenizer(cfg: Config) -> Any:
    """The LM's tokenizer alone (for corpus token counts on a driver that holds no LM); None when
    it cannot be loaded without the model (GGUF sources)."""
    try:
        from transformers import AutoTokenizer

        from ssae_ray.models import _resolve_source
        from ssae_ray.resources import on_gpu_worker

        # `tiny` builds its model folder on first use: on a GPU worker, so the driver creates no weights
        where = on_gpu_worker if cfg.model.source == "tiny" else (lambda f, *a, **_k: f(*a))
        folder, gguf = where(_resolve_source, cfg.model, cfg.root / "models", name="tiny-model")
        return None if gguf is not None else AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - token counts are a convenience
        log.warning("no tokenizer on the driver (%s); the corpus manifest gets no LM token counts", e)
        return None


def stage_corpus(cfg: Config, lm: Any = None) -> Path:
    from ssae_ray.data import build_corpus

    if lm is None and offload(cfg):
        tok = _tokenizer(cfg)
    else:
        tok = lm.tokenizer if lm is not None else None
    return _memo("corpus", cfg, lambda: build_corpus(cfg, tokenizer=tok))


def _texts(corpus_dir: Path, split: str) -> list[str]:
    from ssae_ray.data import load_split

    return [str(t) for t in load_split(corpus_dir, split).column("text").to_pylist()]


def stage_gsaes(cfg: Config, lm: Any = None, corpus_dir: Path | None = None) -> Path:
    """A folder with one sae-lens GSAE per hook (`<folder>/<hook>/`): pretrained by the pipeline
    (`sae.source=pretrain`), loaded from a release or a folder, or random (tests). Each GSAE is
    checked against the model's activations at its hook before anything is trained on it."""
    corpus_dir = corpus_dir or stage_corpus(cfg, lm)
    return _memo("gsaes", cfg, lambda: with_lm(cfg, lm, _gsaes_with, cfg, corpus_dir, name="gsaes+fit-check"))


def _gsaes_with(lm: Any, cfg: Config, corpus_dir: Path | None) -> Path:
    return _gsaes(cfg, lm, corpus_dir)


def _gsaes(cfg: Config, lm: Any, corpus_dir: Path | None) -> Path:
    from ssae_ray.models import validate_hooks
    from ssae_ray.saes import fit_check, load_gsaes, save_sae

    validate_hooks(lm, cfg.sae.hooks)
    corpus_dir = corpus_dir or stage_corpus(cfg, lm)
    if cfg.sae.source == "pretrain":
        from ssae_ray.training.pretrain import pretrain_gsaes

        texts = _texts(corpus_dir, "corpus")
        random.Random(cfg.seed).shuffle(texts)  # a sample of the whole corpus, not its first rows
        folder = pretrain_gsaes(cfg, lm, texts)
        saes = load_gsaes(cfg, lm, folder)
    else:
        saes = load_gsaes(cfg, lm)
        key = stage_key("gsaes", cfg.sae, cfg.model.source, cfg.seed)

        def build(tmp: Path) -> dict[str, Any]:
            for h, sae in saes.items():
                save_sae(sae, tmp / h)
            return {"source": cfg.sae.source, "hooks": list(saes)}

        folder = run_stage(cfg.root, "gsae", key, build)
    # The fit check: explained variance of each GSAE on a few batches of held-out in-domain text.
    fit_check(cfg, lm, saes, _texts(corpus_dir, "val")[:32] or _texts(corpus_dir, "corpus")[:32])
    return folder


def stage_index(cfg: Config, corpus_dir: Path | None = None) -> Path:
    from ssae_ray.retrieval import build_index
    from ssae_ray.retrieval.index import corpus_file, index_key
    from ssae_ray.runtime import init_ray

    corpus_dir = corpus_dir or stage_corpus(cfg)
    done = cfg.root / "index" / index_key(cfg, corpus_file(cfg, corpus_dir))
    if read_manifest(done) is not None:  # finished: no need to start Ray
        return done
    init_ray(cfg.ray)
    return _memo("index", cfg, lambda: build_index(cfg, corpus_dir))


def stage_retrieve(
    cfg: Config,
    strategy: str | None = None,
    lm: Any = None,
    corpus_dir: Path | None = None,
    index_dir: Path | None = None,
    gsae_dir: Path | None = None,
) -> Path:
    from ssae_ray.retrieval import retrieve
    from ssae_ray.saes import load_sae

    strategy = strategy or cfg.retrieval.strategy
    corpus_dir = corpus_dir or stage_corpus(cfg)
    index_dir = index_dir or stage_index(cfg, corpus_dir)
    if strategy.endswith("+tracin"):
        gsae_dir = gsae_dir or stage_gsaes(cfg, lm, corpus_dir)

        def tracin(lm: Any) -> Path:
            sae = load_sae(gsae_dir / cfg.sae.hooks[0], str(lm.device))
            return retrieve(cfg, corpus_dir, index_dir, strategy, lm=lm, sae=sae)

        return with_lm(cfg, lm, tracin, name=f"retrieve-{strategy}")
    if lm is None and offload(cfg):  # the seed embedding model runs on a GPU worker, not on the head
        from ssae_ray.resources import on_gpu_worker

        return on_gpu_worker(retrieve, cfg, corpus_dir, index_dir, strategy, name=f"retrieve-{strategy}")
    return retrieve(cfg, corpus_dir, index_dir, strategy)


def stage_cache(
    cfg: Config,
    strategies: tuple[str, ...] | None = None,
    lm: Any = None,
    hooks: Any = None,
    reserve_bytes: int = 0,
) -> dict[str, Path]:
    """Activations of every hook on each selection, captured once and shared by all trials. Each
    cache holds what a trial reads (`training.cache.cache_plan`: steps × batch_tokens plus
    `train.cache_margin`); the sizes are printed, and the work dir's free space is checked for all
    of them (plus `reserve_bytes`, the sweep's own outputs) before anything is captured."""
    import json

    import pyarrow.parquet as pq

    from ssae_ray.resources import disk_plan, human_bytes
    from ssae_ray.training.cache import cache_plan

    if lm is None and not offload(cfg):
        lm = _lm(cfg)
    corpus_dir = stage_corpus(cfg, lm)
    index_dir = stage_index(cfg, corpus_dir)
    gsae_dir = stage_gsaes(cfg, lm, corpus_dir)
    hooks = list(hooks or cfg.sae.hooks)
    d_in = {h: int(json.loads((gsae_dir / h / "cfg.json").read_text())["d_in"]) for h in hooks}
    tok = lm.tokenizer if lm is not None else _tokenizer(cfg)
    plans = {}
    for s in strategies or cfg.sweep.strategies:
        sel = stage_retrieve(cfg, s, lm, corpus_dir, index_dir, gsae_dir)
        texts = [str(t) for t in pq.read_table(sel / "selection.parquet", columns=["text"]).column("text")]
        plans[s] = cache_plan(cfg, texts, hooks, d_in, tok)
    for s, p in plans.items():
        print(f"activation cache [{s}]: {p.n_tokens:,} tokens x {len(hooks)} hooks ({cfg.train.cache_dtype}) = "
              f"{human_bytes(p.bytes)} on disk{f' (cached at {p.path})' if p.cached else ''}")  # fmt: skip
    # Only what is missing: a cache found under its key needs no space.
    items = [(f"activation cache [{s}]", p.bytes) for s, p in plans.items() if not p.cached]
    if reserve_bytes:
        items.append(("sweep checkpoints and outputs", reserve_bytes))
    if items:
        disk_plan(cfg.root, items, f"the activation caches ({len(items)}) and sweep outputs")
    return {s: with_lm(cfg, lm, _capture, cfg, p.texts, hooks, p.max_tokens, name=f"cache-{s}")
            for s, p in plans.items()}  # fmt: skip


def _capture(lm: Any, cfg: Config, texts: list[str], hooks: list[str], max_tokens: int | None) -> Path:
    from ssae_ray.training import cache_activations

    return cache_activations(cfg, lm, texts, hooks, max_tokens)


def stage_pretrain(cfg: Config) -> Path:
    if cfg.sae.source != "pretrain":
        raise StageError(f"sae.source is {cfg.sae.source!r}: this preset has no GSAEs to pretrain")
    return stage_gsaes(cfg)


def stage_finetune(cfg: Config, strategy: str | None = None) -> Path:
    """One finetune of every GSAE on one selection, distributed with Ray Train."""
    from ssae_ray.resources import check_schedulable
    from ssae_ray.runtime import init_ray
    from ssae_ray.training.ray_train import run_finetune

    strategy = strategy or cfg.retrieval.strategy
    lm = None if offload(cfg) else _lm(cfg)
    gsae_dir = stage_gsaes(cfg, lm)
    cache = stage_cache(cfg, (strategy,), lm)[strategy]
    init_ray(cfg.ray)
    check_schedulable(cfg, parts=("finetune",))
    out = cfg.root / "finetune" / stage_key("finetune", cfg.train, strategy, str(gsae_dir), str(cache))
    return run_finetune(cfg, gsae_dir, cache, out)


def _test_sets(cfg: Config, lm: Any, corpus_dir: Path, names: tuple[str, ...]) -> dict[str, Any]:
    from ssae_ray.eval.evaluate import prepare_test_set

    sets = {}
    for name in names:
        split = "general_test" if name == "general" else name
        texts = _texts(corpus_dir, split)
        if not texts:
            if name == "test":
                raise StageError(f"the corpus has no in-domain test documents ({corpus_dir}/test.parquet)")
            log.warning("test set %s is empty; skipped", name)
            continue
        sets[name] = prepare_test_set(
            lm,
            name,
            texts,
            list(cfg.sae.hooks),
            cfg.model.context_len,
            cfg.eval.tokens_for(name),
            cfg.eval.batch_size,
            cfg.model.prepend_bos,
        )
    return sets


def _test_sets_with(lm: Any, cfg: Config, corpus_dir: Path, names: tuple[str, ...]) -> dict[str, Any]:
    return _test_sets(cfg, lm, corpus_dir, names)


def sweep_config(cfg: Config) -> Config:
    """The config the sweep and its evaluation see: `sae.hooks` narrowed to `sweep.hooks`."""
    hooks = cfg.sweep.hooks
    if hooks is None:
        return cfg
    extra = [h for h in hooks if h not in cfg.sae.hooks]
    if extra:
        raise StageError(f"sweep.hooks {extra} are not among sae.hooks {list(cfg.sae.hooks)}")
    return cfg.replace(sae={"hooks": list(hooks)})


def sweep_key(cfg: Config, gsae_dir: Path, caches: dict[str, Path]) -> str:
    """What the trials depend on: training, the grid, the validation set, GSAEs and caches. Settings
    read only by the evaluation (`sweep.l0_range`, `sweep.match_l0`, bootstrap, ...) are left out,
    so changing them re-evaluates without retraining."""
    grid_keys = ("lams", "tilts", "seeds", "strategies", "hooks", "tilt_strategies", "select_metric")
    sweep = {k: getattr(cfg.sweep, k) for k in grid_keys}
    if cfg.sweep.knob != "lam":
        sweep["knob"] = cfg.sweep.knob
    val = (cfg.eval.tokens_for("val"), cfg.eval.batch_size, cfg.model.context_len,
           *(("bos",) if cfg.model.prepend_bos else ()))  # fmt: skip
    return stage_key("sweep", cfg.train, sweep, val, str(gsae_dir), sorted(map(str, caches.values())))


class SweepPlan(NamedTuple):
    corpus_dir: Path
    gsae_dir: Path
    caches: dict[str, Path]
    folder: Path
    """`<workdir>/sweep/<hash of train, sweep, eval configs, GSAEs and caches>`."""


def sweep_output_bytes(cfg: Config, gsae_dir: Path) -> int:
    """Disk a sweep writes: each trial's best SAEs (float32), plus one checkpoint (SAEs, their
    trainable weights as they are, and Adam's two moments) per trial running at once."""
    import json

    from ssae_ray.sweep import grid

    per_trial = 0
    for h in sweep_config(cfg).sae.hooks:
        c = json.loads((gsae_dir / h / "cfg.json").read_text())
        d, width = int(c["d_in"]), cfg.sae.slice_to or int(c["d_sae"])
        per_trial += 4 * (2 * d * width + width + d)
    n = len(grid(cfg))
    return per_trial * n + 4 * per_trial * min(max(1, cfg.sweep.max_concurrent_trials), n)


def plan_sweep(cfg: Config, lm: Any, timer: Timer) -> SweepPlan:
    """Everything a sweep reads (corpus, GSAEs, selections, activation caches), built or found."""
    from ssae_ray import tracking

    tracking.check_tracking(tracking.tracking_uri(cfg))  # fail before hours of work
    corpus_dir = timer("corpus", lambda: stage_corpus(cfg, lm))
    from ssae_ray.data import check_splits

    # Before the GSAEs, index and caches: the sweep retrieves from the seed, selects on val, scores test.
    check_splits(corpus_dir, ("seed", "val", "test"), "the physics sweep")
    gsae_dir = timer("gsaes", lambda: stage_gsaes(cfg, lm, corpus_dir))
    reserve = sweep_output_bytes(cfg, gsae_dir)
    caches = timer("retrieve+cache", lambda: stage_cache(cfg, None, lm, sweep_config(cfg).sae.hooks, reserve))
    key = sweep_key(cfg, gsae_dir, caches)
    return SweepPlan(corpus_dir, gsae_dir, caches, cfg.root / "sweep" / key)


def stage_sweep(
    cfg: Config,
    force: bool = False,
    lm: Any = None,
    timer: Timer | None = None,
    plan: SweepPlan | None = None,
):
    """The Ray Tune sweep; finished trials (a `done.json` each) are not rerun. `force` retrains every
    trial: the previous sweep folder is moved aside (`<folder>.replaced`) and removed only once the new
    sweep has finished, so a failed or interrupted forced run loses nothing."""
    from ssae_ray.sweep import grid, run_sweep

    timer = timer or Timer()
    if lm is None and not offload(cfg):
        lm = _lm(cfg)
    plan = plan or plan_sweep(cfg, lm, timer)
    aside = plan.folder.with_name(plan.folder.name + ".replaced")
    if force and plan.folder.exists():
        shutil.rmtree(aside, ignore_errors=True)
        plan.folder.rename(aside)
        log.info("--force: the previous sweep is moved to %s until the new one has finished", aside)
    scfg = sweep_config(cfg)
    val = timer(
        "val set",
        lambda: with_lm(cfg, lm, _test_sets_with, scfg, plan.corpus_dir, ("val",), name="val-set").get("val"),
        False,
    )
    if val is None:
        raise StageError("the corpus has no validation documents; the sweep selects on validation")
    done = all((plan.folder / "trials" / t.name / "done.json").is_file() for t in grid(cfg))
    result = timer(
        "sweep",
        lambda: run_sweep(
            sweep_config(cfg), plan.gsae_dir, plan.caches, val, plan.folder, cfg.root / "models"
        ),
        done,
    )
    if force:
        shutil.rmtree(aside, ignore_errors=True)
    return result


def stage_eval(
    cfg: Config, force: bool = False, lm: Any = None, timer: Timer | None = None, retrain: bool = False
) -> Path:
    """Evaluate the sweep's best checkpoints and the GSAEs on the test sets; write the report.
    `force` re-evaluates even when the report is cached; `retrain` also retrains the sweep."""
    from ssae_ray.eval.runner import evaluate_sweep, log_to_mlflow
    from ssae_ray.saes import load_sae

    timer = timer or Timer()
    if lm is None and not offload(cfg):
        lm = _lm(cfg)
    plan = plan_sweep(cfg, lm, timer)
    out = plan.folder / "eval"
    ekey = stage_key(
        "eval", cfg.eval, cfg.sweep, cfg.sae.hooks, cfg.corpus, *(("bos",) if cfg.model.prepend_bos else ())
    )
    stamp = out / "eval_key.txt"
    if (
        (out / "report.md").is_file()
        and stamp.is_file()
        and stamp.read_text() == ekey
        and not (force or retrain)
    ):
        log.info("evaluation cached at %s", out)
        timer("sweep", lambda: plan.folder, True)
        timer("eval", lambda: out, True)
        return out / "report.md"
    sweep = stage_sweep(cfg, retrain, lm, timer, plan)
    scfg = sweep_config(cfg)

    def evaluate(lm: Any) -> tuple[Any, list[dict[str, Any]]]:  # here or in a GPU task (test sets stay there)
        tt = Timer()
        tests = tt(
            "test sets", lambda: _test_sets(scfg, lm, plan.corpus_dir, ("test", "ood", "general")), False
        )
        gsaes = {h: load_sae(plan.gsae_dir / h, str(lm.device)) for h in scfg.sae.hooks}
        return tt("eval", lambda: evaluate_sweep(scfg, lm, sweep, gsaes, tests, out), False), tt.rows

    outputs, rows = with_lm(cfg, lm, evaluate, name="test-sets+eval")
    timer.rows += rows
    stamp.write_text(ekey)
    extra = {f"retrieval/{s}": c for s, c in _selection_manifests(cfg).items()}
    extra["corpus"] = plan.corpus_dir / "manifest.json"
    log_to_mlflow(sweep, outputs, extra)
    return outputs.folder / "report.md"


def _selection_manifests(cfg: Config) -> dict[str, Path]:
    root = cfg.root / "selection"
    out = {}
    if root.is_dir():
        for d in sorted(root.iterdir()):
            m = read_manifest(d)
            if m and m.get("strategy") in cfg.sweep.strategies:
                out[m["strategy"]] = d / "manifest.json"
    return out


def stage_autointerp(cfg: Config) -> Path:
    from ssae_ray.autointerp import run_autointerp

    lm = None if offload(cfg) else _lm(cfg)
    report = stage_eval(cfg, lm=lm)
    corpus_dir = stage_corpus(cfg, lm)
    return with_lm(cfg, lm, lambda lm: run_autointerp_on_best(cfg, lm, report.parent, corpus_dir, run_autointerp),
                   name="autointerp")  # fmt: skip


def run_autointerp_on_best(cfg: Config, lm: Any, eval_dir: Path, corpus_dir: Path, fn: Callable) -> Path:
    """Score the GSAE and the best SSAE of each strategy at the first hook on the in-domain test set."""
    saes, hook, texts = best_saes(cfg, lm, eval_dir, corpus_dir)
    return fn(cfg, lm, saes, hook, texts, eval_dir.parent / "autointerp")


def best_saes(
    cfg: Config, lm: Any, eval_dir: Path, corpus_dir: Path
) -> tuple[dict[str, Any], str, list[str]]:
    """(the GSAE and every best-per-λ SSAE by auto-interp name, the first sweep hook, the in-domain
    test texts)."""
    from ssae_ray.saes import load_sae

    sweep_dir = eval_dir.parent
    hook = sweep_config(cfg).sae.hooks[0]
    saes = {"gsae": load_sae(stage_gsaes(cfg, lm, corpus_dir) / hook, str(lm.device))}
    for name, path in best_ssaes(sweep_dir, hook).items():
        saes[name] = load_sae(path, str(lm.device))
    return saes, hook, _texts(corpus_dir, "test")


def best_ssaes(sweep_dir: Path, hook: str) -> dict[str, Path]:
    """The best checkpoint of each trial at `hook`, named `<strategy>-tilt<t>-lam<λ>-seed<s>` (the
    seed is part of the name, so two seeds never overwrite each other's outputs)."""
    best = sweep_dir / "sweep_trials.csv"
    out: dict[str, Path] = {}
    if best.is_file():
        with open(best) as f:
            rows = [r for r in csv.DictReader(f) if r.get("best_for_lam") in ("True", "1", "true")]
        for r in rows:
            name = f"{r['strategy']}-tilt{float(r['tilt']):g}-lam{float(r['lam']):g}-seed{int(r['seed'])}"
            path = Path(r["best_path"]) / hook
            if path.is_dir():
                out[name] = path
    return out


def stage_dashboard(
    cfg: Config,
    lm: Any = None,
    report: Path | None = None,
    autointerp: Callable | None = None,
    force: bool = False,
) -> Path:
    """The feature dashboard of the sweep (`<sweep>/dashboard`), logged to the sweep's parent run.
    With `autointerp` (`run_autointerp`), auto-interp runs on the same in-domain LM pass."""
    from ssae_ray.dashboard import build_sweep_dashboard, log_dashboard

    if lm is None and offload(cfg):  # a CPU head: evaluate (GPU tasks), then build on a GPU worker
        report = report or stage_eval(cfg)
        return with_lm(cfg, None, _dashboard_with, cfg, report, autointerp, force, name="dashboard")
    lm = lm or _lm(cfg)
    report = report or stage_eval(cfg, lm=lm)
    corpus_dir = stage_corpus(cfg, lm)
    gsae_dir = stage_gsaes(cfg, lm, corpus_dir)
    extra: dict[str, tuple[Any, str]] = {}
    run_ai = None
    if autointerp is not None:
        saes, hook, texts = best_saes(cfg, lm, report.parent, corpus_dir)
        extra = {n: (s, hook) for n, s in saes.items()}

        def run_ai(indexes: dict[str, Any] | None) -> Path:
            return autointerp(
                cfg, lm, saes, hook, texts, report.parent.parent / "autointerp", indexes=indexes
            )

    general = _texts(corpus_dir, "general_test")
    if not general:  # a user corpus without a general test split: the retrieval corpus is general text
        log.warning(
            "no general_test split; the dashboard's general frequencies use the first corpus documents"
        )
        general = _texts(corpus_dir, "corpus")[:2000]
    out, built = build_sweep_dashboard(cfg, lm, report.parent.parent, gsae_dir, _texts(corpus_dir, "test"), general,
                                run_ai, extra, force)  # fmt: skip
    try:
        from ssae_ray import tracking

        run_id = _sweep_run_id(cfg, out.parent) if built else None  # a cached one was logged when built
        if run_id:
            log_dashboard(tracking.tracking_uri(cfg), run_id, out)
            log.info("dashboard logged to MLflow run %s (artifacts: dashboard/index.html)", run_id)
    except Exception as e:  # the site is on disk; never fail a finished job over logging it
        log.warning("could not log the dashboard to MLflow: %s", e)
    return out / "index.html"


def _dashboard_with(lm: Any, cfg: Config, report: Path, autointerp: Callable | None, force: bool) -> Path:
    return stage_dashboard(cfg, lm, report, autointerp, force)


def stage_shift(cfg: Config) -> Path:
    """SHIFT on Bias in Bios (or its offline analogue for `local`): Table 1 and plots."""
    from ssae_ray.shift.job import run_bias_in_bios

    return run_bias_in_bios(cfg)[1]


def run_physics(cfg: Config, force: bool = False) -> Path:
    """The whole physics pipeline; returns the report. Prints the per-stage wall times. `force`
    retrains the sweep and re-evaluates (upstream stages are reused: they are keyed by their inputs)."""
    from ssae_ray.data.corpus import preflight

    timer = Timer()
    t0 = time.perf_counter()
    preflight(cfg)  # dataset sources open (split, repo, field, script) before the LM is downloaded
    if os.environ.get("RAY_ADDRESS") or cfg.ray.address:  # a cluster: refuse what can never be placed
        from ssae_ray.resources import check_schedulable
        from ssae_ray.runtime import init_ray

        init_ray(cfg.ray)
        check_schedulable(cfg)
    lm = None if offload(cfg) else timer("load LM", lambda: _lm(cfg), False)
    report = stage_eval(cfg, force, lm, timer, retrain=force)
    if cfg.autointerp.enabled or cfg.dashboard.enabled:
        from ssae_ray.autointerp import run_autointerp

        names = [
            n
            for n, on in (("autointerp", cfg.autointerp.enabled), ("dashboard", cfg.dashboard.enabled))
            if on
        ]

        def features() -> Path:
            parent = _sweep_run_id(cfg, report.parent.parent)  # results land in this sweep's parent run
            corpus_dir = stage_corpus(cfg, lm)

            def body(lm: Any) -> Path:  # here, or in a GPU task when the driver holds no LM
                from ssae_ray import tracking

                with (
                    tracking.fluent(tracking.tracking_uri(cfg)),
                    tracking.resume_run(parent) if parent else contextlib.nullcontext(),
                ):
                    if cfg.dashboard.enabled:  # one LM pass serves the dashboard and auto-interp
                        ai = run_autointerp if cfg.autointerp.enabled else None
                        return stage_dashboard(cfg, lm, report, ai, force)
                    return run_autointerp_on_best(cfg, lm, report.parent, corpus_dir, run_autointerp)

            return with_lm(cfg, lm, body, name="+".join(names))

        timer("+".join(names), features, False)
    timings = timer.write(report.parent / "timings.csv")
    write_json_atomic(report.parent / "timings.json", {"rows": timer.rows, "total": time.perf_counter() - t0})
    _log_timings(cfg, report, timings)
    print(f"\nstage wall times ({cfg.name}):\n{timer.table()}\n")
    print(f"report: {report}")
    return report


def _sweep_run_id(cfg: Config, sweep_folder: Path) -> str | None:
    """The parent run of the sweep in `sweep_folder` (recorded there by the sweep), in this store."""
    from ssae_ray import tracking

    return tracking.recorded_parent_run(sweep_folder, tracking.tracking_uri(cfg))


def _log_timings(cfg: Config, report: Path, timings: Path) -> None:
    try:
        from mlflow.tracking import MlflowClient

        from ssae_ray import tracking

        run_id = _sweep_run_id(cfg, report.parent.parent)
        if run_id:
            MlflowClient(tracking_uri=tracking.tracking_uri(cfg)).log_artifact(run_id, str(timings), "eval")
    except Exception as e:  # timings are a convenience; never fail a finished job over them
        log.warning("could not log stage timings to MLflow: %s", e)
