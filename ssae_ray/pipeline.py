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


def stage_corpus(cfg: Config, lm: Any = None) -> Path:
    from ssae_ray.data import build_corpus

    return _memo("corpus", cfg, lambda: build_corpus(cfg, tokenizer=lm.tokenizer if lm is not None else None))


def _texts(corpus_dir: Path, split: str) -> list[str]:
    from ssae_ray.data import load_split

    return [str(t) for t in load_split(corpus_dir, split).column("text").to_pylist()]


def stage_gsaes(cfg: Config, lm: Any = None, corpus_dir: Path | None = None) -> Path:
    """A folder with one sae-lens GSAE per hook (`<folder>/<hook>/`): pretrained by the pipeline
    (`sae.source=pretrain`), loaded from a release or a folder, or random (tests). Each GSAE is
    checked against the model's activations at its hook before anything is trained on it."""
    lm = lm or _lm(cfg)
    return _memo("gsaes", cfg, lambda: _gsaes(cfg, lm, corpus_dir))


def _gsaes(cfg: Config, lm: Any, corpus_dir: Path | None) -> Path:
    from ssae_ray.models import capture, tokenize_docs, validate_hooks
    from ssae_ray.saes import check_sae_fits, load_gsaes, save_sae

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
    sample = _texts(corpus_dir, "val")[:32] or _texts(corpus_dir, "corpus")[:32]
    tb = tokenize_docs(lm.tokenizer, sample, cfg.model.context_len, max_contexts=32)
    acts = capture(lm, tb.input_ids, tb.attention_mask, list(saes))
    keep = tb.attention_mask[:, 1:].bool()
    for h, sae in saes.items():
        check_sae_fits(sae, acts[h][:, 1:][keep], h, cfg.sae.min_explained_variance)
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
    sae = None
    if strategy.endswith("+tracin"):
        lm = lm or _lm(cfg)
        gsae_dir = gsae_dir or stage_gsaes(cfg, lm, corpus_dir)
        sae = load_sae(gsae_dir / cfg.sae.hooks[0], str(lm.device))
    return retrieve(cfg, corpus_dir, index_dir, strategy, lm=lm, sae=sae)


def stage_cache(
    cfg: Config, strategies: tuple[str, ...] | None = None, lm: Any = None, hooks: Any = None
) -> dict[str, Path]:
    """Activations of every hook on each selection, captured once and shared by all trials."""
    import pyarrow.parquet as pq

    from ssae_ray.training import cache_activations

    lm = lm or _lm(cfg)
    corpus_dir = stage_corpus(cfg, lm)
    index_dir = stage_index(cfg, corpus_dir)
    gsae_dir = stage_gsaes(cfg, lm, corpus_dir)
    caches = {}
    for s in strategies or cfg.sweep.strategies:
        sel = stage_retrieve(cfg, s, lm, corpus_dir, index_dir, gsae_dir)
        texts = [str(t) for t in pq.read_table(sel / "selection.parquet", columns=["text"]).column("text")]
        caches[s] = cache_activations(cfg, lm, texts, list(hooks or cfg.sae.hooks))
    return caches


def stage_pretrain(cfg: Config) -> Path:
    if cfg.sae.source != "pretrain":
        raise StageError(f"sae.source is {cfg.sae.source!r}: this preset has no GSAEs to pretrain")
    return stage_gsaes(cfg)


def stage_finetune(cfg: Config, strategy: str | None = None) -> Path:
    """One finetune of every GSAE on one selection, distributed with Ray Train."""
    from ssae_ray.runtime import init_ray
    from ssae_ray.training.ray_train import run_finetune

    strategy = strategy or cfg.retrieval.strategy
    lm = _lm(cfg)
    gsae_dir = stage_gsaes(cfg, lm)
    cache = stage_cache(cfg, (strategy,), lm)[strategy]
    init_ray(cfg.ray)
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
        )
    return sets


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
    val = (cfg.eval.tokens_for("val"), cfg.eval.batch_size, cfg.model.context_len)
    return stage_key("sweep", cfg.train, sweep, val, str(gsae_dir), sorted(map(str, caches.values())))


