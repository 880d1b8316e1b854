"""Pipeline wiring that the end-to-end job tests do not pin down."""

from __future__ import annotations

from pathlib import Path


def test_validation_set_has_its_own_size_and_keys_the_sweep(tiny_cfg):
    from ssae_ray.pipeline import _lm, _test_sets, stage_corpus, sweep_key

    cfg = tiny_cfg.replace(eval={"test_tokens": 300, "val_tokens": 120})
    lm = _lm(cfg)
    sets = _test_sets(cfg, lm, stage_corpus(cfg, lm), ("val", "test"))
    ctx = cfg.model.context_len
    n = {k: int(s.tokens.attention_mask.sum()) for k, s in sets.items()}
    assert 120 <= n["val"] < 120 + ctx  # the contexts holding the first 120 tokens
    assert 300 <= n["test"] < 300 + ctx and n["val"] < n["test"]

    def key(**ev):
        return sweep_key(cfg.replace(eval=ev), Path("gsaes"), {"dense": Path("cache")})

    # validation size changes the trials' scores, so it keys the sweep; None means test_tokens
    assert key(val_tokens=120) != key(val_tokens=200)
    assert key(val_tokens=None, test_tokens=300) == key(val_tokens=300, test_tokens=300)


def test_force_flags_do_what_their_help_says(tmp_path, monkeypatch, capsys):
    """`sweep --force` retrains (old trials kept aside until the new sweep finished, so a failed forced
    run loses nothing); `eval --force` re-evaluates without retraining; `physics --force` does both.
    The help says exactly that, not "rebuild every stage"."""
    import json

    import pytest

    from ssae_ray import cli, pipeline, sweep

    for stage in ("sweep", "eval", "physics"):
        help_ = cli.build_parser()._subparsers._group_actions[0].choices[stage].format_help()
        assert "rebuild every stage" not in help_ and "reused" in " ".join(help_.split()), help_
    assert "without" not in cli.FORCE_HELP["eval"] and "trained trials are reused" in cli.FORCE_HELP["eval"]

    # CLI wiring: which stage function gets which flags
    calls = []
    monkeypatch.setattr(pipeline, "stage_eval", lambda c, force=False: calls.append(("eval", force)))
    monkeypatch.setattr(pipeline, "stage_sweep", lambda c, force=False: calls.append(("sweep", force)))
    monkeypatch.setattr(pipeline, "run_physics", lambda c, force=False: calls.append(("physics", force)))
    for stage in ("eval", "sweep", "physics"):
        assert cli.main([stage, "--preset", "tiny", "--force", f"workdir={tmp_path}"]) == 0
    assert calls == [("eval", True), ("sweep", True), ("physics", True)]
    monkeypatch.undo()

    # stage_sweep(force=True): the previous trials are moved aside, restored on failure, removed on success
    from ssae_ray.config import load_config

    cfg = load_config("tiny", overrides=[f"workdir={tmp_path / 'w'}"])
    folder = tmp_path / "w" / "sweep" / "k"
    done = folder / "trials" / sweep.grid(cfg)[0].name / "done.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"old": True}))
    plan = pipeline.SweepPlan(tmp_path, tmp_path, {}, folder)
    monkeypatch.setattr(pipeline, "_test_sets", lambda *a, **k: {"val": object()})
    seen = []

    def failing_sweep(c, gsae_dir, caches, val, out, models):
        seen.append(sorted(p.name for p in out.parent.iterdir()))
        raise RuntimeError("trial failed")

    monkeypatch.setattr(sweep, "run_sweep", failing_sweep)
    with pytest.raises(RuntimeError):
        pipeline.stage_sweep(cfg, force=True, lm=object(), plan=plan)
    assert seen == [["k.replaced"]]  # the new sweep started from nothing ...
    assert (folder.with_name("k.replaced") / done.relative_to(folder)).is_file()  # ... the old one is kept

    def good_sweep(c, gsae_dir, caches, val, out, models):
        (out / "trials").mkdir(parents=True, exist_ok=True)
        return "result"

    monkeypatch.setattr(sweep, "run_sweep", good_sweep)
    assert pipeline.stage_sweep(cfg, force=True, lm=object(), plan=plan) == "result"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["k"] and not done.exists()

    # without force, a finished trial is reused (run_sweep gets the same folder, untouched)
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    assert pipeline.stage_sweep(cfg, force=False, lm=object(), plan=plan) == "result" and done.is_file()


def test_autointerp_sae_names_include_the_seed(tmp_path):
    """Two seeds of one (strategy, tilt, λ) are two SAEs in the auto-interp outputs, not one name
    whose files the second seed overwrites."""
    import csv

    from ssae_ray.pipeline import best_ssaes

    hook = "blocks.1.hook_resid_post"
    rows = []
    for seed in (0, 1):
        path = tmp_path / "trials" / f"dense-lam2-tilt0-seed{seed}" / "best"
        (path / hook).mkdir(parents=True)
        rows.append({"strategy": "dense", "lam": 2.0, "tilt": 0.0, "seed": seed, "step": 4,
                     "best_for_lam": 1, "best_path": str(path)})  # fmt: skip
    rows.append({**rows[0], "step": 2, "best_for_lam": 0, "best_path": ""})
    with open(tmp_path / "sweep_trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    got = best_ssaes(tmp_path, hook)
    assert got == {
        "dense-tilt0-lam2-seed0": tmp_path / "trials" / "dense-lam2-tilt0-seed0" / "best" / hook,
        "dense-tilt0-lam2-seed1": tmp_path / "trials" / "dense-lam2-tilt0-seed1" / "best" / hook,
    }
