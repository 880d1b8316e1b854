"""Ray Tune sweep over λ × tilt × seed × selection strategy, each trial an MLflow child run.
(λ is the sparsity knob: `sweep.knob=k` sweeps k of TopK / BatchTopK GSAEs instead.)

Each trial finetunes every GSAE of the preset on its strategy's cached activations; every
`train.checkpoint_every` steps (and at the end) it scores the SAEs on the validation set (L0, FVU,
spliced CE) and reports to Tune and MLflow. Only the trial's best checkpoint on validation is kept
on disk (`<out>/trials/<trial>/best/<hook>/`, sae-lens format) and logged as an artifact; the test
sets are never touched here. A trial that finished (its `done.json` exists) is not rerun when the
sweep is resumed.

Trials run the training loop in-process (one CPU or GPU slot per trial from `sweep.cpus_per_trial`
/ `sweep.gpus_per_trial`). With `train.num_workers > 1` a trial instead runs Ray Train's
`TorchTrainer` (`training.ray_train.run_finetune`) from inside the Tune function, as Ray Train V2
expects, and is scored once at the end (set `sweep.cpus_per_trial` to 0 so the trial's own slot
does not starve the Train workers on a small cluster).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

from ssae_ray import tracking
from ssae_ray.config import SELECT_METRICS, Config, config_hash, from_dict
from ssae_ray.stages import write_json_atomic

log = logging.getLogger("ssae_ray")


class SweepError(ValueError):
    """A sweep that cannot start (missing input) or whose trials failed."""


class Trial(NamedTuple):
    strategy: str
    lam: float
    tilt: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.strategy}-lam{self.lam:g}-tilt{self.tilt:g}-seed{self.seed}"


class CheckpointRecord(NamedTuple):
    trial: Trial
    step: int
    """Training steps done when the SAEs were scored."""
    val: dict[str, float]
    """Validation metrics: `val_ce`, `val_l0`, `val_fvu` (means over hooks) and per hook."""
    path: str | None
    """The saved SAEs (one sae-lens folder per hook) when this is the trial's best, else None."""


class SweepResult(NamedTuple):
    folder: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trials: dict[Trial, list[CheckpointRecord]]
    """Every trial's scored checkpoints, in step order."""
    best: dict[Trial, CheckpointRecord]
    """Each trial's best checkpoint on validation (`sweep.select_metric`); its `path` holds the SAEs."""
    run_ids: dict[Trial, str]


def grid(cfg: Config) -> list[Trial]:
    """strategy × λ × tilt × seed; non-zero tilts only on `sweep.tilt_strategies` when set."""
    s = cfg.sweep
    tilted = set(s.strategies if s.tilt_strategies is None else s.tilt_strategies)
    return [Trial(st, float(lam), float(t), int(seed))
            for st, lam, t, seed in itertools.product(s.strategies, s.lams, s.tilts, s.seeds)
            if t == 0 or st in tilted]  # fmt: skip


def select_best(records: list[CheckpointRecord], metric: str = "val_ce") -> dict[Trial, CheckpointRecord]:
    """Per trial (one λ, tilt, seed and strategy), the checkpoint with the lowest validation
    `metric`. Only validation metrics are looked at: test numbers are never part of a record. A
    checkpoint whose metric is NaN or infinite is never best; a trial with no finite checkpoint is a
    `SweepError` naming it."""
    if metric not in SELECT_METRICS:
        raise SweepError(f"sweep.select_metric must be one of {SELECT_METRICS}, got {metric!r}")
    best: dict[Trial, CheckpointRecord] = {}
    bad: dict[Trial, CheckpointRecord] = {}
    for r in records:
        if not math.isfinite(r.val[metric]):
            bad.setdefault(r.trial, r)
        elif r.trial not in best or r.val[metric] < best[r.trial].val[metric]:
            best[r.trial] = r
    lost = [t for t in bad if t not in best]
    if lost:
        r = bad[lost[0]]
        raise SweepError(
            f"trial {r.trial.name}: no checkpoint has a finite {metric} (step {r.step}: "
            f"{_nonfinite_text(r.val)}); it diverged: lower train.lr or the λ"
        )
    return best


