"""`ray job submit` of jobs/physics.py on a real local head node; a rerun reuses every stage."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssae_ray.config import load_config
from ssae_ray.testing.results import check_physics_run

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import ray

    if ray.is_initialized():  # the session's Ray would keep this head's job agent from starting
        ray.shutdown()
    tmp = tmp_path_factory.mktemp("rayhead")
    # the head, its job agent and the job's `python` come from this interpreter's environment
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PATH": path}
    gcs, dash = _port(), _port()
    start = subprocess.run(
        [RAY, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={tmp}",
         "--object-store-memory=300000000", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stderr[-2000:]
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 60
    while time.time() < deadline:
        ok = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True)
        if ok.returncode == 0:
            break
        time.sleep(2)
    yield url, env
    # Stop only this head (its processes carry its temp dir), not the session's own Ray.
    subprocess.run(["pkill", "-TERM", "-f", str(tmp)], capture_output=True)
    time.sleep(3)
    subprocess.run(["pkill", "-KILL", "-f", str(tmp)], capture_output=True)


# The tiny preset with an LM trained for 300 steps (so zero-ablating a hook costs nats), GSAEs
# pretrained on its activations (they explain most of the variance), and a λ grid whose two SSAEs
# both explain some variance and bracket the matched L0: results a correct run must show.
OVERRIDES = [
    "model.tiny_train_steps=300",
    "sae.source=pretrain",
    "sweep.lams=[0.3,3.0]",
    "sweep.l0_range=[15.0,35.0]",
]


def _submit(url, env, workdir, *command):
    """`ray job submit` of `jobs/physics.py` (or `ssae-ray <command>`) on the tiny preset."""
    command = command or ("jobs/physics.py",)
    cmd = (
        [sys.executable, *command]
        if command[0].endswith(".py")
        else [sys.executable, "-m", "ssae_ray.cli", *command]
    )
    for _ in range(30):  # a fresh head answers "No available agent" until its job agent is up
        out = subprocess.run(
            [RAY, "job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
             *cmd, "--preset", "tiny", f"workdir={workdir}", *OVERRIDES],
            env=env, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        if "No available agent" not in out.stdout + out.stderr:
            return out
        time.sleep(2)
    return out


@pytest.fixture(scope="module")
def first_run(head, tmp_path_factory):
    """The first `ray job submit` of the tiny physics job into a fresh work dir (shared by the tests
    below, in order: the cached rerun, then the forced reruns)."""
    url, env = head
    work = tmp_path_factory.mktemp("physics") / "work"
    first = _submit(url, env, work)
    return work, first.returncode, first.stdout + first.stderr


@pytest.mark.ray
@pytest.mark.own_ray_cluster
def test_ray_job_submit_physics_tiny_rerun_is_cached_and_eval_force_reevaluates(head, first_run):
    url, env = head
    work, rc, out = first_run
    assert rc == 0, out[-4000:]
    assert "succeeded" in out
    (sweep_dir,) = list((work / "sweep").iterdir())
    report = sweep_dir / "eval" / "report.md"
    cfg = load_config("tiny", overrides=[f"workdir={work}", *OVERRIDES])
    check_physics_run(sweep_dir, cfg)  # CE order, L0s, CIs, report = headline.csv, dashboard, MLflow
    # The planted domain: dense retrieval from the physics seed selects physics passages at several
    # times their share of the corpus; a random selection at about their share.
    sel = [json.loads(p.read_text()) for p in work.glob("selection/*/manifest.json")]
    sel = {m["strategy"]: m for m in sel}
    assert sel["dense"]["precision"] >= 3 * sel["dense"]["base_rate"], sel["dense"]
    assert sel["random"]["precision"] <= 2 * sel["random"]["base_rate"], sel["random"]
    _imports_into_neuronpedia(sweep_dir / "dashboard" / "neuronpedia")

    second = _submit(url, env, work)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-4000:]
    timings = json.loads((report.parent / "timings.json").read_text())["rows"]
    by_stage = {r["stage"]: r for r in timings}
    for stage in ("corpus", "gsaes", "retrieve+cache"):
        assert by_stage[stage]["cached"], (stage, timings)
    assert "evaluation cached" in out2 and "dashboard cached" in out2
    # nothing was trained or built again
    assert "building" not in out2.split("== stage load LM")[-1], out2[-3000:]

    # `eval --force` re-evaluates (a new report) and retrains nothing: the trials' files are untouched.
    done = sorted(sweep_dir.glob("trials/*/done.json"))
    assert len(done) == 4
    before = {p: p.stat().st_mtime_ns for p in done}
    report_t = report.stat().st_mtime_ns
    upstream = _upstream_stamps(work)
    assert len(upstream) >= 6, upstream  # corpus, GSAEs, index, two selections, two caches
    third = _submit(url, env, work, "eval", "--force")
    out3 = third.stdout + third.stderr
    assert third.returncode == 0, out3[-4000:]
    assert "evaluation cached" not in out3 and report.stat().st_mtime_ns > report_t
    assert {p: p.stat().st_mtime_ns for p in done} == before


@pytest.mark.ray
@pytest.mark.own_ray_cluster
@pytest.mark.slow  # retrains every trial (~45 s quiet): the default suite runs `eval --force` (above)
def test_physics_force_retrains_every_trial_and_reuses_the_stages_upstream(head, first_run):
    url, env = head
    work, rc, out = first_run
    assert rc == 0, out[-4000:]
    (sweep_dir,) = list((work / "sweep").iterdir())
    report = sweep_dir / "eval" / "report.md"
    cfg = load_config("tiny", overrides=[f"workdir={work}", *OVERRIDES])
    done = sorted(sweep_dir.glob("trials/*/done.json"))
    assert len(done) == 4
    before = {p: p.stat().st_mtime_ns for p in done}
    upstream = _upstream_stamps(work)
    assert len(upstream) >= 6, upstream
    # `physics --force` retrains every trial and re-evaluates; the stages upstream are reused.
    report_t = report.stat().st_mtime_ns
    fourth = _submit(url, env, work, "jobs/physics.py", "--force")
    out4 = fourth.stdout + fourth.stderr
    assert fourth.returncode == 0, out4[-4000:]
    assert all(p.stat().st_mtime_ns > before[p] for p in done), out4[-3000:]
    assert report.stat().st_mtime_ns > report_t and not list((work / "sweep").glob("*.replaced"))
    rows = {r["stage"]: r["cached"] for r in json.loads((report.parent / "timings.json").read_text())["rows"]}
    assert rows["corpus"] and rows["gsaes"] and rows["retrieve+cache"] and not rows["sweep"], rows
    assert _upstream_stamps(work) == upstream
    check_physics_run(sweep_dir, cfg)


def _upstream_stamps(workdir: Path) -> dict[Path, int]:
    """Modification times of every manifest of the stages a forced sweep or eval must reuse."""
    kinds = ("corpus", "gsae_pretrain", "index", "selection", "activations")
    return {p: p.stat().st_mtime_ns for k in kinds for p in (workdir / k).glob("*/manifest.json")}


def _imports_into_neuronpedia(export):
    """The sweep's Neuronpedia export (GSAE and one SSAE per strategy) imports as Neuronpedia's importer
    imports it, into its schema on PostgreSQL (the details: tests/test_dashboard.py)."""
    from ssae_ray.dashboard.export import read_export
    from ssae_ray.testing import postgres
    from ssae_ray.testing.neuronpedia import counts, fresh_database, import_source

    if postgres.missing():  # the rest of the job test still runs; test_dashboard.py skips with the reason
        return
    sources = sorted(export.glob("*/*"))
    with postgres.PostgresServer() as server, fresh_database(server, "sweep") as conn:
        for s in sources:
            import_source(conn, s)
        got = counts(conn)
    assert (got["Source"], got["Neuron"], got["Activation"]) == (
        3,
        *(sum(len(read_export(s)[i]) for s in sources) for i in (0, 1)),
    )
