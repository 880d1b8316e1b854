"""Devices and schedulability: the device a process uses follows what Ray assigned it; the paper
presets' requests fit the shipped clusters and get placed on a Ray with logical GPUs; a request
that can never fit is refused at once, naming what it asks and what the cluster offers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssae_ray.config import load_config
from ssae_ray.resources import (
    Offer,
    ResourceError,
    check_free_space,
    check_schedulable,
    offer_from_cluster_yaml,
    pick_device,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = [ROOT / "cluster" / p for p in ("aws-gpu.yaml", "gcp-gpu.yaml", "kuberay/raycluster.yaml",
                                           "kuberay/rayjob.yaml")]  # fmt: skip


def test_pick_device_follows_ray_assignment():
    # a Ray worker holding GPU 3 sees only it (CUDA_VISIBLE_DEVICES=3): cuda:0
    assert pick_device("auto", ["3"], cuda_available=True, visible=["3"]) == "cuda:0"
    # a Ray Train worker: the node's GPUs are shared among its workers; its own is its position
    assert pick_device("auto", ["1"], cuda_available=True, visible=["0", "1"]) == "cuda:1"
    assert pick_device("auto", ["2"], cuda_available=True, visible=None) == "cuda:2"
    # a Ray worker given no GPU never grabs one, even on a GPU machine
    assert pick_device("auto", [], cuda_available=True, visible=None) == "cpu"
    # logical GPUs (num_gpus on a CPU machine): cpu
    assert pick_device("auto", ["0"], cuda_available=False, visible=["0"]) == "cpu"
    # the driver (not a Ray worker): its own GPU if any, else cpu
    assert pick_device("auto", None, cuda_available=True) == "cuda"
    assert pick_device("auto", None, cuda_available=False) == "cpu"
    # an explicit model.device wins
    assert pick_device("cpu", ["0"], cuda_available=True, visible=["0"]) == "cpu"


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
@pytest.mark.parametrize("preset", ["paper-physics", "paper-toxicity", "pythia-70m-bib"])
def test_paper_presets_fit_the_shipped_clusters(path, preset):
    offer = offer_from_cluster_yaml(path)
    assert offer.total("GPU") == 4 and all(n["GPU"] <= 1 for n in offer.nodes)
    reqs = check_schedulable(load_config(preset), offer)
    assert any("GPU task" in r.what for r in reqs)


def test_impossible_requests_are_refused_at_once():
    offer = offer_from_cluster_yaml(CLUSTERS[0])
    cfg = load_config("paper-physics", overrides=["sweep.gpus_per_trial=5"])
    t0 = time.perf_counter()
    with pytest.raises(ResourceError) as e:
        check_schedulable(cfg, offer)
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert "sweep trial" in msg and "GPU: 5" in msg and "4 GPUs and 16 CPUs" in msg
    assert "4 x {CPU: 4, GPU: 1}" in msg and "never be scheduled" in msg and "sweep.gpus_per_trial" in msg
    # the old deadlock: 4 trials holding 4 CPUs each on 4-CPU nodes, then a 4-GPU trainer each
    cfg = load_config("paper-physics", overrides=["train.num_workers=4"])
    with pytest.raises(ResourceError, match=r"Ray Train workers .*4 x \{CPU: 1, GPU: 1\}.*waits forever"):
        check_schedulable(cfg, offer)
    # the trial with Train workers asks for no GPU of its own: one small trial at a time fits
    ok = ["train.num_workers=4", "sweep.max_concurrent_trials=1", "sweep.cpus_per_trial=1"]
    check_schedulable(load_config("paper-physics", overrides=ok), offer)
    # ...but not one that takes a whole 4-CPU node: that node's GPU is then out of the trainer's reach
    with pytest.raises(ResourceError, match="waits forever"):
        check_schedulable(load_config("paper-physics", overrides=[*ok, "sweep.cpus_per_trial=4"]), offer)
    # 5 Train workers on 4 GPUs: never
    with pytest.raises(ResourceError, match="never be scheduled"):
        check_schedulable(load_config("pythia-70m-bib", overrides=["train.num_workers=5"]), offer)
    # a CPU-only cluster asked for GPUs
    with pytest.raises(ResourceError, match="GPU: 1"):
        check_schedulable(load_config("paper-physics"), Offer([{"CPU": 64.0, "GPU": 0.0}], "test"))


def test_free_space_check_names_what_it_needs(tmp_path):
    check_free_space(tmp_path, 1, "a cache")
    with pytest.raises(ResourceError, match=r"a cache needs 1000\.0 TB under .* but only .* is free"):
        check_free_space(tmp_path / "not" / "yet", 1e15, "a cache")


PLACE = r"""
import json, sys, time
import ray
from ssae_ray.config import load_config
from ssae_ray.resources import (check_schedulable, cluster_offer, on_gpu_worker, process_device,
                                ray_gpu_ids, requests_for, ResourceError)