class SweepPlan(NamedTuple):
    corpus_dir: Path
    gsae_dir: Path
    caches: dict[str, Path]
    folder: Path
    """`<workdir>/sweep/<hash of train, sweep, eval configs, GSAEs and caches>`."""


def plan_sweep(cfg: Config, lm: Any, timer: Timer) -> SweepPlan:
    """Everything a sweep reads (corpus, GSAEs, selections, activation caches), built or found."""
    from ssae_ray import tracking

    tracking.check_tracking(tracking.tracking_uri(cfg))  # fail before hours of work
    corpus_dir = timer("corpus", lambda: stage_corpus(cfg, lm))
    from ssae_ray.data import check_splits

    # Before the GSAEs, index and caches: the sweep retrieves from the seed, selects on val, scores test.
    check_splits(corpus_dir, ("seed", "val", "test"), "the physics sweep")
    gsae_dir = timer("gsaes", lambda: stage_gsaes(cfg, lm, corpus_dir))
    caches = timer("retrieve+cache", lambda: stage_cache(cfg, None, lm, sweep_config(cfg).sae.hooks))
    key = sweep_key(cfg, gsae_dir, caches)
    return SweepPlan(corpus_dir, gsae_dir, caches, cfg.root / "sweep" / key)


def stage_sweep(
    cfg: Config,
    force: bool = False,
    lm: Any = None,
    timer: Timer | None = None,
    plan: SweepPlan | None = None,
):
    """The Ray Tune sweep; finished trials (a `done.json` each) are not rerun."""
    from ssae_ray.sweep import grid, run_sweep

    timer = timer or Timer()
    lm = lm or _lm(cfg)
    plan = plan or plan_sweep(cfg, lm, timer)
    if force and plan.folder.exists():
        shutil.rmtree(plan.folder)
    val = timer(
        "val set", lambda: _test_sets(sweep_config(cfg), lm, plan.corpus_dir, ("val",)).get("val"), False
    )
    if val is None:
        raise StageError("the corpus has no validation documents; the sweep selects on validation")
    done = all((plan.folder / "trials" / t.name / "done.json").is_file() for t in grid(cfg))
    return timer(
        "sweep",
        lambda: run_sweep(
            sweep_config(cfg), plan.gsae_dir, plan.caches, val, plan.folder, cfg.root / "models"
        ),
        done,
    )


def stage_eval(cfg: Config, force: bool = False, lm: Any = None, timer: Timer | None = None) -> Path:
    """Evaluate the sweep's best checkpoints and the GSAEs on the test sets; write the report."""
    from ssae_ray.eval.runner import evaluate_sweep, log_to_mlflow
    from ssae_ray.saes import load_sae

    timer = timer or Timer()
    lm = lm or _lm(cfg)
    plan = plan_sweep(cfg, lm, timer)
    out = plan.folder / "eval"
    ekey = stage_key("eval", cfg.eval, cfg.sweep, cfg.sae.hooks, cfg.corpus)
    stamp = out / "eval_key.txt"
    if (out / "report.md").is_file() and stamp.is_file() and stamp.read_text() == ekey and not force:
        log.info("evaluation cached at %s", out)
        timer("sweep", lambda: plan.folder, True)
        timer("eval", lambda: out, True)
        return out / "report.md"
    sweep = stage_sweep(cfg, force, lm, timer, plan)
    scfg = sweep_config(cfg)
    tests = timer(
        "test sets", lambda: _test_sets(scfg, lm, plan.corpus_dir, ("test", "ood", "general")), False
    )
    gsaes = {h: load_sae(plan.gsae_dir / h, str(lm.device)) for h in scfg.sae.hooks}
    outputs = timer("eval", lambda: evaluate_sweep(scfg, lm, sweep, gsaes, tests, out), False)
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

    lm = _lm(cfg)
    report = stage_eval(cfg, lm=lm)
    corpus_dir = stage_corpus(cfg, lm)
    return run_autointerp_on_best(cfg, lm, report.parent, corpus_dir, run_autointerp)