def _nonfinite_text(val: dict[str, float]) -> str:
    return ", ".join(f"{k}={v}" for k, v in val.items() if not math.isfinite(v)) or "all finite"


def _check_inputs(cfg: Config, gsae_dir: Path, caches: dict[str, Any], val_set: Any) -> None:
    missing = [s for s in cfg.sweep.strategies if s not in caches]
    if missing:
        raise SweepError(
            f"no activation cache for strategy {missing[0]!r} (have: {sorted(caches)}); run the retrieve "
            "and cache stages for every strategy in sweep.strategies"
        )
    for s in cfg.sweep.strategies:
        c = caches[s]
        if isinstance(c, str | Path) and not (Path(c) / "manifest.json").is_file():
            raise SweepError(f"the activation cache of strategy {s!r} at {c} is missing or unfinished")
    for h in cfg.sae.hooks:
        if not (Path(gsae_dir) / h / "cfg.json").is_file():
            raise SweepError(f"no GSAE for hook {h} under {gsae_dir} (expected {gsae_dir}/{h}/cfg.json)")
    if val_set is None or getattr(val_set, "tokens", None) is None or val_set.tokens.input_ids.shape[0] == 0:
        raise SweepError(
            "the validation set is missing or empty; best-per-λ selection needs one (corpus.val_path)"
        )
    if cfg.sweep.knob not in ("lam", "k"):
        raise SweepError(
            f"sweep.knob must be 'lam' or 'k' (the setting sweep.lams sets), got {cfg.sweep.knob!r}"
        )
    if cfg.sweep.knob == "k" and any(not v >= 1 for v in cfg.sweep.lams):
        raise SweepError(
            f"sweep.knob=k: every sweep.lams value is a k and must be >= 1, got {list(cfg.sweep.lams)}"
        )
    if cfg.sweep.select_metric not in SELECT_METRICS:
        raise SweepError(
            f"sweep.select_metric must be one of {SELECT_METRICS}, got {cfg.sweep.select_metric!r}"
        )
    if not cfg.sweep.lams or not cfg.sweep.tilts or not cfg.sweep.seeds or not cfg.sweep.strategies:
        raise SweepError("sweep.lams, sweep.tilts, sweep.seeds and sweep.strategies must each be non-empty")
    lo, hi = cfg.sweep.l0_range
    if not hi > lo:
        raise SweepError(f"sweep.l0_range must be (lo, hi) with hi > lo, got {cfg.sweep.l0_range}")


