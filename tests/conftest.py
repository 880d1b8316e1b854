"""Shared fixtures. Tests use the `tiny` preset, never the network."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# The local Hugging Face Hub (ssae_ray/testing/hub_server.py). huggingface_hub and datasets read
# HF_ENDPOINT when imported, so the server is bound here, before any test imports them; it serves
# nothing until a test asks for `local_hub`, and clients stay offline unless a test goes online
# (`hub_online`) or runs a subprocess with `environ_with_hub(local_hub.url, ...)`.
from ssae_ray.testing.hub_server import LocalHub  # noqa: E402 (standard library only)

_HUB = LocalHub(None).start()
os.environ["HF_ENDPOINT"] = _HUB.url
os.environ["HF_HUB_DISABLE_XET"] = "1"


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny steps: on a shared 2-core machine two OpenMP threads
    spin against each other (measured 100x slower under load). Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def auto_bf16(monkeypatch):
    """`precision=auto` resolves to bf16 in this test, emulated where the CPU has no native bf16
    (`SSAE_RAY_AUTO_PRECISION=bf16`): the bf16 paths run on every machine. Compare their results
    with `ssae_ray.testing.precision.assert_bf16_close`."""
    from ssae_ray import precision as prec

    monkeypatch.setenv(prec.AUTO_ENV, "bf16")
    assert prec.resolve("auto").bf16
    return prec.resolve("auto")


@pytest.fixture
def tiny_cfg(tmp_path):
    """The `tiny` preset with its work dir in a temp folder."""
    from ssae_ray.config import load_config

    return load_config("tiny", overrides=[f"workdir={tmp_path / 'work'}"])


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray head node (2 CPUs, small object store), shared by the session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=256 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray


@pytest.fixture(scope="session")
def mlflow_root(tmp_path_factory):
    """The session MLflow server's folder (its SQLite store is `mlflow.db` there)."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="session")
def mlflow_server(mlflow_root):
    """A real MLflow tracking server (SQLite backend, 127.0.0.1, a free port, one worker), shared
    by the session; yields its URL."""
    from ssae_ray import tracking

    url, proc = tracking.start_mlflow_server(mlflow_root, port=tracking.free_port())
    yield url
    tracking.stop_server(proc)


@pytest.fixture
def tiny_trial(tiny_cfg, mlflow_server, tmp_path):
    """What `sweep.run_trial` takes, on the tiny preset, in this process (no Tune): `(cfg, ctx, val)`
    with random GSAEs saved to disk, an activation cache of generated text, a validation set and a
    fresh MLflow experiment on the session's server. `cfg` trains 4 steps of 64 tokens, scored and
    checkpointed every 2, in fp32 (runs are compared exactly)."""
    import random

    from ssae_ray import tracking
    from ssae_ray.eval.evaluate import prepare_test_set
    from ssae_ray.models import load_lm
    from ssae_ray.saes import load_gsaes, save_sae
    from ssae_ray.training.cache import cache_activations

    cfg = tiny_cfg.replace(train={"steps": 4, "checkpoint_every": 2, "batch_tokens": 64, "precision": "fp32"},
                           model={"precision": "fp32"})  # fmt: skip
    hooks = list(cfg.sae.hooks)
    lm = load_lm(cfg.model, tmp_path / "models")
    for h, s in load_gsaes(cfg, lm).items():
        save_sae(s, tmp_path / "gsae" / h)
    words = "the quantum field electron photon river city bread fish".split()
    rnd = random.Random(0)
    texts = [" ".join(rnd.choice(words) for _ in range(40)) for _ in range(14)]
    cache = cache_activations(cfg, lm, texts[:10], hooks, progress=False)
    val = prepare_test_set(lm, "val", texts[10:], hooks, cfg.model.context_len, 128)
    _, exp = tracking.open_experiment(mlflow_server, tracking.experiment_name(cfg) + f"-{tmp_path.name}")
    ctx = {"uri": mlflow_server, "exp_id": exp, "parent": None, "gsae_dir": str(tmp_path / "gsae"),
           "caches": {"dense": str(cache)}, "lm_cache": str(tmp_path / "models")}  # fmt: skip
    return cfg, ctx, val


@pytest.fixture(scope="session")
def local_hub():
    """The local Hub serving the fixture repos (tiny models, SAEs and datasets under their real ids;
    see `ssae_ray.testing.hub_fixtures.FIXTURES`). Each repo is built on its first request into
    `~/.cache/ssae-ray/local-hub` and kept there. Its URL is `HF_ENDPOINT` for the whole session."""
    from ssae_ray.testing.hub_fixtures import build_repo, default_root

    return _HUB.set_root(default_root(), builder=build_repo)


@pytest.fixture
def hub_online(local_hub, monkeypatch, tmp_path):
    """This test's Hugging Face clients online against `local_hub`, without a token, with a fresh
    cache in `tmp_path / "hf"`; the environment too (subprocesses, Ray workers started after).
    `local_hub.requests` starts empty."""
    from ssae_ray.testing.hub_server import go_online

    go_online(monkeypatch, local_hub.url, tmp_path / "hf")
    local_hub.clear_log()
    return local_hub


def pytest_collection_modifyitems(config, items):
    """Tests that start their own Ray head (`own_ray_cluster`) run last: a head's job agent does
    not come up beside a second local Ray instance, so they stop the session's Ray first."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray_cluster") is not None)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real multi-node Ray cluster on this machine (`ssae_ray.testing.cluster.LocalCluster`): a
    head at CPU 0 and two 1-GPU (logical) workers, each in its own mount + PID namespace with its own
    `/tmp` and `~/.cache`; `cluster.shared` is bind-mounted into every node at the same path (as EFS
    would be). Mark tests that use it `own_ray_cluster` (they run last; the session's Ray stops)."""
    import ray

    from ssae_ray.testing.cluster import LocalCluster, missing

    if missing():
        pytest.skip(missing())
    if ray.is_initialized():
        ray.shutdown()
    cluster = LocalCluster(tmp_path_factory.mktemp("shared"), workers=2, env={"HF_ENDPOINT": _HUB.url})
    with cluster:
        yield cluster


@pytest.fixture(autouse=True)
def _mlflow_process_state_restored():
    """Every test leaves `MLFLOW_TRACKING_URI` and MLflow's fluent tracking URI / active experiment
    as it found them: `mlflow.set_tracking_uri` exports the variable, and a test cluster or Ray head
    started by a later test would hand it to every node (the second cold `make test-all` lost the
    multi-node tests' MLflow server that way)."""
    from ssae_ray.tracking import mlflow_state_kept

    with mlflow_state_kept():
        yield
