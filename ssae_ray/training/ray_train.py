"""Ray Train wiring: a `TorchTrainer` that finetunes the GSAEs of a run on a cached activation set.

Placement (`train.placement`):
- `by_hook`: each worker owns a subset of the SAEs (balanced by d_in·d_sae) and reads only its
  hooks from the cache. No communication at all: unrelated SAEs share no gradients.
- `data_parallel`: every worker holds every SAE and takes its slice of each batch; gradients are
  summed with an all-reduce, and TERM weights come from the all-gathered per-token losses, so
  the step equals the single-process step on the whole batch (TERM included).
- `auto`: `by_hook` when there are at least as many SAEs as workers, else `data_parallel`.
  Why: a by-hook worker runs its SAEs at single-process speed with no communication, while
  data parallelism adds an all-reduce of every SAE's weights (2·d_in·d_sae floats) per step;
  so splitting SAEs is the cheaper choice whenever there are SAEs to split. (The bench measures
  the single-process step; a by-hook vs data-parallel timing on a real multi-node cluster is
  still to be taken.)

Checkpoints (every `checkpoint_every` steps and at the end) hold, per hook, the SAE in sae-lens
format (`<hook>/cfg.json`, `sae_weights.safetensors`) and `<hook>/trainer_state.pt` (Adam state,
λ controller, loss scale, dead-latent counters, step). The data order is a function of
(seed, step), so with `FailureConfig(max_failures)` a killed worker resumes from the last
checkpoint and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ssae_ray.config import Config, from_dict
from ssae_ray.resources import cluster_gpus_have_cuda, cluster_has_gpus, gpu_unit, process_device
from ssae_ray.stages import atomic_dir, read_manifest, stage_key, write_json_atomic
from ssae_ray.training.cache import iter_cache_batches, open_cache
from ssae_ray.training.collective import DistCollective
from ssae_ray.training.loop import HookTrainer, check_train_config, make_trainers, run_steps
from ssae_ray.training.losses import TrainingError

log = logging.getLogger("ssae_ray")
STATE = "trainer_state.pt"


def choose_placement(placement: str, n_saes: int, num_workers: int) -> str:
    """`auto`: by_hook whenever there are at least as many SAEs as workers. Measured with
    benchmarks/bench_placement.py (3 SAEs 64 -> 1024, 2 workers, 2 CPUs): by_hook 45k train tokens/s,
    data_parallel 12k (its all-reduce of every SAE's gradients each step), 1 worker 37k."""
    if placement == "auto":
        return "by_hook" if n_saes >= num_workers else "data_parallel"
    if placement == "by_hook" and num_workers > n_saes:
        raise TrainingError(
            f"placement by_hook needs at least as many SAEs as workers ({n_saes} SAEs, {num_workers} "
            "workers); use placement=data_parallel or fewer train.num_workers"
        )
    if placement not in ("by_hook", "data_parallel"):
        raise TrainingError(f"train.placement must be auto, by_hook or data_parallel, got {placement!r}")
    return placement


def assign_hooks(costs: dict[str, int], num_workers: int) -> list[list[str]]:
    """Greedy longest-first: each SAE goes to the least-loaded worker (deterministic)."""
    loads = [0] * num_workers
    out: list[list[str]] = [[] for _ in range(num_workers)]
    for h in sorted(costs, key=lambda h: (-costs[h], h)):
        w = min(range(num_workers), key=lambda i: (loads[i], i))
        loads[w] += costs[h]
        out[w].append(h)
    return out


def save_checkpoint(folder: Path, trainers: dict[str, HookTrainer], step: int) -> None:
    from ssae_ray.saes import save_sae

    for h, tr in trainers.items():
        save_sae(tr.export().to("cpu"), folder / h)
        torch.save({**tr.state_dict(), "step": step}, folder / h / STATE)


def load_checkpoint(folder: Path, trainers: dict[str, HookTrainer]) -> int:
    """Load each hook's weights and state from `folder`; returns the step to resume from."""
    from ssae_ray.saes import load_sae

    steps = set()
    for h, tr in trainers.items():
        sae = load_sae(folder / h)
        state = torch.load(folder / h / STATE, map_location="cpu", weights_only=False)
        tr.load_weights(sae)  # through the exact import: any architecture, width checked
        tr.load_state_dict(state)  # then the weights bit-exact, the optimizer, λ and counters
        steps.add(int(state["step"]))
    if len(steps) != 1:
        raise TrainingError(f"the checkpoint at {folder} mixes steps {sorted(steps)} across hooks")
    return steps.pop()


def _load_gsaes(cfg: Config, gsae_dir: Path, hooks: list[str]) -> dict[str, Any]:
    from ssae_ray.saes import load_sae, slice_sae

    saes = {}
    for h in hooks:
        sae = load_sae(gsae_dir / h)
        if cfg.sae.slice_to is not None:
            scale = getattr(sae.cfg.metadata, "act_scale", None)
            sae = slice_sae(sae, cfg.sae.slice_to)
            sae.cfg.metadata.act_scale = scale
        saes[h] = sae
    return saes


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function of the TorchTrainer."""
    import ray.train

    cfg = from_dict(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = process_device()  # this worker's GPU (its place in the node's shared list), else cpu
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config["placement"] == "by_hook":
        mine, dp_rank, dp_world = config["assignment"][rank], 0, 1
        coll = None
    else:  # replicas: gradients and the step's statistics reduced over the global batch
        mine, dp_rank, dp_world = config["hooks"], rank, world
        coll = DistCollective()  # tensors on the backend's device: cuda for NCCL, cpu for gloo
    saes = _load_gsaes(cfg, Path(config["gsae_dir"]), mine)
    # the whole first batch (not this replica's slice): the activation scale is the single process's
    first = next(iter_cache_batches(config["cache_dir"], mine, tc.batch_tokens, tc.seed, 0, 0, 1))
    trainers = make_trainers(tc, saes, first, str(device))
    start = 0
    ckpt = ray.train.get_checkpoint()
    history: list[dict[str, float]] = []
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = load_checkpoint(Path(d), trainers)
            hist = Path(d) / f"history_rank{rank}.json"
            history = json.loads(hist.read_text()) if hist.is_file() else []
        log.info("worker %d resumes at step %d", rank, start)
    batches = iter_cache_batches(
        config["cache_dir"], mine, tc.batch_tokens, tc.seed, start, dp_rank, dp_world
    )
    fail_at, marker = config.get("fail_at_step"), config.get("fail_marker")

    def maybe_fail(step: int) -> None:  # fault injection for the resume test
        if fail_at is not None and step == fail_at and rank == 0 and not Path(marker).exists():
            Path(marker).touch()
            os._exit(1)

    step = start
    while step < tc.steps:
        stop = min((step // tc.checkpoint_every + 1) * tc.checkpoint_every, tc.steps)
        hist = run_steps(trainers, batches, step, tc.steps, None, config["progress"] and rank == 0,
                         None, None, maybe_fail, f"finetune[{rank}]", stop, collective=coll)  # fmt: skip
        history += [{k: v for k, v in m.items() if k.split("/")[0] in mine or "/" not in k} for m in hist]
        step = stop
        metrics = {k: v for k, v in (history[-1] if history else {}).items()}
        metrics["step"] = step
        with tempfile.TemporaryDirectory() as tmp:
            if config["placement"] == "by_hook" or rank == 0:
                save_checkpoint(Path(tmp), trainers, step)
                Path(tmp, f"history_rank{rank}.json").write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)


def run_finetune(
    cfg: Config,
    gsae_dir: str | Path,
    cache_dir: str | Path,
    out_dir: str | Path,
    num_workers: int | None = None,
    placement: str | None = None,
    storage_path: str | Path | None = None,
    progress: bool = False,
    fail_at_step: int | None = None,
) -> Path:
    """Finetune the GSAEs in `gsae_dir` (`<hook>/` sae-lens folders) on the activation cache
    `cache_dir` with Ray Train; writes `out_dir/<hook>/` (sae-lens) + `history.json` + manifest.
    An `out_dir` already finished with the same inputs is returned as is. `fail_at_step` kills
    worker 0 once at that step (to test recovery)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tc = cfg.train
    check_train_config(tc)
    gsae_dir, cache_dir, out_dir = Path(gsae_dir), Path(cache_dir), Path(out_dir)
    info = open_cache(cache_dir)
    hooks = list(cfg.sae.hooks)
    for h in hooks:
        if not (gsae_dir / h / "cfg.json").is_file():
            raise TrainingError(f"no GSAE for {h} in {gsae_dir} (expected {gsae_dir / h}/cfg.json)")
        if h not in info.hooks:
            raise TrainingError(f"the activation cache {cache_dir} has no hook {h}; it holds {info.hooks}")
    n_workers = num_workers or tc.num_workers
    place = choose_placement(placement or tc.placement, len(hooks), n_workers)
    key = stage_key("finetune-v1", cfg.train, cfg.sae, str(gsae_dir.resolve()), read_manifest(cache_dir)["key"],
                    n_workers, place)  # fmt: skip
    done = read_manifest(out_dir)
    if done is not None and done.get("key") == key:
        return out_dir
    widths = {h: json.loads((gsae_dir / h / "cfg.json").read_text())["d_sae"] for h in hooks}
    costs = {h: info.d[h] * (cfg.sae.slice_to or widths[h]) for h in hooks}
    storage = Path(storage_path or cfg.root / "ray_train").expanduser().resolve()
    marker = tempfile.mktemp(prefix="ssae-fail-", dir=storage) if fail_at_step is not None else None
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "cfg": cfg.to_dict(), "hooks": hooks, "placement": place, "gsae_dir": str(gsae_dir.resolve()),
        "cache_dir": str(cache_dir.resolve()), "assignment": assign_hooks(costs, n_workers),
        "progress": progress, "fail_at_step": fail_at_step, "fail_marker": marker,
    }  # fmt: skip
    # One GPU per worker when the cluster has GPUs (asked of the cluster, not of this process: the
    # driver may sit on a CPU head); NCCL when those GPUs are CUDA devices, else gloo.
    use_gpu = cluster_has_gpus()
    backend = "nccl" if use_gpu and cluster_gpus_have_cuda() else "gloo"
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=n_workers, use_gpu=use_gpu, resources_per_worker=gpu_unit(use_gpu)
        ),
        run_config=RunConfig(
            name=f"finetune-{key}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise TrainingError(f"Ray Train finetune failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise TrainingError("Ray Train finetune finished without a checkpoint")
    injected = marker is not None and os.path.exists(marker)
    with result.checkpoint.as_directory() as d, atomic_dir(out_dir) as tmp:
        d = Path(d)
        history: dict[int, dict[str, float]] = {}
        for f in sorted(d.glob("history_rank*.json")):
            for m in json.loads(f.read_text()):
                history.setdefault(int(m["step"]), {}).update(m)
        for h in hooks:
            shutil.copytree(d / h, tmp / h, ignore=shutil.ignore_patterns(STATE))
        (tmp / "history.json").write_text(json.dumps([history[s] for s in sorted(history)]))
        write_json_atomic(tmp / "manifest.json", {
            "stage": "finetune", "key": key, "hooks": hooks, "placement": place, "num_workers": n_workers,
            "steps": tc.steps, "checkpoint": result.checkpoint.path, "injected_failure": injected,
        })  # fmt: skip
    if injected:
        os.remove(marker)
    return out_dir