def run_sweep(
    cfg: Config,
    gsae_dir: str | Path,
    caches: dict[str, Any],
    val_set: Any,
    out_dir: str | Path | None = None,
    lm_cache_dir: str | Path | None = None,
) -> SweepResult:
    """Run the λ × tilt × seed × strategy grid on Ray Tune (joining the running Ray or starting
    one from `cfg.ray`). `caches` maps each strategy to its activation cache folder
    (`training.cache_activations`); `val_set` is `eval.evaluate.prepare_test_set(...)` of the
    validation documents. Checks the tracking URI and every input before any trial starts."""
    from ray import tune

    from ssae_ray.multinode import was_checked
    from ssae_ray.resources import check_schedulable
    from ssae_ray.runtime import init_ray

    uri = tracking.check_tracking(tracking.tracking_uri(cfg))
    gsae_dir = Path(gsae_dir)
    _check_inputs(cfg, gsae_dir, caches, val_set)
    init_ray(cfg.ray)
    check_schedulable(cfg, parts=("sweep", "gpu_tasks"))  # refuse what can never be placed, before any work
    out = Path(out_dir) if out_dir else cfg.root / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    client, exp_id = tracking.open_experiment(
        uri, tracking.experiment_name(cfg), cfg.root / "mlflow" / "mlartifacts"
    )
    parent = _parent_run(client, exp_id, uri, cfg, out)
    ctx = {
        "cfg": cfg.to_dict(), "gsae_dir": str(gsae_dir), "caches": {k: str(v) for k, v in caches.items()},
        "out": str(out), "uri": uri, "exp_id": exp_id, "parent": parent,
        "lm_cache": str(lm_cache_dir) if lm_cache_dir else None, "checked": was_checked(cfg.root),
    }  # fmt: skip
    trainable = tune.with_resources(
        tune.with_parameters(_trial_fn, ctx=ctx, val_set=val_set),
        _trial_resources(cfg),
    )
    # One grid axis over the explicit trial list, so non-product grids (sweep.tilt_strategies) work;
    # the trial's fields still show as columns in Tune's table.
    space = {"trial": tune.grid_search([t._asdict() for t in grid(cfg)])}
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.sweep.max_concurrent_trials, reuse_actors=True),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str((out / "ray").resolve()),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
        ),  # fmt: skip
    )
    t0 = time.perf_counter()
    results = tuner.fit()
    errors = [r for r in results if r.error is not None]
    if errors:
        tracking.end_run(client, parent, "FAILED")
        raise SweepError(f"{len(errors)} of {len(results)} trials failed; first: {errors[0].error}")
    records: dict[Trial, list[CheckpointRecord]] = {}
    run_ids: dict[Trial, str] = {}
    for t in grid(cfg):
        done = json.loads((out / "trials" / t.name / "done.json").read_text())
        records[t] = [CheckpointRecord(t, c["step"], c["val"], c["path"]) for c in done["checkpoints"]]
        run_ids[t] = done["run_id"]
    best = select_best([r for rs in records.values() for r in rs], cfg.sweep.select_metric)
    table = _write_table(out / "sweep_trials.csv", records, best)
    client.log_artifact(parent, str(table))
    tracking.log_metrics(client, parent, {"sweep_seconds": time.perf_counter() - t0, "trials": len(records)})
    tracking.end_run(client, parent)
    return SweepResult(out, uri, exp_id, parent, records, best, run_ids)


def _trial_resources(cfg: Config) -> dict[str, float]:
    """Per-trial resources (`resources.trial_resources`: no GPU for a trial whose Ray Train workers
    hold the GPUs); a trial asking for nothing asks Tune for 1 MiB of memory (it needs some request)."""
    from ssae_ray.resources import trial_resources

    res = trial_resources(cfg, True)
    res = {"cpu": res["CPU"], "gpu": res["GPU"]}
    return {k: v for k, v in res.items() if v > 0} or {"memory": float(2**20)}


def _parent_run(client: Any, exp_id: str, uri: str, cfg: Config, out: Path) -> str:
    """The sweep folder's parent run, reused when the sweep is invoked again."""
    params = {k: v for k, v in tracking.flat_config(cfg).items() if k.split(".")[0] in
              ("name", "model", "sae", "train", "sweep", "retrieval", "eval")}  # fmt: skip
    return tracking.sweep_parent_run(client, exp_id, uri, out, f"sweep-{cfg.name}", params,
                                     tags={"ssae.kind": "sweep", "ssae.folder": str(out)})  # fmt: skip


def _write_table(
    path: Path, records: dict[Trial, list[CheckpointRecord]], best: dict[Trial, CheckpointRecord]
) -> Path:
    keys = sorted({k for rs in records.values() for r in rs for k in r.val})
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "lam", "tilt", "seed", "step", "best_for_lam", "best_path", *keys])
        for t, rs in records.items():
            for r in rs:
                b = best[t].step == r.step
                w.writerow([*t, r.step, int(b), best[t].path if b else "", *(r.val.get(k, "") for k in keys)])
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Ray worker)


def _trial_fn(space: dict[str, Any], ctx: dict[str, Any], val_set: Any) -> None:
    from ray import tune

    from ssae_ray.multinode import check_here

    check_here(
        Path(ctx["cfg"]["workdir"]), ctx.get("checked", False)
    )  # a node that joined after the preflight
    t = space["trial"]
    trial = Trial(t["strategy"], float(t["lam"]), float(t["tilt"]), int(t["seed"]))
    tdir = Path(ctx["out"]) / "trials" / trial.name
    done_file = tdir / "done.json"
    if done_file.is_file():  # resumed sweep: this trial finished before
        for c in json.loads(done_file.read_text())["checkpoints"]:
            tune.report({**c["val"], "step": c["step"], "cached": 1})
        return
    tdir.mkdir(parents=True, exist_ok=True)  # an unfinished trial's folder holds its checkpoint
    cfg = from_dict(ctx["cfg"])
    run_trial(cfg, trial, ctx, val_set, tdir, report=lambda m: tune.report(m))