from ssae_ray.sweep import _trial_resources

ray.init(num_cpus=16, num_gpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
         object_store_memory=128 * 1024**2)
out = {"driver_ids": ray_gpu_ids(), "driver_device": str(process_device())}

@ray.remote
def where():
    return ray_gpu_ids(), str(process_device())

out["gpu_task"] = ray.get(where.options(num_gpus=1).remote(), timeout=120)
out["cpu_task"] = ray.get(where.options(num_gpus=0).remote(), timeout=120)
# what on_gpu_worker runs (the caching / evaluation tasks): a GPU of its own
out["on_gpu_worker"] = on_gpu_worker(lambda: (ray_gpu_ids(), str(process_device())))

@ray.remote
class Trial:
    def ids(self):
        return ray_gpu_ids()

FAST = sys.argv[2] == "fast"  # the default suite's variant: one preset, two trial actors
placed = {}
for preset in ("paper-physics",) if FAST else ("paper-physics", "pythia-70m-bib"):
    cfg = load_config(preset, overrides=["ray.address=null"])
    reqs = check_schedulable(cfg)
    res = _trial_resources(cfg)  # what Tune is asked for, per trial
    k = min(cfg.sweep.max_concurrent_trials, 2 if FAST else 4)
    trials = [Trial.options(num_cpus=res.get("cpu", 0), num_gpus=res.get("gpu", 0)).remote() for _ in range(k)]
    ids = ray.get([t.ids.remote() for t in trials], timeout=120)
    got = {"trials": ids}
    def gang(r):
        pg = ray.util.placement_group([r.unit] * r.gang)
        got[r.what] = bool(pg.wait(timeout_seconds=60))
        ray.util.remove_placement_group(pg)

    for r in reqs:  # Train workers at once, while the trials hold their own resources
        if r.gang > 1 and r.held:
            gang(r)
    for t in trials:
        ray.kill(t)
    for r in reqs:  # the embedding actors at once (before any trial runs)
        if r.gang > 1 and not r.held:
            gang(r)
    placed[preset] = got
out["placed"] = placed
t0 = time.perf_counter()
try:
    check_schedulable(load_config("paper-physics", overrides=["sweep.gpus_per_trial=5"]))
    out["refused"] = None
except ResourceError as e:
    out["refused"] = str(e)
out["refused_s"] = time.perf_counter() - t0
out["offer"] = cluster_offer().describe()

# GPU work off the driver: with GPUs in the cluster and none here, the LM is loaded in a GPU task only
from ssae_ray import pipeline

def no_lm_here(cfg):
    raise AssertionError("the driver loaded an LM")

