"""Non-finite numbers never pass silently: the GSAE fit check, best-checkpoint selection (in the
trial and across records), evaluation and MLflow logging each refuse or record a NaN, naming the
SAE, hook and step."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from ssae_ray import sweep, tracking
from ssae_ray.saes import SAEMismatchError, check_sae_fits, make_random_sae
from ssae_ray.sweep import CheckpointRecord, SweepError, Trial, select_best

NAN = float("nan")


def test_gsae_fit_check_refuses_a_nan_explained_variance():
    sae = make_random_sae(8, 16, "blocks.0.hook_resid_post")
    x = torch.randn(64, 8)
    assert check_sae_fits(sae, x, "blocks.0.hook_resid_post", -100.0) > -100  # finite: a low bar passes
    with torch.no_grad():
        sae.W_dec[3, 0] = NAN  # a corrupt (diverged) GSAE
    with pytest.raises(
        SAEMismatchError, match=r"blocks.0.hook_resid_post has a non-finite explained variance"
    ):
        check_sae_fits(sae, x, "blocks.0.hook_resid_post", 0.5)
    with pytest.raises(SAEMismatchError, match="non-finite"):
        check_sae_fits(sae, x, "blocks.0.hook_resid_post", -100.0)  # no threshold lets it through


def test_select_best_never_keeps_a_nan_checkpoint():
    t = Trial("dense", 1.0, 0.0, 0)
    recs = [
        CheckpointRecord(t, 2, {"val_ce": NAN, "val_fvu": NAN}, None),  # first: NaN < x is always False
        CheckpointRecord(t, 4, {"val_ce": 3.2, "val_fvu": 0.4}, None),
        CheckpointRecord(t, 6, {"val_ce": math.inf, "val_fvu": 0.1}, None),
    ]
    assert select_best(recs, "val_ce")[t].step == 4
    with pytest.raises(
        SweepError, match=r"trial dense-lam1-tilt0-seed0: no checkpoint has a finite val_ce \(step 2"
    ):
        select_best([recs[0]], "val_ce")


def test_evaluation_refuses_non_finite_metrics_naming_sae_hook_and_test_set():
    from ssae_ray.eval.evaluate import SAEEval
    from ssae_ray.eval.metrics import EvalError

    z = torch.zeros(0)
    e = SAEEval("test", "blocks.1.hook_resid_post", 30.0, 0.1, NAN, 3.0, 3.5, 9.0, 0.9, 20.0, 33.0,
                z, z, z, z, z, z)  # fmt: skip
    assert e.nonfinite() == {"fvu": e.fvu}
    with pytest.raises(
        EvalError,
        match=r"the SSAE of trial x at blocks.1.hook_resid_post on test set 'test': non-finite fvu=nan",
    ):
        e.check_finite("the SSAE of trial x")
    ok = e._replace(fvu=0.2)
    assert ok.check_finite("g") is ok


def test_log_metrics_records_non_finite_values(mlflow_server, tmp_path, caplog):
    client, exp = tracking.open_experiment(mlflow_server, f"nonfinite-{tmp_path.name}")
    rid = tracking.start_run(client, exp, "r")
    with caplog.at_level(logging.WARNING, logger="ssae_ray"):
        tracking.log_metrics(client, rid, {"val_ce": 3.0, "val_fvu": NAN, "val_l0": math.inf}, 3)
    data = client.get_run(rid).data
    assert data.metrics == {"val_ce": 3.0}
    assert (
        data.tags["nonfinite.val_fvu"] == "nan at step 3" and data.tags["nonfinite.val_l0"] == "inf at step 3"
    )
    assert f"MLflow run {rid}, step 3: non-finite val_fvu=nan, val_l0=inf" in caplog.text


def test_trial_never_keeps_a_nan_checkpoint_as_best(tiny_trial, monkeypatch, tmp_path):
    """The in-process trial (the sweep's own selection, before select_best): a checkpoint scored NaN
    is recorded but never saved as best; a trial where every checkpoint is NaN fails naming it."""
    import json

    import ssae_ray.eval.evaluate as ev

    cfg, ctx, val = tiny_trial
    hooks = list(cfg.sae.hooks)
    client, _ = tracking.open_experiment(ctx["uri"], tracking.experiment_name(cfg))
    real = ev.evaluate_saes_on
    nan_steps: set[int] = set()
    calls = []

    def scored(lm_, saes, test, *a, **k):  # one call scores every hook of a checkpoint
        calls.append(1)
        out = real(lm_, saes, test, *a, **k)
        assert [h for _, h in saes] == hooks
        return [e._replace(ce_spliced=NAN) for e in out] if len(calls) in nan_steps else out

    monkeypatch.setattr(ev, "evaluate_saes_on", scored)
    t = Trial("dense", 1.0, 0.0, 0)
    nan_steps.add(2)  # the second (last) checkpoint is NaN: it must not replace the first as best
    tdir = tmp_path / "t1"
    sweep.run_trial(cfg, t, ctx, val, tdir, report=lambda m: None)
    done = json.loads((tdir / "done.json").read_text())
    assert [c["step"] for c in done["checkpoints"]] == [2, 4]
    assert [c["path"] is not None for c in done["checkpoints"]] == [True, False]
    assert math.isnan(done["checkpoints"][1]["val"]["val_ce"])
    run = client.get_run(done["run_id"]).data
    assert run.tags["nonfinite.val_ce"] == "nan at step 4" and run.metrics["best_step"] == 2

    calls.clear()
    nan_steps.update({1, 2})  # every checkpoint NaN: the trial fails, naming itself and the step
    with pytest.raises(
        SweepError,
        match=r"trial dense-lam1-tilt0-seed0: every checkpoint scored non-finite on validation \(step 2: val_ce/blocks\.0\.hook_resid_post=nan",
    ):
        sweep.run_trial(cfg, t, ctx, val, tmp_path / "t2", report=lambda m: None)
    assert not (tmp_path / "t2" / "done.json").exists()
