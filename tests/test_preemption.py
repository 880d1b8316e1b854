"""Preemption: a sweep whose driver is SIGKILLed mid-trial (its local Ray and trial processes go with
it) and is then rerun with the same command resumes each unfinished trial from its last checkpoint,
continues its MLflow child run, and ends with the SAEs of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssae_ray import tracking
from ssae_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 600, 100

DRIVER = r"""
import random, sys
from pathlib import Path
from ssae_ray import sweep
from ssae_ray.config import load_config
from ssae_ray.eval.evaluate import prepare_test_set
from ssae_ray.models import load_lm
from ssae_ray.runtime import setup_logging
from ssae_ray.saes import load_gsaes, save_sae
from ssae_ray.training.cache import cache_activations

setup_logging()
work, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config("tiny", overrides=[f"workdir={work}", "train.steps=STEPS", "train.checkpoint_every=EVERY",
                                     "train.batch_tokens=64", "train.lr=0.01", "train.decay_steps=100",
                                     "sweep.lams=[0.5,5.0]", "sweep.strategies=[dense]",
                                     "sweep.max_concurrent_trials=2", "train.max_failures=0"])
lm = load_lm(cfg.model, work / "models")
for h, s in load_gsaes(cfg, lm).items():
    save_sae(s, work / "gsae" / h)