def run_autointerp_on_best(cfg: Config, lm: Any, eval_dir: Path, corpus_dir: Path, fn: Callable) -> Path:
    """Score the GSAE and the best SSAE of each strategy at the first hook on the in-domain test set."""
    from ssae_ray.saes import load_sae

    sweep_dir = eval_dir.parent
    hook = sweep_config(cfg).sae.hooks[0]
    saes = {"gsae": load_sae(stage_gsaes(cfg, lm, corpus_dir) / hook, str(lm.device))}
    best = sweep_dir / "sweep_trials.csv"
    if best.is_file():
        with open(best) as f:
            rows = [r for r in csv.DictReader(f) if r.get("best_for_lam") in ("True", "1", "true")]
        for r in rows:
            name = f"{r['strategy']}-tilt{float(r['tilt']):g}-lam{float(r['lam']):g}"
            path = Path(r["best_path"]) / hook
            if path.is_dir():
                saes[name] = load_sae(path, str(lm.device))
    texts = _texts(corpus_dir, "test")
    return fn(cfg, lm, saes, hook, texts, eval_dir.parent / "autointerp")


def stage_shift(cfg: Config) -> Path:
    """SHIFT on Bias in Bios (or its offline analogue for `local`): Table 1 and plots."""
    from ssae_ray.shift.job import run_bias_in_bios

    return run_bias_in_bios(cfg)[1]


def run_physics(cfg: Config, force: bool = False) -> Path:
    """The whole physics pipeline; returns the report. Prints the per-stage wall times."""
    from ssae_ray.data.corpus import preflight

    timer = Timer()
    t0 = time.perf_counter()
    preflight(cfg)  # dataset sources open (split, repo, field, script) before the LM is downloaded
    lm = timer("load LM", lambda: _lm(cfg), False)
    report = stage_eval(cfg, force, lm, timer)
    if cfg.autointerp.enabled:
        from ssae_ray.autointerp import run_autointerp

        def autointerp() -> Path:
            import mlflow

            from ssae_ray import tracking

            mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
            parent = _sweep_run_id(cfg)  # results land in the sweep's parent run
            with mlflow.start_run(run_id=parent) if parent else contextlib.nullcontext():
                return run_autointerp_on_best(cfg, lm, report.parent, stage_corpus(cfg, lm), run_autointerp)

        timer("autointerp", autointerp, False)
    timings = timer.write(report.parent / "timings.csv")
    write_json_atomic(report.parent / "timings.json", {"rows": timer.rows, "total": time.perf_counter() - t0})
    _log_timings(cfg, report, timings)
    print(f"\nstage wall times ({cfg.name}):\n{timer.table()}\n")
    print(f"report: {report}")
    return report


def _sweep_run_id(cfg: Config) -> str | None:
    """The newest sweep parent run of this experiment in the tracking store."""
    from mlflow.tracking import MlflowClient

    from ssae_ray import tracking

    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], "tags.`ssae.kind` = 'sweep'", max_results=1,
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    return runs[0].info.run_id if runs else None


def _log_timings(cfg: Config, report: Path, timings: Path) -> None:
    try:
        from mlflow.tracking import MlflowClient

        from ssae_ray import tracking

        run_id = _sweep_run_id(cfg)
        if run_id:
            MlflowClient(tracking_uri=tracking.tracking_uri(cfg)).log_artifact(run_id, str(timings), "eval")
    except Exception as e:  # timings are a convenience; never fail a finished job over them
        log.warning("could not log stage timings to MLflow: %s", e)
