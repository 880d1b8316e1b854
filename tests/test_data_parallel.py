"""Data-parallel training equals one process at every step: two gloo replicas (forked processes,
`torch.distributed`, the `DistCollective` Ray Train workers use) each take half of every batch,
TERM in the scaled mode and adaptive λ on, dead-latent window shorter than the run; their weights,
λ, loss scale, dead counters and per-step metrics match the single-process run on whole batches
to float error."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os

import pytest
import torch

from ssae_ray.config import TrainConfig
from ssae_ray.saes import make_random_sae
from ssae_ray.training.loop import make_trainers, run_steps

STEPS, N, D_IN, D_SAE, HOOK = 20, 256, 16, 64, "blocks.0.hook_resid_post"
# precision fp32: exact comparisons (the bf16 step: test_bf16_replicas_stay_within_bf16s_own_error)
TC = TrainConfig(lr=3e-3, batch_tokens=N, steps=STEPS, decay_steps=10, lam=2.0, tilt=2.0, tilt_mode="scaled",
                 l0_band=(4.0, 8.0), adapt_rate=0.05, dead_window_tokens=3 * N, seed=0,
                 precision="fp32")  # fmt: skip


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.5, 3.0, D_IN)
    return [torch.randn(N, D_IN, generator=g) * scale + 0.3 for _ in range(STEPS)]


def _sae():
    torch.manual_seed(0)
    sae = make_random_sae(D_IN, D_SAE, HOOK)
    with torch.no_grad():
        sae.b_enc[:8] = -100.0  # 8 latents that never fire: the dead counters have work to do
    return sae


def _state(tr) -> dict[str, torch.Tensor | float]:
    return {"W_enc": tr.W_enc.clone(), "b_enc": tr.b_enc.clone(), "W_dec": tr.W_dec.clone(),
            "b_dec": tr.b_dec.clone(), "lam": tr.lam.lam, "scale": tr.scale.value,
            "since": tr.tokens_since_fired.clone()}  # fmt: skip


def _replica(rank: int, world: int, init: str, out: str, precision: str = "fp32") -> None:
    import torch.distributed as dist

    from ssae_ray.training.collective import DistCollective

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    batches = _batches()
    tc = dataclasses.replace(TC, precision=precision)
    trainers = make_trainers(tc, {HOOK: _sae()}, {HOOK: batches[0]})  # scale from the global batch
    part = N // world
    mine = iter({HOOK: b[rank * part : (rank + 1) * part]} for b in batches)
    hist = run_steps(trainers, mine, 0, STEPS, progress=False, collective=DistCollective())
    if rank == 0:
        torch.save({"state": _state(trainers[HOOK]), "history": hist}, out)
    dist.destroy_process_group()


def _run_replicas(tmp_path, precision: str = "fp32") -> tuple[dict, list]:
    """Two forked gloo replicas on half-batches; rank 0's final state and per-step history."""
    ctx = mp.get_context("fork")
    init, out = f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "rank0.pt")
    procs = [ctx.Process(target=_replica, args=(r, 2, init, out, precision)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = torch.load(out, weights_only=False)
    return got["state"], got["history"]


def _single(precision: str) -> tuple[dict, list]:
    batches = _batches()
    ref = make_trainers(dataclasses.replace(TC, precision=precision), {HOOK: _sae()}, {HOOK: batches[0]})
    hist = run_steps(ref, iter({HOOK: b} for b in batches), 0, STEPS, progress=False)
    return _state(ref[HOOK]), hist


@pytest.mark.timeout(300)
def test_two_replicas_equal_one_process_with_scaled_term_and_adaptive_lambda(tmp_path):
    torch.set_num_threads(1)
    ref_state, ref_hist = _single("fp32")
    st, hist = _run_replicas(tmp_path)

    # the run exercised what must be global: λ moved, some latents went dead, the scale is in use
    lams = [m[f"{HOOK}/lam"] for m in ref_hist]
    assert max(lams) != min(lams) and max(m[f"{HOOK}/dead"] for m in ref_hist) > 0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        diff = (st[name] - ref_state[name]).abs().max().item()
        assert diff < 1e-6, (name, diff)  # float error (measured 1.2e-7), not lr x steps (= 6e-2 here)
    assert st["lam"] == pytest.approx(ref_state["lam"], rel=1e-12)
    assert st["scale"] == pytest.approx(ref_state["scale"], rel=1e-6)
    assert torch.equal(st["since"], ref_state["since"])
    for a, b in zip(hist, ref_hist, strict=True):  # every step's metrics, from the global batch
        for k in ("l0", "dead", "loss", "fvu", f"{HOOK}/lam", f"{HOOK}/loss_scale", f"{HOOK}/objective",
                  f"{HOOK}/term_eff_share"):  # fmt: skip
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-9), (int(b["step"]), k, a[k], b[k])


@pytest.mark.timeout(300)
def test_bf16_replicas_stay_within_bf16s_own_error(tmp_path, auto_bf16):
    """The bf16 SAE step (`precision=auto` resolved to bf16, emulated where the CPU has no bf16):
    two replicas sum half-batch gradients that were each rounded to bf16, so they cannot equal the
    single process bitwise. Each weight of the replicas stays closer to the single-process bf16
    run than that run is to fp32 (data parallelism adds less error than bf16 itself), and within
    the bf16 bound of it; λ and the loss scale (global statistics) agree to the same bound."""
    from ssae_ray.testing.precision import bf16_rtol, rel_err

    torch.set_num_threads(1)
    ref16, hist16 = _single("auto")
    ref32, _ = _single("fp32")
    st, hist = _run_replicas(tmp_path, "auto")
    assert len(hist) == len(hist16) == STEPS
    # Each step's update passes through the six matmuls of the step; errors of earlier steps carry.
    bound = bf16_rtol(6 * STEPS)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        dp, own = rel_err(st[name], ref16[name]), rel_err(ref16[name], ref32[name])
        assert 0 < own <= bound, (name, own)  # bf16 really ran
        assert dp <= own and dp <= bound, (name, dp, own)
    for k in ("lam", "scale"):
        assert st[k] == pytest.approx(ref16[k], rel=bound), k


def test_replica_statistics_alone_would_diverge():
    """Without the global statistics (each replica's λ controller and loss scale from its own
    half-batch) the controllers disagree: what the collective fixes is real on this data."""
    batches = _batches()
    halves = []
    for r in range(2):
        tr = make_trainers(TC, {HOOK: _sae()}, {HOOK: batches[0]})
        run_steps(
            tr, iter({HOOK: b[r * N // 2 : (r + 1) * N // 2]} for b in batches), 0, STEPS, progress=False
        )
        halves.append((tr[HOOK].lam.lam, tr[HOOK].scale.value))
    assert halves[0] != halves[1]


os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