words = "the quantum field electron photon river city bread fish king queen music".split()
rnd = random.Random(0)
texts = [" ".join(rnd.choice(words) for _ in range(60)) for _ in range(40)]
caches = {"dense": cache_activations(cfg, lm, texts[:30], cfg.sae.hooks, progress=False)}
val = prepare_test_set(lm, "val", texts[30:], cfg.sae.hooks, cfg.model.context_len, 256)
res = sweep.run_sweep(cfg, work / "gsae", caches, val, out, work / "models")
print("DONE", res.parent_run_id)
""".replace("STEPS", str(STEPS)).replace("EVERY", str(EVERY))


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    return env


def _run(tmp_path: Path, out: Path) -> str:
    p = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "work"), str(out)], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert p.returncode == 0 and "DONE" in p.stdout, p.stderr[-4000:]
    return p.stdout


@pytest.mark.slow  # three sweeps, each starting Ray: ~4 min on the shared 2-core machine
@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_sigkilled_sweep_resumes_trials_from_their_checkpoints(tmp_path):
    from mlflow.tracking import MlflowClient
    from sae_lens import SAE

    ref_out, out = tmp_path / "ref", tmp_path / "sweep"
    _run(tmp_path, ref_out)  # uninterrupted

    # The same sweep, its driver SIGKILLed (with its whole process group) once a trial checkpointed.
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "work"), str(out)], env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 600
    try:
        while time.time() < deadline and not list(out.glob("trials/*/state/progress.json")):
            assert proc.poll() is None, "the sweep ended before any checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    time.sleep(3)  # the local Ray's processes die with the driver (fate sharing)
    at_kill = {
        p.parents[1].name: json.loads(p.read_text())["step"] for p in out.glob("trials/*/state/progress.json")
    }
    assert at_kill and all(0 < s < STEPS and s % EVERY == 0 for s in at_kill.values()), at_kill

    _run(tmp_path, out)  # the same command again

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(tracking.experiment_name(load_config("tiny")))
    assert exp is not None, [e.name for e in client.search_experiments()]
    for tdir in sorted((out / "trials").iterdir()):
        done = json.loads((tdir / "done.json").read_text())
        attempts = done["attempts"]
        if tdir.name in at_kill:  # resumed at its checkpoint: the steps after it were run again, only those
            assert attempts[-1] == {"start": at_kill[tdir.name], "end": STEPS}, attempts
            assert attempts[0]["start"] == 0 and attempts[0]["end"] >= at_kill[tdir.name]
        else:
            assert attempts[-1]["end"] == STEPS
        assert not (tdir / "state").exists()  # the checkpoint goes once the trial is done
        assert [c["step"] for c in done["checkpoints"]] == list(range(EVERY, STEPS + 1, EVERY))
        # the same SAEs as the uninterrupted run (same best checkpoint, same weights)
        ref = json.loads((ref_out / "trials" / tdir.name / "done.json").read_text())
        best = min(done["checkpoints"], key=lambda c: c["val"]["val_ce"])["step"]
        assert best == min(ref["checkpoints"], key=lambda c: c["val"]["val_ce"])["step"]
        for h in (tdir / "best").iterdir():
            a, b = SAE.load_from_disk(h), SAE.load_from_disk(ref_out / "trials" / tdir.name / "best" / h.name)
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                # 1e-5: the checkpoint stores biases divided by the activation scale (sae-lens format,
                # read back times it), a last-bit rounding that 500 Adam steps carry to ~1e-6 (measured 1.3e-6)
                assert (getattr(a, name) - getattr(b, name)).abs().max() <= 1e-5, (tdir.name, h.name, name)
        # one MLflow child run per trial, continued (not reopened as a new run), finished
        runs = [r for r in client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{tdir.name}'")
                if r.info.run_id != ref["run_id"]]  # fmt: skip
        assert [r.info.run_id for r in runs] == [done["run_id"]]
        assert runs[0].info.status == "FINISHED"
        steps = {m.step for m in client.get_metric_history(done["run_id"], "train/loss")}
        assert steps == set(range(STEPS))
        if tdir.name in at_kill:
            assert runs[0].data.tags.get("ssae.resumed") == "true"


class _Killed(BaseException):
    """Stands in for the SIGKILL: raised from inside the trial, past every `except Exception`."""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_in_process_trial_resumes_from_its_checkpoint(tiny_trial, tmp_path, caplog, precision):
    """The fast variant (no Ray, no subprocess): an in-process trial killed after its step-2
    checkpoint is rerun, resumes at step 2 (its first step is the checkpoint's), continues its MLflow
    child run, and ends with exactly the SAEs of an uninterrupted trial, bit for bit, with the step's
    matmuls in fp32 and in bf16 (the checkpoint keeps the trainable weights as they are: restored from
    the sae-lens copy alone, each weight moved by an ulp, which bf16 rounding turned into ~0.1 after
    500 steps)."""
    import logging

    from sae_lens import SAE

    from ssae_ray import sweep, tracking
    from ssae_ray.sweep import Trial

    cfg, ctx, val = tiny_trial
    cfg = cfg.replace(train={"steps": 6, "precision": precision})
    t = Trial("dense", 1.0, 0.0, 0)
    sweep.run_trial(cfg, t, ctx, val, tmp_path / "ref", report=lambda m: None)

    def kill_at_4(m):
        if m["step"] == 4:  # scored at step 4, killed before its checkpoint is written
            raise _Killed

    with pytest.raises(_Killed):
        sweep.run_trial(cfg, t, ctx, val, tmp_path / "t", report=kill_at_4)
    progress = json.loads((tmp_path / "t" / "state" / "progress.json").read_text())
    assert progress["step"] == 2 and not (tmp_path / "t" / "done.json").exists()
    rid = json.loads((tmp_path / "t" / "run.json").read_text())["run_id"]
    with caplog.at_level(logging.INFO, logger="ssae_ray"):
        sweep.run_trial(cfg, t, ctx, val, tmp_path / "t", report=lambda m: None)
    assert f"trial {t.name} resumes at step 2 of 6" in caplog.text
    done = json.loads((tmp_path / "t" / "done.json").read_text())
    # the killed attempt is known as far as its checkpoint; the resumed one starts there
    assert done["attempts"] == [{"start": 0, "end": 2}, {"start": 2, "end": 6}]
    assert done["run_id"] == rid and not (tmp_path / "t" / "state").exists()
    run = tracking.open_experiment(ctx["uri"], tracking.experiment_name(cfg))[0].get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["ssae.resumed"] == "true"
    ref = json.loads((tmp_path / "ref" / "done.json").read_text())
    assert [c["step"] for c in done["checkpoints"]] == [c["step"] for c in ref["checkpoints"]] == [2, 4, 6]
    for h in cfg.sae.hooks:
        a, b = (
            SAE.load_from_disk(tmp_path / "t" / "best" / h),
            SAE.load_from_disk(tmp_path / "ref" / "best" / h),
        )
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (h, name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpoint_restores_the_trainer_bit_for_bit(tmp_path, precision):
    """`save_checkpoint` then `load_checkpoint` into fresh trainers gives the very weights (the
    sae-lens copy folds the activation scale in, which moves them by ulps: measured 3e-8) and
    optimizer state, so the next steps are the uninterrupted run's, bit for bit, in fp32 and bf16."""
    from ssae_ray.config import TrainConfig
    from ssae_ray.saes import make_random_sae
    from ssae_ray.training.loop import make_trainers
    from ssae_ray.training.ray_train import load_checkpoint, save_checkpoint

    h = "blocks.1.hook_resid_post"
    tc = TrainConfig(lr=1e-2, lam=1.0, batch_tokens=128, precision=precision)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(128, 64, generator=gen) * 7 for _ in range(9)]

    def fresh():
        return make_trainers(tc, {h: make_random_sae(64, 256, h, seed=0)}, {h: batches[0]}, "cpu")

    run = fresh()
    assert run[h].act_scale != 1.0  # the scale is folded into the sae-lens copy
    for s in range(4):
        run[h].apply(run[h].step(batches[s], 1e-2, s))
    save_checkpoint(tmp_path / "ck", run, 4)
    resumed = fresh()
    assert load_checkpoint(tmp_path / "ck", resumed) == 4
    for a, b in zip(run[h].params, resumed[h].params, strict=True):
        assert torch.equal(a, b)
    for s in range(4, 9):
        for tr in (run[h], resumed[h]):
            tr.apply(tr.step(batches[s], 1e-2, s))
    for a, b in zip(run[h].params, resumed[h].params, strict=True):
        assert torch.equal(a, b)