STATE_DIR = "state"
"""`<trial>/state/`: the in-process trial's last checkpoint (SAEs + trainer state per hook, and
`progress.json`: step, scored checkpoints, best, attempts); removed when the trial finishes."""


def _child_run(client: Any, cfg: Config, trial: Trial, tc: Any, ctx: dict[str, Any], tdir: Path) -> str:
    """The trial's MLflow child run: the one recorded in `<trial>/run.json` by an earlier,
    interrupted attempt (reopened), else a new one (recorded before any work)."""
    import dataclasses

    rec = tdir / "run.json"
    if rec.is_file():
        rid = json.loads(rec.read_text())["run_id"]
        try:
            client.update_run(rid, status="RUNNING")
            client.set_tag(rid, "ssae.resumed", "true")
            return rid
        except Exception as e:  # noqa: BLE001 - a tracking store that lost the run: start afresh
            log.warning("trial %s: cannot reopen MLflow run %s (%s); starting a new one", trial.name, rid, e)
    params = {**trial._asdict(), "trial": trial.name, **{f"train.{k}": v for k, v in
              dataclasses.asdict(tc).items()}}  # fmt: skip
    rid = tracking.start_run(client, ctx["exp_id"], trial.name, params, parent_run_id=ctx["parent"],
                             tags={"ssae.kind": "trial", "ssae.strategy": trial.strategy})  # fmt: skip
    write_json_atomic(rec, {"run_id": rid})
    return rid


def _val_metrics(cfg: Config, lm: Any, saes: dict[str, Any], val_set: Any) -> dict[str, float]:
    """Validation metrics of `saes` (hook -> SAE): per hook and the means over hooks. Every hook is
    scored from one capture forward per batch (`evaluate_saes_on`), not one forward per hook: with
    the 19 hooks of a Pythia-70M sweep that is 19x fewer LM prefix passes per validation."""
    from ssae_ray.eval.evaluate import evaluate_saes_on

    val: dict[str, float] = {}
    evs = evaluate_saes_on(lm, [(sae.to(lm.device), h) for h, sae in saes.items()], val_set, cfg.eval.batch_size,
                           per_token=False)  # fmt: skip
    for h, ev in zip(saes, evs, strict=True):
        val.update({f"val_ce/{h}": ev.ce_spliced, f"val_l0/{h}": ev.l0, f"val_fvu/{h}": ev.fvu})
    for k in ("ce", "l0", "fvu"):
        val[f"val_{k}"] = sum(val[f"val_{k}/{h}"] for h in saes) / len(saes)
    return val


def _score_saes(cfg: Config, lm_cache: str | None, folders: dict[str, str], val_set: Any) -> dict[str, float]:
    """`_val_metrics` of the SAEs in `folders` (hook -> sae-lens folder) with the LM loaded on this
    process's device (a GPU task's when run by `resources.on_gpu_worker`)."""
    from ssae_ray.models import load_lm
    from ssae_ray.saes import load_sae

    lm = load_lm(cfg.model, lm_cache)
    return _val_metrics(cfg, lm, {h: load_sae(Path(f), str(lm.device)) for h, f in folders.items()}, val_set)


