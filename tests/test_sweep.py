"""Sweeps: best-per-λ selection on validation only; a small `tiny` sweep on a real local Ray head
node logging parent and child runs with artifacts to a real MLflow server (SQLite, 127.0.0.1);
then the test-set evaluation and report logged to the parent run; bad input fails before work."""

from __future__ import annotations

import json
import random

import pytest

from ssae_ray import sweep, tracking
from ssae_ray.eval.metrics import EvalError
from ssae_ray.sweep import CheckpointRecord, SweepError, Trial, select_best


def test_best_per_lam_uses_validation_not_test():
    t, t2 = Trial("dense", 1.0, 0.0, 0), Trial("dense", 2.0, 0.0, 0)
    # Step 5 is best on validation CE; step 10 is best on validation FVU, is the last, and is the one
    # a test metric (were it ever in a record) would pick.
    recs = [
        CheckpointRecord(t, 5, {"val_ce": 3.0, "val_fvu": 0.3, "test_ce": 3.5}, None),
        CheckpointRecord(t, 10, {"val_ce": 3.2, "val_fvu": 0.2, "test_ce": 3.1}, None),
        CheckpointRecord(t2, 5, {"val_ce": 2.9, "val_fvu": 0.4, "test_ce": 3.0}, None),
        CheckpointRecord(t2, 10, {"val_ce": 2.8, "val_fvu": 0.5, "test_ce": 3.2}, None),
    ]
    best = select_best(recs, "val_ce")
    assert {k: r.step for k, r in best.items()} == {t: 5, t2: 10}  # one best per λ, by validation CE
    assert {k: r.step for k, r in select_best(recs, "val_fvu").items()} == {t: 10, t2: 5}
    with pytest.raises(SweepError, match="select_metric"):
        select_best(recs, "test_ce")


def test_grid_is_the_full_product(tiny_cfg):
    cfg = tiny_cfg.replace(
        sweep={"lams": [1, 2, 3], "tilts": [0, 500], "seeds": [0, 1], "strategies": ["dense"]}
    )
    g = sweep.grid(cfg)
    assert len(g) == 12 and len(set(g)) == 12 and g[0].name == "dense-lam1-tilt0-seed0"


def test_unreachable_tracking_uri_fails_before_work(tiny_cfg, monkeypatch, tmp_path):
    port = tracking.free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(tracking.TrackingError, match="cannot reach the MLflow tracking server"):
        sweep.run_sweep(tiny_cfg, tmp_path / "gsae", {}, None)
    assert not (tiny_cfg.root / "sweep").exists()  # nothing was started


