"""GSAE pretraining to convergence: the lr schedule, the validation-curve stopping rule and
dead-latent resampling on tiny planted problems (no LM; one torch thread)."""

from __future__ import annotations

import pytest
import torch

from ssae_ray.config import TrainConfig, load_config
from ssae_ray.saes import make_random_sae
from ssae_ray.training.converge import Convergence, resample_dead, wsd_lr
from ssae_ray.training.loop import HookTrainer, lr_at
from ssae_ray.training.losses import TrainingError
from ssae_ray.training.pretrain import PretrainPlan, activation_metrics, pretrain_key, train_gsaes

D, M = 32, 16
Q = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(5)))[0][:M]
"""The planted dictionary: M orthonormal directions in R^D."""


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: see conftest


def planted(n: int, seed: int) -> torch.Tensor:
    """Sparse non-negative codes (about 3 of 16 active) on the planted directions, plus noise."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(n, M, generator=g) * (torch.rand(n, M, generator=g) < 0.2)
    return codes @ Q * 4 + 0.01 * torch.randn(n, D, generator=g)


def stream(n: int = 128):
    s = 1
    while True:
        s += 1
        yield {"a": planted(n, s)}


X_VAL = planted(1024, 0)


def validate(trainers, with_ce):
    return {h: activation_metrics(tr, X_VAL) for h, tr in trainers.items()}


def solved_sae(d_sae: int = M):
    """An SAE whose first M latents are the planted dictionary (the rest random)."""
    sae = make_random_sae(D, d_sae, "a", seed=0)
    with torch.no_grad():
        sae.W_dec[:M] = Q
        sae.W_enc[:, :M] = Q.T
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# --------------------------------------------------------------------------------------------- schedule


def test_wsd_schedule_and_finetune_warmup():
    lrs = [wsd_lr(s, 1.0, 4, None, 0) for s in range(6)]
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # warm-up, then stable while the end is unknown
    assert [wsd_lr(s, 1.0, 0, 6, 4, 0.0) for s in range(5, 11)] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    tc = TrainConfig(lr=1.0, steps=10, decay_steps=4, lr_end=0.0, warmup_steps=2)
    assert [lr_at(tc, s) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25]
    with pytest.raises(TrainingError, match="warmup_steps"):
        HookTrainer(TrainConfig(warmup_steps=-1), make_random_sae(D, M, "a"), "a", 1.0)


def test_fixed_length_plan_keeps_the_old_schedule():
    """Without `pretrain_converge` the lr is the historical one: constant, then linear decay to
    lr_end over the last fifth (what `lr_at` gave with decay_steps = steps // 5)."""
    for steps in (7, 9, 20, 30, 700):
        plan = PretrainPlan(max_steps=steps, lr=1e-3)
        tc = TrainConfig(lr=1e-3, steps=steps, decay_steps=max(steps // 5, 1))
        stable = plan.cap_stable_end()
        got = [wsd_lr(s, 1e-3, 0, stable, steps - stable) for s in range(steps)]
        assert got == pytest.approx([lr_at(tc, s) for s in range(steps)])


# --------------------------------------------------------------------------------------------- convergence


def test_convergence_rule_on_planted_curves():
    flat = Convergence(window_tokens=100, rel_tol=0.01)
    steady = Convergence(window_tokens=100, rel_tol=0.01)
    for t in range(0, 1001, 20):
        flat.add(t, 1.0 + 1.0 / (1 + t) ** 2)  # flattens after a few points
        steady.add(t, 10.0 - 0.005 * t)  # 5% better every window: never flat
    assert flat.converged() and 0 <= flat.improvement() < 0.01
    assert not steady.converged() and steady.improvement() > 0.05
    short = Convergence(window_tokens=100, rel_tol=0.01)
    short.add(0, 1.0)
    short.add(50, 1.0)
    assert short.improvement() is None and not short.converged()  # shorter than one window
    flat.restart()
    assert not flat.converged()
    with pytest.raises(TrainingError, match="validation metric became nan"):
        flat.add(10, float("nan"))


def test_pretraining_stops_early_when_converged_and_continues_when_not():
    def run(sae):
        tc = TrainConfig(lr=1e-3, lam=0.05, batch_tokens=128)
        trainers = {"a": HookTrainer(tc, sae, "a", 1.0)}
        plan = PretrainPlan(max_steps=300, lr=1e-3, converge=True, val_every=10, window_tokens=50 * 128,
                            rel_tol=0.01)  # fmt: skip
        return train_gsaes(trainers, stream(), plan, validate, progress=False)

    done = run(solved_sae())  # starts at the planted solution: the curve is flat from the start
    assert done.stop_reason == "converged"
    assert done.stable_end == 60  # the first validation with a full window (50 steps) before it
    assert done.steps == 75 and len(done.history) == 75  # + the decay: a fifth of the run
    assert [p["phase"] for p in done.curve][-2:] == ["decay", "decay"]
    assert done.history[-1]["lr"] == pytest.approx(1e-3 / 15)  # decays linearly towards 0

    fresh = run(make_random_sae(D, M, "a", seed=0))  # still improving ~10% per window at the cap
    assert fresh.stop_reason == "step_cap" and fresh.steps == 300 and fresh.stable_end == 240
    losses = [p["a"]["loss"] for p in fresh.curve]
    assert losses[-1] < 0.5 * losses[0]
    assert fresh.tokens == 300 * 128


def test_ce_rule_of_the_converged_preset_watches_only_the_spliced_ce_points():
    """`local-converged` stops on the spliced validation CE, scored every `pretrain_ce_every`-th
    validation: only those points enter the rule, so it can fire only at a CE validation; the final
    SAE always gets a CE. The CE here is a stand-in (3 + held-out loss): no LM on a planted problem."""
    preset = PretrainPlan.from_config(load_config("local-converged").train)
    assert preset.converge and preset.metric == "ce" and preset.ce_every == 5
    preset.check(True)
    calls = []

    def validate_ce(trainers, with_ce):
        calls.append(with_ce)
        out = validate(trainers, with_ce)
        if with_ce:
            for v in out.values():
                v["ce"] = 3.0 + v["loss"]
        return out

    def run(sae):
        calls.clear()
        tc = TrainConfig(lr=1e-3, lam=0.05, batch_tokens=128)
        trainers = {"a": HookTrainer(tc, sae, "a", 1.0)}
        plan = PretrainPlan(max_steps=300, lr=1e-3, converge=True, val_every=10, ce_every=3, metric="ce",
                            window_tokens=50 * 128, rel_tol=0.01)  # fmt: skip
        return train_gsaes(trainers, stream(), plan, validate_ce, progress=False)

    done = run(solved_sae())
    ce_steps = [p["step"] for p in done.curve if "ce" in p["a"]]
    # CE at validations 0, 3, 6 (steps 10, 40, 70): the first full window before a CE point ends at 70,
    # not at 60 where the loss rule fires; then a fifth of the whole run decays (17 steps), CE at the end.
    assert done.stop_reason == "converged" and done.stable_end == 70 and done.steps == 87
    assert ce_steps == [10, 40, 70, 87] and calls == [True, False, False] * 2 + [True, False, True]
    fresh = run(make_random_sae(D, M, "a", seed=0))  # its CE still falls > 1% per window
    assert fresh.stop_reason == "step_cap" and fresh.stable_end == 240 and fresh.steps == 300
    ce = [p["a"]["ce"] for p in fresh.curve if "ce" in p["a"]]
    assert len(ce) == 11 and ce[-1] < ce[0]  # steps 10, 40, ..., 280 and the final 300


def test_plan_refuses_convergence_without_validation():
    plan = PretrainPlan(max_steps=10, lr=1e-3, converge=True)
    with pytest.raises(TrainingError, match="pretrain_val_tokens"):
        plan.check(has_validation=False)
    with pytest.raises(TrainingError, match="pretrain_converge_metric"):
        PretrainPlan(max_steps=10, lr=1e-3, metric="auc").check(True)
    with pytest.raises(TrainingError, match="pretrain_ce_every"):
        PretrainPlan(max_steps=10, lr=1e-3, converge=True, metric="ce").check(True)


# --------------------------------------------------------------------------------------------- dead latents


def killed_trainer(dead: list[int]) -> HookTrainer:
    """The planted solution with latents `dead` killed (encoder bias -100: they never fire), so
    the planted directions they held are left unexplained."""
    sae = solved_sae()
    with torch.no_grad():
        sae.b_enc[dead] = -100.0
    tc = TrainConfig(lr=1e-3, lam=0.05, batch_tokens=128, dead_window_tokens=1024)
    return HookTrainer(tc, sae, "a", 1.0)


def test_resampling_revives_planted_dead_latents():
    dead = [3, 7, 11]
    g = torch.Generator().manual_seed(0)

    def train(tr, steps):
        it = stream()
        for s in range(steps):
            tr.apply(tr.step(next(it)["a"], 1e-3, s))

    control, tr = killed_trainer(dead), killed_trainer(dead)
    train(control, 20)
    train(tr, 20)
    is_dead = tr.tokens_since_fired >= tr.tc.dead_window_tokens
    assert sorted(torch.nonzero(is_dead).flatten().tolist()) == dead  # the planted dead, only them
    before = activation_metrics(tr, X_VAL)
    assert before["dead"] == pytest.approx(3 / M)
    adam = tr.opt.state[tr.form.W_dec]["exp_avg"].clone()
    kept = tr.form.W_dec[[0, 1, 2]].clone()

    n = resample_dead(tr, planted(512, 99), is_dead, g)
    assert n == 3
    assert torch.allclose(tr.form.W_dec.norm(dim=1), torch.ones(M), atol=1e-5)
    assert torch.equal(tr.form.W_dec[[0, 1, 2]], kept)  # live latents untouched
    assert float(tr.opt.state[tr.form.W_dec]["exp_avg"][dead].abs().sum()) == 0.0  # Adam rows reset
    assert torch.equal(tr.opt.state[tr.form.W_dec]["exp_avg"][[0, 1]], adam[[0, 1]])
    assert float(tr.form.b_enc[dead].abs().sum()) == 0.0 and int(tr.tokens_since_fired[dead].sum()) == 0
    # the revived decoder rows point mostly into the span of the unexplained planted directions
    # (the worst-reconstructed inputs carry them; live latents' codes ride along)
    inside = (tr.form.W_dec[dead] @ Q[dead].T).norm(dim=1)
    assert float(inside.mean()) > 0.6, inside  # a random direction of the data's span: ~0.43

    train(tr, 60)
    train(control, 60)
    after, ctrl = activation_metrics(tr, X_VAL), activation_metrics(control, X_VAL)
    assert after["dead"] == 0.0 and ctrl["dead"] == pytest.approx(3 / M)
    assert after["fvu"] < 0.6 * ctrl["fvu"]  # the revived latents explain the missing directions


def test_train_gsaes_resamples_during_the_stable_phase_only():
    tr = killed_trainer([2, 5])
    tr.tc = TrainConfig(lr=1e-3, lam=0.05, batch_tokens=128, dead_window_tokens=256)
    batches = stream()
    extra = stream(512)
    plan = PretrainPlan(max_steps=60, lr=1e-3, val_every=10, resample_every=5, resample_max=3)
    res = train_gsaes({"a": tr}, batches, plan, validate, lambda: next(extra), progress=False)
    assert res.stop_reason == "fixed" and res.steps == 60
    assert res.resamples and res.resamples[0] == {"step": 5, "tokens": 640, "hook": "a", "latents": 2}
    assert all(r["step"] <= res.stable_end for r in res.resamples) and len(res.resamples) <= 3
    assert res.curve[-1]["a"]["dead"] == 0.0


def test_pretrain_key_unchanged_for_fixed_runs_and_changed_by_convergence_settings(tmp_path):
    cfg = load_config("tiny", overrides=[f"workdir={tmp_path}"])
    base = pretrain_key(cfg, ["a b c"])
    assert base == pretrain_key(cfg.replace(train={"pretrain_val_every": 7}), ["a b c"])  # unused when off
    assert base != pretrain_key(
        cfg.replace(train={"pretrain_converge": True, "pretrain_val_tokens": 100}), ["a b c"]
    )
    assert base != pretrain_key(cfg.replace(train={"pretrain_warmup_steps": 10}), ["a b c"])


# --------------------------------------------------------------------------------------------- the stage


def test_pretrain_gsaes_to_convergence_records_the_curve_in_its_manifest(tmp_path):
    import json

    from ssae_ray.models import load_lm
    from ssae_ray.training.pretrain import pretrain_gsaes

    texts = [f"Document {i} talks about energy, rivers and music number {i % 7}. " * 4 for i in range(20)]
    cfg = load_config("tiny", overrides=[f"workdir={tmp_path / 'work'}"]).replace(
        sae={"hooks": ["blocks.1.hook_resid_post"], "d_sae": 64},
        train={"pretrain_steps": 40, "pretrain_tokens": None, "pretrain_converge": True, "pretrain_val_tokens": 400,
               "pretrain_val_every": 5, "pretrain_ce_every": 2, "pretrain_ce_tokens": 200,
               "pretrain_converge_window_tokens": 2560, "pretrain_converge_rel_tol": 0.5,
               "pretrain_warmup_steps": 3, "pretrain_resample_every": 10, "dead_window_tokens": 1024},
    )  # fmt: skip
    lm = load_lm(cfg.model, cache_dir=tmp_path / "models")
    out = pretrain_gsaes(cfg, lm, texts, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    h = "blocks.1.hook_resid_post"
    curve = man["validation_curve"]
    assert man["stop_reason"] in ("converged", "step_cap") and man["steps"] <= 40
    assert man["tokens_seen"] == man["steps"] * cfg.train.batch_tokens
    assert man["epochs"] == pytest.approx(man["tokens_seen"] / man["corpus_tokens"]) and man["epochs"] > 1
    assert curve == json.loads((out / "validation.json").read_text())
    assert [p["step"] for p in curve][:3] == [5, 10, 15] and curve[-1]["step"] == man["steps"]
    assert "ce" in curve[0][h] and "ce" not in curve[1][h] and "ce" in curve[2][h]  # every 2nd validation
    assert "ce" in curve[-1][h] and man["final_validation"][h]["ce"] == curve[-1][h]["ce"]  # and the last
    assert set(man["final_validation"][h]) >= {"fvu", "l0", "dead", "loss", "mse"}
    assert curve[-1][h]["fvu"] < curve[0][h]["fvu"]
    # the held-out documents are not trained on
    act = json.loads((__import__("pathlib").Path(man["activations"]) / "manifest.json").read_text())
    val = json.loads((__import__("pathlib").Path(man["validation"]) / "manifest.json").read_text())
    assert act["n_texts"] + val["n_texts"] == len(texts) and val["n_texts"] >= 1
    assert pretrain_gsaes(cfg, lm, texts, progress=False) == out  # cached


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk"])
def test_resampling_works_for_every_architecture(arch):
    sae = make_random_sae(D, M, "a", seed=1, arch=arch, k=4, threshold=0.01)
    tc = TrainConfig(lr=1e-3, lam=0.05, batch_tokens=128, dead_window_tokens=256)
    tr = HookTrainer(tc, sae, "a", 1.0)
    for s in range(3):
        tr.apply(tr.step(planted(128, s + 1), 1e-3, s))
    dead = torch.zeros(M, dtype=torch.bool)
    dead[[1, 4]] = True
    x = planted(256, 50)
    assert resample_dead(tr, x, dead, torch.Generator().manual_seed(0)) == 2
    assert torch.allclose(tr.form.W_dec.norm(dim=1), torch.ones(M), atol=1e-5)
    assert float(tr.form.b_enc[[1, 4]].abs().sum()) == 0.0
    if arch == "jumprelu":
        assert torch.allclose(tr.form.threshold[[1, 4]], torch.full((2,), 0.01))
        assert float(tr.opt.state[tr.form.threshold]["exp_avg"][[1, 4]].abs().sum()) == 0.0
    tr.apply(tr.step(x, 1e-3, 3))  # trains on after resampling
    assert torch.isfinite(tr.form.W_enc).all()