def run_trial(cfg: Config, trial: Trial, ctx: dict[str, Any], val_set: Any, tdir: Path, report: Any) -> None:
    """Finetune the GSAEs for one grid point, scoring on validation every `checkpoint_every` steps;
    keeps the best checkpoint on disk and writes `done.json` last. Logs a child MLflow run.

    Preemption: an in-process trial saves its state (`<trial>/state/`) at every scored checkpoint,
    and a trial that drives Ray Train keeps Train's checkpoints under `<trial>/ray_train/`; rerun
    after a kill (of the driver, a node, the trial), it resumes from that checkpoint and continues
    its MLflow child run (`<trial>/run.json`). The data order is a function of (seed, step), so
    the resumed trial ends with the SAEs an uninterrupted one ends with."""
    import dataclasses

    import torch

    from ssae_ray.resources import on_gpu_worker, process_device
    from ssae_ray.saes import load_sae, save_sae
    from ssae_ray.stages import atomic_dir
    from ssae_ray.training.cache import iter_cache_batches
    from ssae_ray.training.loop import make_trainers, run_steps
    from ssae_ray.training.ray_train import load_checkpoint, save_checkpoint

    torch.manual_seed(trial.seed)
    knob = {"k": trial.lam} if cfg.sweep.knob == "k" else {"lam": trial.lam}
    tc = dataclasses.replace(cfg.train, **knob, tilt=trial.tilt, seed=trial.seed)
    hooks = list(cfg.sae.hooks)
    client, _ = tracking.open_experiment(ctx["uri"], tracking.experiment_name(cfg))
    state_dir = tdir / STATE_DIR
    key = config_hash([dataclasses.asdict(tc), hooks, ctx["gsae_dir"], ctx["caches"][trial.strategy]])
    if (state_dir / "progress.json").is_file() and json.loads((state_dir / "progress.json").read_text()).get(
        "key"
    ) != key:  # a checkpoint of other settings (an out dir reused by hand): start afresh
        log.warning(
            "trial %s: the checkpoint under %s has other settings; starting from step 0", trial.name, tdir
        )
        shutil.rmtree(state_dir)
        (tdir / "run.json").unlink(missing_ok=True)
    rid = _child_run(client, cfg, trial, tc, ctx, tdir)
    try:
        progress = (
            json.loads((state_dir / "progress.json").read_text())
            if (state_dir / "progress.json").is_file()
            else {}
        )
        checkpoints: list[dict[str, Any]] = progress.get("checkpoints", [])
        best: dict[str, Any] | None = progress.get("best")
        attempts: list[dict[str, int]] = progress.get("attempts", [])

        def record(step: int, val: dict[str, float], saes: dict[str, Any]) -> None:
            nonlocal best
            rec = {"step": step, "val": val, "path": None}
            metric = cfg.sweep.select_metric
            finite = all(math.isfinite(v) for v in val.values())
            if not finite:  # never the best; recorded (done.json, MLflow tag) and warned about
                log.warning("trial %s, step %d: non-finite validation metrics: %s", trial.name, step,
                            _nonfinite_text(val))  # fmt: skip
            if finite and (best is None or val[metric] < best["val"][metric]):
                path = tdir / "best"
                with atomic_dir(path) as tmp:
                    for h, sae in saes.items():
                        if isinstance(sae, str | Path):
                            shutil.copytree(sae, tmp / h)
                        else:
                            save_sae(sae.to("cpu"), tmp / h)
                for c in checkpoints:
                    c["path"] = None
                rec["path"] = str(path)
                best = rec
            checkpoints.append(rec)
            tracking.log_metrics(client, rid, val, step)
            report({**val, "step": step})

        def log_train(history: list[dict[str, float]]) -> None:  # one MLflow call per flush, not per step
            tracking.log_metric_rows(client, rid, [({f"train/{k}": v for k, v in m.items()}, int(m["step"]))
                                                   for m in history])  # fmt: skip

        if tc.num_workers > 1:  # Ray Train (V2) TorchTrainer inside this Tune trial; scored at the end
            from ssae_ray.training.ray_train import run_finetune

            tcfg = cfg.replace(train=dataclasses.asdict(tc))
            # Same run name and storage on a rerun: Ray Train restores its latest checkpoint.
            final = run_finetune(tcfg, ctx["gsae_dir"], ctx["caches"][trial.strategy], tdir / "finetune",
                                 storage_path=tdir / "ray_train")  # fmt: skip
            log_train(json.loads((final / "history.json").read_text()))
            # The trial holds no GPU (its Train workers did): score on a GPU worker when there is one.
            paths = {h: str(final / h) for h in hooks}
            val = on_gpu_worker(_score_saes, cfg, ctx["lm_cache"], paths, val_set, name=f"score-{trial.name}")
            record(tc.steps, val, paths)
            attempts.append({"start": 0, "end": tc.steps})
            trained_on = f"ray-train:{tc.num_workers} workers"
        else:  # in-process loop, scored and checkpointed every `checkpoint_every` steps
            device = trained_on = str(process_device(cfg.model.device))
            gsaes = {h: load_sae(Path(ctx["gsae_dir"]) / h, device) for h in hooks}
            first = next(
                iter_cache_batches(ctx["caches"][trial.strategy], hooks, tc.batch_tokens, seed=tc.seed)
            )
            trainers = make_trainers(tc, gsaes, first, device)
            start = load_checkpoint(state_dir, trainers) if progress else 0
            if start:
                log.info("trial %s resumes at step %d of %d", trial.name, start, tc.steps)
            batches = iter_cache_batches(ctx["caches"][trial.strategy], hooks, tc.batch_tokens, seed=tc.seed,
                                         start_step=start)  # fmt: skip
            pending: list[dict[str, float]] = []
            every = max(1, min(cfg.train.checkpoint_every, tc.steps))
            attempts.append({"start": start, "end": start})

            def on_step(step: int, m: dict[str, float]) -> None:
                pending.append(m)
                attempts[-1]["end"] = step + 1
                if len(pending) >= 20 or step + 1 == tc.steps:
                    log_train(pending)
                    pending.clear()
                if (step + 1) % every == 0 or step + 1 == tc.steps:
                    log_train(pending)
                    pending.clear()
                    saes = {h: tr.export() for h, tr in trainers.items()}
                    record(step + 1, _score_saes_with(lm_holder, cfg, ctx, saes, val_set), saes)
                    with atomic_dir(state_dir) as tmp:
                        save_checkpoint(tmp, trainers, step + 1)
                        write_json_atomic(tmp / "progress.json", {"step": step + 1, "key": key, "checkpoints": checkpoints,
                                                                  "best": best, "attempts": attempts})  # fmt: skip

            lm_holder: dict[str, Any] = {}
            run_steps(trainers, batches, start, tc.steps, callback=on_step, progress=False, desc=trial.name)
            log_train(pending)
            if not checkpoints or checkpoints[-1]["step"] != attempts[-1]["end"]:
                saes = {h: tr.export() for h, tr in trainers.items()}
                record(attempts[-1]["end"], _score_saes_with(lm_holder, cfg, ctx, saes, val_set), saes)
        if best is None:
            first = checkpoints[0] if checkpoints else {"step": 0, "val": {}}
            raise SweepError(
                f"trial {trial.name}: every checkpoint scored non-finite on validation (step {first['step']}: "
                f"{_nonfinite_text(first['val'])}); it diverged: lower train.lr or the λ"
            )
        client.log_artifacts(rid, best["path"], "ssae")
        write_json_atomic(tdir / "done.json", {"trial": trial._asdict(), "run_id": rid, "checkpoints": checkpoints,
                                               "device": trained_on,
                                               "attempts": attempts})  # fmt: skip
        shutil.rmtree(tdir / STATE_DIR, ignore_errors=True)  # only the best SAEs stay
        client.log_artifact(rid, str(tdir / "done.json"))
        tracking.log_metrics(
            client, rid, {f"best_{k}": v for k, v in best["val"].items()} | {"best_step": best["step"]}
        )
        tracking.end_run(client, rid)
    except BaseException:
        tracking.end_run(client, rid, "FAILED")
        raise


def _score_saes_with(holder: dict[str, Any], cfg: Config, ctx: dict[str, Any], saes: dict[str, Any],
                     val_set: Any) -> dict[str, float]:  # fmt: skip
    """`_val_metrics` with the LM loaded once per trial, on the trial's device (kept in `holder`)."""
    from ssae_ray.models import load_lm

    if "lm" not in holder:
        holder["lm"] = load_lm(cfg.model, ctx["lm_cache"])
    return _val_metrics(cfg, holder["lm"], saes, val_set)