def test_missing_inputs_fail_before_work(tiny_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(SweepError, match="no activation cache for strategy 'dense'"):
        sweep.run_sweep(tiny_cfg, tmp_path / "gsae", {"random": tmp_path}, None)
    caches = {s: tmp_path / s for s in tiny_cfg.sweep.strategies}
    with pytest.raises(SweepError, match="missing or unfinished"):
        sweep.run_sweep(tiny_cfg, tmp_path / "gsae", caches, None)


@pytest.mark.ray
def test_tiny_sweep_logs_parent_and_child_runs(tiny_cfg, ray_local, mlflow_server, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    from ssae_ray.eval.evaluate import prepare_test_set
    from ssae_ray.eval.runner import check_eval_inputs, evaluate_sweep, log_to_mlflow
    from ssae_ray.models import load_lm
    from ssae_ray.saes import load_gsaes, save_sae
    from ssae_ray.training.cache import cache_activations

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = tiny_cfg.replace(
        sae={"hooks": ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]},
        train={"steps": 4, "checkpoint_every": 2, "batch_tokens": 64, "lr": 0.05},
        sweep={"lams": [0.01, 30.0], "tilts": [0.0], "seeds": [0], "strategies": ["dense"],
               "max_concurrent_trials": 2, "l0_range": [35.0, 45.0]},
        eval={"bootstrap": 50},
    )  # fmt: skip
    lm = load_lm(cfg.model, tmp_path / "models")
    gsaes = load_gsaes(cfg, lm)
    for h, s in gsaes.items():
        save_sae(s, tmp_path / "gsae" / h)
    words = "the quantum field electron photon river city bread fish king queen music".split()
    rnd = random.Random(0)
    texts = [" ".join(rnd.choice(words) for _ in range(40)) for _ in range(30)]
    caches = {"dense": cache_activations(cfg, lm, texts[:10], cfg.sae.hooks, progress=False)}
    val = prepare_test_set(lm, "val", texts[10:15], cfg.sae.hooks, cfg.model.context_len, 256)

    res = sweep.run_sweep(cfg, tmp_path / "gsae", caches, val, tmp_path / "sweep", tmp_path / "models")

    assert len(res.best) == 2
    for t, recs in res.trials.items():
        assert [r.step for r in recs] == [2, 4]
        assert all(k.startswith("val_") for r in recs for k in r.val), recs  # no test number in a record
        best = min(recs, key=lambda r: r.val["val_ce"])  # validation decides
        assert res.best[t].step == best.step and res.best[t].path
        for h in cfg.sae.hooks:
            assert (tmp_path / "sweep" / "trials" / t.name / "best" / h / "cfg.json").is_file()
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([res.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert sorted(r.info.run_name for r in runs) == sorted(t.name for t in res.trials)
    child = runs[0]
    assert child.data.params["lam"] in ("0.01", "30.0") and "train.lr" in child.data.params
    assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 4
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_ce")] == [2, 4]
    arts = {a.path for a in client.list_artifacts(child.info.run_id, "ssae")}
    assert arts == {f"ssae/{h}" for h in cfg.sae.hooks}
    assert {a.path for a in client.list_artifacts(res.parent_run_id)} >= {"sweep_trials.csv"}

    # Test-set evaluation of the selected checkpoints, report logged to the parent run.
    tests = {n: prepare_test_set(lm, n, texts[15 + 5 * i : 20 + 5 * i], cfg.sae.hooks, cfg.model.context_len, 256)
             for i, n in enumerate(["test", "ood"])}  # fmt: skip
    with pytest.raises(EvalError, match="no in-domain test set"):
        check_eval_inputs(cfg, res, {"ood": tests["ood"]})
    with pytest.raises(EvalError, match="covers sweep.l0_range"):
        check_eval_inputs(cfg.replace(sweep={"l0_range": [500.0, 600.0]}), res, tests)
    out = evaluate_sweep(cfg, lm, res, gsaes, tests, tmp_path / "eval")
    report = (out.folder / "report.md").read_text()
    assert "Headline" in report and "dense" in report and "GSAE" in report
    for f in ("headline.csv", "auc.csv", "features.csv", "pareto_test_blocks_0_hook_resid_post.png",
              "coverage_blocks_0_hook_resid_post.png", "log2_ratio_blocks_1_hook_mlp_out.png"):  # fmt: skip
        assert (out.folder / f).is_file(), f
    log_to_mlflow(res, out, {"retrieval": tmp_path / "sweep" / "sweep_trials.csv"})
    eval_arts = {a.path for a in client.list_artifacts(res.parent_run_id, "eval")}
    assert "eval/report.md" in eval_arts and "eval/headline.csv" in eval_arts

    # Resume: finished trials are not retrained (their done.json is reused).
    done = json.loads((tmp_path / "sweep" / "trials" / "dense-lam0.01-tilt0-seed0" / "done.json").read_text())
    res2 = sweep.run_sweep(cfg, tmp_path / "gsae", caches, val, tmp_path / "sweep", tmp_path / "models")
    assert res2.run_ids[Trial("dense", 0.01, 0.0, 0)] == done["run_id"]
    # ... and the re-invocation logs into the same parent run: one parent per sweep folder, finished
    assert res2.parent_run_id == res.parent_run_id
    folder = str(tmp_path / "sweep")  # (other tests may log tiny sweeps to the same server)
    parents = client.search_runs(
        [res.experiment_id], f"tags.`ssae.kind` = 'sweep' AND tags.`ssae.folder` = '{folder}'"
    )
    assert [r.info.run_id for r in parents] == [res.parent_run_id]
    assert client.get_run(res.parent_run_id).info.status == "FINISHED"
    assert client.get_experiment(res.experiment_id).name == "ssae-ray-tiny"  # one experiment per preset


@pytest.mark.ray
def test_trial_runs_ray_train_inside_tune(tiny_cfg, ray_local, monkeypatch, tmp_path):
    """train.num_workers > 1: the Tune trial runs a TorchTrainer (Ray Train V2) and scores its result."""
    from ssae_ray.eval.evaluate import prepare_test_set
    from ssae_ray.models import load_lm
    from ssae_ray.saes import load_gsaes, save_sae
    from ssae_ray.training.cache import cache_activations

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = tiny_cfg.replace(
        sae={"hooks": ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]},
        train={"steps": 3, "batch_tokens": 64, "num_workers": 2, "placement": "by_hook"},
        sweep={"lams": [1.0], "tilts": [0.0], "seeds": [0], "strategies": ["dense"], "cpus_per_trial": 0.0},
    )
    lm = load_lm(cfg.model, tmp_path / "models")
    for h, s in load_gsaes(cfg, lm).items():
        save_sae(s, tmp_path / "gsae" / h)
    texts = [f"the quantum field of electron {i} and photon {i}" * 4 for i in range(12)]
    caches = {"dense": cache_activations(cfg, lm, texts[:8], cfg.sae.hooks, progress=False)}
    val = prepare_test_set(lm, "val", texts[8:], cfg.sae.hooks, cfg.model.context_len, 128)
    res = sweep.run_sweep(cfg, tmp_path / "gsae", caches, val, tmp_path / "sweep", tmp_path / "models")
    ((t, rec),) = res.best.items()
    assert rec.step == 3 and (tmp_path / "sweep" / "trials" / t.name / "finetune" / "history.json").is_file()


def test_tilt_strategies_limits_term_to_some_selections(tiny_cfg):
    from ssae_ray.sweep import Trial, grid

    cfg = tiny_cfg.replace(sweep={"strategies": ["dense", "bm25"], "lams": [1.0, 2.0], "tilts": [0.0, 1.0],
                                  "seeds": [0], "tilt_strategies": ["dense"]})  # fmt: skip
    g = grid(cfg)
    assert len(g) == 2 * 2 + 2  # dense: 2 λ × 2 tilts; bm25: 2 λ × tilt 0
    assert Trial("dense", 1.0, 1.0, 0) in g and Trial("bm25", 1.0, 1.0, 0) not in g
    assert all(t.tilt == 0 for t in g if t.strategy == "bm25")