pipeline._lm_here = pipeline._lm
pipeline._lm = no_lm_here
tiny = load_config("tiny", overrides=[f"workdir={sys.argv[1]}"])
out["offload"] = pipeline.offload(tiny)
out["with_lm"] = pipeline.with_lm(tiny, None, lambda lm: (ray_gpu_ids(), lm.d_model, str(lm.device)))
print("RESULT " + json.dumps(out))
"""


def _place(tmp_path: Path, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PLACE, str(tmp_path / "work"), mode], capture_output=True, text=True,
                          timeout=420, cwd=ROOT, env=_env(tmp_path))  # fmt: skip
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT ") :])
    assert out["driver_ids"] is None and out["driver_device"] == "cpu"
    gpu_ids, dev = out["gpu_task"]
    assert len(gpu_ids) == 1 and dev == "cpu"  # logical GPU: no CUDA here (pick_device tested above)
    assert out["cpu_task"] == [[], "cpu"]
    assert len(out["on_gpu_worker"][0]) == 1
    assert out["refused"] and "GPU: 5" in out["refused"] and out["refused_s"] < 1.0
    # the LM work ran in a task holding a GPU; the driver's _lm (which raises) was never called
    assert out["offload"] is True
    ids, d_model, device = out["with_lm"]
    assert len(ids) == 1 and d_model > 0 and device == "cpu"
    return out


@pytest.mark.ray
def test_logical_gpu_ray_places_gpu_requests_for_real(tmp_path):
    """The default suite's variant of the test below: Ray with 4 logical GPUs places a GPU task, a
    CPU task, the caching/evaluation worker, two paper-physics trials (distinct GPU ids) and its
    embedding-actor gang; a fifth GPU per trial is refused at once; the LM is loaded only in a GPU
    task."""
    phys = _place(tmp_path, "fast")["placed"]["paper-physics"]
    ids = [i[0] for i in phys["trials"]]
    assert len(ids) == 2 and all(len(i) == 1 for i in phys["trials"]) and len(set(ids)) == 2
    assert phys["embedding actors (retrieval.num_embed_actors)"] is True


@pytest.mark.slow  # ~80 s on the shared 2-core machine (a Ray start and six worker processes)
@pytest.mark.ray
def test_logical_gpu_ray_places_the_paper_presets_requests(tmp_path):
    """Ray with 4 logical GPUs: every request of the two presets gets placed within a timeout;
    a process holding a GPU id resolves cuda:0 on a GPU machine, cpu here; the driver holds none."""
    out = _place(tmp_path, "full")
    phys = out["placed"]["paper-physics"]
    assert len(phys["trials"]) == 4 and sorted(i[0] for i in phys["trials"]) == ["0", "1", "2", "3"]
    assert phys["embedding actors (retrieval.num_embed_actors)"] is True
    bib = out["placed"]["pythia-70m-bib"]
    assert bib["trials"] == [[]]  # the trial asks for no GPU: its Train workers hold them
    assert bib["Ray Train workers (train.num_workers=4)"] is True


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    env.pop("RAY_ADDRESS", None)
    return env


class _WordTokenizer:
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[hash(w) % 1000 for w in t.split()] for t in texts]}


def test_cache_plan_holds_what_trials_read(tiny_cfg):
    from ssae_ray.training.cache import cache_plan, train_tokens

    tiny_cfg = tiny_cfg.replace(model={"context_len": 128})
    texts = [" ".join(["word"] * 300) for _ in range(20)]  # 20 docs x 300 tokens, context 128
    tok = _WordTokenizer()
    have = train_tokens(tok, texts, tiny_cfg.model.context_len)
    assert have == 20 * (127 + 127 + 43)  # three contexts per doc, position 0 of each not trained on
    d_in = {h: 64 for h in tiny_cfg.sae.hooks}
    cfg = tiny_cfg.replace(
        train={"steps": 10, "batch_tokens": 256, "cache_margin": 0.1, "cache_dtype": "float16"}
    )
    plan = cache_plan(cfg, texts, tiny_cfg.sae.hooks, d_in, tok)
    assert plan.max_tokens == plan.n_tokens == 2816  # 10 x 256 x 1.1
    assert plan.bytes == 2816 * (64 * len(d_in) * 2 + 24) and not plan.cached
    assert sorted(plan.texts) == sorted(texts)
    # a selection smaller than that is cached whole, in its own order (the same cache key as before)
    small = cache_plan(cfg.replace(train={"steps": 1000}), texts, tiny_cfg.sae.hooks, d_in, tok)
    assert small.max_tokens is None and small.n_tokens == have and small.texts == texts


def test_offer_counts_the_launcher_config_on_the_head(monkeypatch):
    """A cluster scaled to its head (no GPU node up yet) whose autoscaler publishes no config: the
    launcher's bootstrap file on the head supplies the nodes it can still add."""
    import ray
    from ray._private import state

    from ssae_ray import resources

    head = {"Alive": True, "Resources": {"CPU": 0.0}}
    gpu = {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}
    monkeypatch.setattr(state.state, "get_cluster_config", lambda: None)
    monkeypatch.setattr(resources, "BOOTSTRAP", str(CLUSTERS[0]))
    monkeypatch.setattr(ray, "nodes", lambda: [head])
    offer = resources.cluster_offer()
    assert offer.total("GPU") == 4 and "autoscaler" in offer.source
    check_schedulable(load_config("paper-physics"), offer)
    monkeypatch.setattr(ray, "nodes", lambda: [head, gpu])  # one worker up: still 4 at most
    assert resources.cluster_offer().total("GPU") == 4
    monkeypatch.setattr(resources, "BOOTSTRAP", "/nonexistent/bootstrap.yaml")
    assert resources.cluster_offer().total("GPU") == 1  # alive nodes only
