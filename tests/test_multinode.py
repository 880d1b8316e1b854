"""Several Ray nodes on this machine (`ssae_ray.testing.cluster.LocalCluster`, the `ray_cluster`
fixture): each worker has its own disk, one folder is shared as EFS would be, the head only drives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssae_ray.multinode import MARKER
from ssae_ray.testing.cluster import ClusterError, LocalCluster, _cmdline, _mounts, _procs_in, missing

pytestmark = [
    pytest.mark.ray,
    pytest.mark.own_ray_cluster,
    pytest.mark.skipif(bool(missing()), reason=str(missing())),
]

ROOT = Path(__file__).resolve().parents[1]


def test_nodes_have_their_own_disk_and_see_the_shared_folder(ray_cluster, tmp_path):
    c = ray_cluster
    assert len(c.workers) == 2 and all(n.node_id for n in c.nodes)
    # the head offers no CPU and no GPU; each worker one logical GPU
    from ray.util.state import list_nodes

    nodes = {n.node_id: n for n in list_nodes(address=c.dashboard, detail=True)}
    head = nodes[c.head.node_id]
    assert head.resources_total.get("CPU", 0) == 0 and head.resources_total.get("GPU", 0) == 0
    for w in c.workers:
        assert nodes[w.node_id].resources_total["GPU"] == 1 and nodes[w.node_id].state == "ALIVE"
    # what the head (and this process) writes to /tmp, a worker does not see; the shared folder
    # every node sees, with what any node wrote there
    local = tmp_path / "head-only.txt"
    local.write_text("head")
    (c.shared / "from-head.txt").write_text("head wrote this\n")
    for w in c.workers:
        mine = f"/tmp/only-on-{w.name}"
        r = c.run_on(w, ["sh", "-c", f"echo {w.name} > {mine}; echo {w.name} > {c.shared}/{w.name}.txt; "
                         f"cat {c.shared}/from-head.txt; test -e {local} && echo SEEN || echo MISSING"],
                     timeout=30)  # fmt: skip
        assert r.stdout.split() == ["head", "wrote", "this", "MISSING"], (r.stdout, r.stderr)
        assert not Path(mine).exists()  # its /tmp is its own
        assert (c.shared / f"{w.name}.txt").read_text().strip() == w.name
    other = c.run_on(c.workers[1], ["sh", "-c", f"test -e /tmp/only-on-{c.workers[0].name} && echo SEEN || echo MISSING"],
                     timeout=30)  # fmt: skip
    assert other.stdout.strip() == "MISSING"


@pytest.mark.slow  # a second cluster: ~30 s (the session fixture's own stop() checks the same)
def test_tear_down_leaves_no_process_and_no_mount(tmp_path):
    """A second, small cluster (one worker): started and stopped; nothing of it outlives stop()."""
    before = _mounts()
    t0 = time.perf_counter()
    c = LocalCluster(tmp_path / "shared", workers=1, worker_cpus=1).start()
    started = time.perf_counter() - t0
    namespaces = [n.ns for n in c.nodes]
    pids = [p for n in c.nodes for p in n.pids()]
    assert len(pids) >= 6 and all(namespaces)  # gcs, raylets, dashboard, agents...
    assert any("raylet" in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace") for p in pids)
    c.stop()
    assert _mounts() == before
    live = [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not live, live
    leftover = subprocess.run(["pgrep", "-f", str(c.base)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
    print(f"one-worker cluster up in {started:.1f} s ({c.timings})")

    # The process that started a cluster SIGKILLed (a test killed by its timeout): its nodes die too.
    code = (f"import sys, time; from ssae_ray.testing.cluster import LocalCluster\n"
            f"c = LocalCluster({str(tmp_path / 'shared2')!r}, workers=1, worker_cpus=1).start()\n"
            f"print(' '.join(n.ns for n in c.nodes), flush=True); time.sleep(600)")  # fmt: skip
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    namespaces = owner.stdout.readline().split()
    assert len(namespaces) == 2, namespaces
    assert all(_procs_in(ns) for ns in namespaces)
    owner.kill()
    owner.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_procs_in(ns) for ns in namespaces):
        time.sleep(0.2)
    assert not any(_procs_in(ns) for ns in namespaces)
    assert _mounts() == before


def test_cluster_refuses_to_start_without_root(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ClusterError, match="root"):
        LocalCluster(tmp_path / "s")


def test_a_work_dir_on_the_heads_own_disk_is_refused_at_once(ray_cluster, tmp_path):
    """`ray job submit -- python jobs/physics.py` with the work dir on the head's /tmp (each worker
    has its own): the preflight stops the job before any stage with one line naming the worker
    node and the path, exit 2, in well under 30 s."""
    work = tmp_path / "node-local-work"
    t0 = time.perf_counter()
    _, status, logs = ray_cluster.submit(
        f"python jobs/physics.py --preset tiny workdir={work}", working_dir=ROOT, timeout=120
    )
    secs = time.perf_counter() - t0
    assert status == "FAILED", logs[-3000:]
    lines = [x for x in logs.splitlines() if x.startswith("ssae-ray physics: error:")]
    assert len(lines) == 1, logs[-3000:]
    line = lines[0]
    named = [f"worker node {w.ip} (id {w.node_id[:12]})" for w in ray_cluster.workers]
    assert any(x in line for x in named), (line, named)
    assert str(work) in line and "EFS" in line and "workdir=" in line, line
    assert "Traceback" not in logs
    assert not (work / "corpus").exists()  # refused before any work
    print(f"refused in {secs:.1f} s (job submit to FAILED)")
    assert secs < 30


@pytest.mark.slow  # one more node: ~40 s on the shared machine
def test_a_node_without_the_shared_mount_is_named(ray_cluster):
    """Two workers mount the shared folder; a third joins without it (a misconfigured node): the
    preflight names that node, and only it, with the work dir's path."""
    c = ray_cluster
    bad = c.add_worker("worker3", shared=False)
    try:
        work = c.shared / "needs-every-node"
        _, status, logs = c.submit(f"python jobs/physics.py --preset tiny workdir={work}", working_dir=ROOT,
                                   timeout=120)  # fmt: skip
        assert status == "FAILED", logs[-3000:]
        (line,) = [x for x in logs.splitlines() if x.startswith("ssae-ray physics: error:")]
        assert bad.node_id[:12] in line and str(work) in line, line
        assert not any(w.node_id[:12] in line for w in c.workers if w is not bad)

        # A node that joins after the preflight passed (the autoscaler adds it mid-run): the first
        # task of the job it runs (`multinode.check_here`, called by every trial and GPU task) stops
        # there, naming that node; the same task on a node that mounts the share goes on.
        late = c.shared / "preflighted"
        late.mkdir()
        (late / MARKER).write_text("checked")  # what the preflight leaves in a work dir every node saw
        script = c.shared / "late_joiner.py"
        script.write_text(LATE_JOINER)
        _, status, logs = c.submit(f"python {script} {late} {bad.name} {c.workers[0].name}", working_dir=ROOT,
                                   timeout=120)  # fmt: skip
        assert status == "SUCCEEDED", logs[-3000:]
        (got,) = [x for x in logs.splitlines() if x.startswith("late: ")]
        assert f"worker node {bad.ip} (id {bad.node_id[:12]}) does not see the work dir {late}" in got, got
        assert "EFS" in got, got
        assert f"good: {c.workers[0].name} ok" in logs, logs[-3000:]
    finally:
        c.remove(bad)


@pytest.mark.slow  # one more node, and the seconds Ray takes to notice it is gone
def test_a_node_lost_during_the_preflight_is_skipped_not_a_traceback(ray_cluster):
    """A worker SIGKILLed just before a job starts (the autoscaler removed it, or it crashed) is still
    listed alive for some seconds; the preflight's task for it becomes unschedulable. The job goes on
    with the nodes that are there (the first `make test-all` failed here with a TaskUnschedulableError
    traceback, when the next test's job started right after a node was removed)."""
    c = ray_cluster
    ghost = c.add_worker("ghost")
    c.remove(ghost, wait_dead=False)
    script = c.shared / "preflight_only.py"
    script.write_text(PREFLIGHT_ONLY)
    _, status, logs = c.submit(f"python {script} {c.shared / 'after-ghost'}", working_dir=ROOT, timeout=240)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    assert "checked nodes: 3" in logs, logs[-3000:]  # the head and the two workers
    if ghost.node_id[:12] in logs:  # listed alive when the job started: skipped with a warning
        assert "left the cluster during the work-dir check" in logs, logs[-3000:]


PREFLIGHT_ONLY = """
import sys
from ssae_ray import multinode
from ssae_ray.config import load_config
from ssae_ray.runtime import setup_logging

setup_logging()
cfg = multinode.prepare(load_config("tiny", overrides=[f"workdir={sys.argv[1]}"]))
print("checked nodes:", len(multinode.check_nodes(cfg.root)))
"""


LATE_JOINER = """
import sys
import ray
from ssae_ray.testing.cluster import NODE_RESOURCE

root, bad, good = sys.argv[1:4]
ray.init()


@ray.remote(num_cpus=0, max_retries=0)
def task(root):
    from ssae_ray import multinode

    multinode.check_here(root)
    return "ok"


try:
    ray.get(task.options(resources={NODE_RESOURCE + bad: 1}).remote(root))
    print("late: no error")
except ray.exceptions.RayTaskError as e:
    print("late: " + str(e.cause if hasattr(e, "cause") else e).splitlines()[0])
print("good: " + good + " " + ray.get(task.options(resources={NODE_RESOURCE + good: 1}).remote(root)))
"""


# The tiny preset shaped for the cluster: one trial per 1-GPU worker at a time.
CLUSTER = ["sweep.gpus_per_trial=1", "sweep.cpus_per_trial=1", "sweep.max_concurrent_trials=2"]
RAY_INTERNAL = ("JobSupervisor", "_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker",
                "AutoscalingRequester", "SplitCoordinator")  # fmt: skip
"""Ray's own bookkeeping actors (the job supervisor; Ray Data's stats, autoscaling and locality
actors), pinned by Ray to the driver's node and holding no CPU or GPU; they and their method calls
are the only things allowed on the head."""


PREFLIGHT = "shared-workdir-check"  # the preflight's zero-CPU task, on every alive node by design


def _placement(cluster, out: Path | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(tasks, actors) of the cluster's jobs as (name, node name) from Ray's state API, Ray's own
    bookkeeping (`RAY_INTERNAL`) left out once checked to hold no CPU or GPU; the whole listing is
    written to `out`."""
    from ray.util.state import list_actors, list_tasks

    tasks = list_tasks(address=cluster.dashboard, detail=True, limit=10000, raise_on_missing_output=False)
    actors = list_actors(address=cluster.dashboard, detail=True, limit=10000, raise_on_missing_output=False)
    if out is not None:
        rows = [("task", x.name, cluster.node_name(x.node_id or "")) for x in tasks]
        rows += [
            ("actor", x.class_name, cluster.node_name(x.node_id or ""), x.required_resources) for x in actors
        ]
        out.write_text("\n".join(map(str, rows)))
    internal = [x for x in actors if x.class_name.startswith(RAY_INTERNAL)]
    assert all(not (x.required_resources or {}).get("CPU") and not (x.required_resources or {}).get("GPU")
               for x in internal), [(x.class_name, x.required_resources) for x in internal]  # fmt: skip
    t = [(x.name, cluster.node_name(x.node_id)) for x in tasks
         if x.type != "DRIVER_TASK" and not x.name.split(".")[0].startswith(RAY_INTERNAL)
         and x.node_id]  # fmt: skip
    a = [(x.class_name, cluster.node_name(x.node_id)) for x in actors
         if not x.class_name.startswith(RAY_INTERNAL) and x.node_id]  # fmt: skip
    return t, a


@pytest.mark.slow  # ~4 min quiet, ~15 min on the shared 2-core machine under load
@pytest.mark.timeout(3600)
def test_physics_job_on_two_gpu_workers_head_only_drives(ray_cluster):
    """`ray job submit --working-dir . -- python jobs/physics.py --preset tiny` on the cluster,
    work dir on the shared folder: it runs end to end; Ray's state API shows every task and actor on
    the workers, none on the head; the driver (on the head) never creates a parameter or opens a
    weight file; the head's MLflow server holds one sweep parent and one child per trial."""
    from ssae_ray.config import load_config
    from ssae_ray.sweep import grid
    from ssae_ray.testing.results import check_mlflow

    c = ray_cluster
    work = c.shared / "tiny-mn"
    audit = c.shared / "driver-audit.json"
    site = "ssae_ray/testing/audit_site"
    t0 = time.perf_counter()
    _, status, logs = c.submit(
        f"env PYTHONPATH=$PWD/{site}:$PWD SSAE_RAY_DRIVER_AUDIT={audit} "
        f"python jobs/physics.py --preset tiny workdir={work} {' '.join(CLUSTER)}",
        working_dir=ROOT, timeout=2400,
    )  # fmt: skip
    secs = time.perf_counter() - t0
    (c.shared / "job.log").write_text(logs)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "is shared: seen by 3 nodes" in logs
    rep = json.loads(audit.read_text())
    assert rep["argv"][0].endswith("physics.py")
    assert rep["parameters"] == 0 and rep["loader_calls"] == [] and rep["weight_files_opened"] == [], rep
    # MLflow: the head's server (its store on the shared folder), one parent, a child per trial
    cfg = load_config("tiny", overrides=[f"workdir={work}", *CLUSTER])
    (sweep_dir,) = (work / "sweep").iterdir()
    rec = json.loads((sweep_dir / "mlflow_parent_run.json").read_text())
    server = json.loads((work / "mlflow" / "server.json").read_text())
    assert rec["tracking_uri"] == server["url"] and server["url"].startswith("http://")
    _, children = check_mlflow(sweep_dir, len(grid(cfg)))
    assert (sweep_dir / "eval" / "report.md").is_file()
    dbs = sorted(p for p in work.rglob("mlflow.db"))  # (other tests' work dirs have their own)
    assert dbs == [work / "mlflow" / "mlflow.db"], dbs  # no node wrote a store of its own
    # the head only drove
    tasks, actors = _placement(c, c.shared / "placement.txt")
    workers = {w.name for w in c.workers}
    assert tasks and actors, (tasks, actors)
    # The preflight's zero-CPU check runs on every alive node by design, the head included (it proves
    # each node sees the work dir; the listing also holds earlier tests' checks on nodes since
    # removed); every other task and actor ran on the workers.
    on_head = sorted({x for x in tasks + actors if x[1] not in workers and x[0] != PREFLIGHT})
    assert not on_head, on_head
    assert (PREFLIGHT, "head") in tasks
    assert {n for t, n in tasks if t != PREFLIGHT} == workers  # the work went to both workers
    rows = json.loads((sweep_dir / "eval" / "timings.json").read_text())["rows"]
    phases = {"physics job": secs}

    # `ssae-ray dashboard`, the TERM job and the SHIFT job on the same cluster: the driver stays free of models too
    term = ["sae.hooks=[blocks.1.hook_resid_post]", "sae.d_sae=32", "sae.source=pretrain",
            "train.pretrain_steps=40", "train.pretrain_tokens=4000", "train.batch_tokens=64",
            "sweep.tilts=[0,1.0e9]", "sweep.match_l0=8", "train.l0_band=[7.5,8.5]", "eval.test_tokens=500",
            "eval.bootstrap=50"]  # fmt: skip
    shift = ["sae.hooks=[blocks.1.hook_resid_post]", "train.steps=4", "train.decay_steps=2", "corpus.n_docs=100",
             "shift.n_train=32", "shift.n_dev=16", "shift.n_test=32", "shift.skyline_grid=[1,2]",
             "shift.max_edge_nodes=2"]  # fmt: skip
    for name, cmd in [
        ("dashboard", f"-m ssae_ray.cli dashboard --force --preset tiny workdir={work} {' '.join(CLUSTER)}"),
        ("term job", f"jobs/tinystories_term.py --preset tiny workdir={c.shared / 'term'} {' '.join(term)}"),
        ("shift job", f"jobs/bias_in_bios.py --preset tiny workdir={c.shared / 'shift'} {' '.join(shift)}"),
    ]:
        audit.unlink()
        t0 = time.perf_counter()
        _, status, logs = c.submit(
            f"env PYTHONPATH=$PWD/{site}:$PWD SSAE_RAY_DRIVER_AUDIT={audit} python {cmd}",
            working_dir=ROOT, timeout=2400,
        )  # fmt: skip
        phases[name] = time.perf_counter() - t0
        assert status == "SUCCEEDED", (name, logs[-5000:])
        rep = json.loads(audit.read_text())
        assert rep["parameters"] == 0 and rep["loader_calls"] == [] and rep["weight_files_opened"] == [], (
            name,
            rep,
        )
        tasks, actors = _placement(c)
        assert not [x for x in tasks + actors if x[1] not in workers and x[0] != PREFLIGHT], name
    assert (sweep_dir / "dashboard" / "index.html").is_file()
    assert list((c.shared / "term").glob("term/*/report.md"))
    (shift_out,) = (c.shared / "shift" / "shift").glob(
        "*/result.json"
    )  # SHIFT's Table 1, on the shared folder
    assert json.loads(shift_out.read_text())["sae_sets"]["n_passages"] > 0
    print(f"phases (s): { ({k: round(v) for k, v in phases.items()}) }, cluster start: {c.timings}")
    print(f"physics job on the cluster: {secs:.0f} s; stages: {[(r['stage'], r['seconds']) for r in rows]}")


STEPS, EVERY = 300, 50
SWEEP = r"""
import random, sys
from pathlib import Path
from ssae_ray import multinode, sweep
from ssae_ray.config import load_config
from ssae_ray.eval.evaluate import prepare_test_set
from ssae_ray.models import load_lm
from ssae_ray.runtime import setup_logging
from ssae_ray.saes import load_gsaes, save_sae
from ssae_ray.training.cache import cache_activations

setup_logging()
work, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config("tiny", overrides=[f"workdir={work}", "train.steps=STEPS", "train.checkpoint_every=EVERY",
                                     "train.batch_tokens=64", "train.lr=0.01", "train.decay_steps=50",
                                     "sweep.lams=[0.5,5.0]", "sweep.strategies=[dense]", "train.max_failures=3",
                                     "sweep.max_concurrent_trials=2", "sweep.gpus_per_trial=1",
                                     "model.precision=fp32", "train.precision=fp32"])
cfg = multinode.prepare(cfg)
lm = load_lm(cfg.model, work / "models")
if not (work / "gsae").is_dir():
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


@pytest.mark.slow  # its own cluster and two sweeps: ~5 min on the shared 2-core machine
@pytest.mark.timeout(1800)
def test_a_lost_worker_node_its_trial_resumes_on_the_other_from_its_checkpoint(tmp_path):
    """Two trials, one per 1-GPU worker; once both checkpointed, worker1's raylet is SIGKILLed (Ray
    loses the node and its trial actor). Tune restarts that trial on worker2, which resumes it from
    its checkpoint on the shared storage (its first step is the checkpoint's step), continues its
    MLflow child run, and ends with the SAEs of an uninterrupted run of the same sweep."""
    from mlflow.tracking import MlflowClient
    from sae_lens import SAE

    shared = tmp_path / "efs"
    with LocalCluster(shared, workers=2, worker_cpus=1) as c:
        script = shared / "sweep.py"
        script.write_text(SWEEP)
        work = shared / "work"
        t0 = time.perf_counter()
        _, status, logs = c.submit(f"python {script} {work} {shared / 'ref'}", working_dir=ROOT, timeout=1500)
        ref_secs = time.perf_counter() - t0
        assert status == "SUCCEEDED", logs[-5000:]

        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(c.dashboard)
        out = shared / "sweep"
        job = client.submit_job(entrypoint=f"python {script} {work} {out}",
                                runtime_env={"working_dir": str(ROOT), "excludes": [".venv", ".git"]})  # fmt: skip
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            prog = list(out.glob("trials/*/state/progress.json"))
            if len(prog) == 2:
                break
            assert str(client.get_job_status(job).value) in ("PENDING", "RUNNING"), client.get_job_logs(job)[
                -4000:
            ]
            time.sleep(0.2)
        t_kill = time.perf_counter()
        c.kill_raylet(c.workers[0])
        # its workers (the trial among them) exit once their raylet is gone; then its checkpoint is final
        while (
            any(_cmdline(p).startswith("ray::") for p in c.workers[0].pids()) and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        at_kill = {
            p.parents[1].name: json.loads(p.read_text())["step"]
            for p in out.glob("trials/*/state/progress.json")
        }
        while str(client.get_job_status(job).value) in ("PENDING", "RUNNING") and time.monotonic() < deadline:
            time.sleep(1)
        logs = client.get_job_logs(job)
        after_kill = time.perf_counter() - t_kill
        assert str(client.get_job_status(job).value) == "SUCCEEDED", logs[-6000:]

        resumed = []
        server = json.loads((work / "mlflow" / "server.json").read_text())["url"]
        mc = MlflowClient(server)
        parent = json.loads((out / "mlflow_parent_run.json").read_text())["run_id"]
        for tdir in sorted((out / "trials").iterdir()):
            done = json.loads((tdir / "done.json").read_text())
            attempts = done["attempts"]
            if len(attempts) > 1:  # the trial on the lost node: its next attempt starts at its checkpoint
                resumed.append(tdir.name)
                assert attempts[-1] == {"start": at_kill[tdir.name], "end": STEPS}, (attempts, at_kill)
                assert 0 < at_kill[tdir.name] < STEPS and at_kill[tdir.name] % EVERY == 0
            assert [ck["step"] for ck in done["checkpoints"]] == list(range(EVERY, STEPS + 1, EVERY))
            ref = json.loads((shared / "ref" / "trials" / tdir.name / "done.json").read_text())
            best = min(done["checkpoints"], key=lambda ck: ck["val"]["val_ce"])["step"]
            assert best == min(ref["checkpoints"], key=lambda ck: ck["val"]["val_ce"])["step"]
            for h in (tdir / "best").iterdir():  # the SAEs of the uninterrupted run (test_preemption's bound)
                a, b = (
                    SAE.load_from_disk(h),
                    SAE.load_from_disk(shared / "ref" / "trials" / tdir.name / "best" / h.name),
                )
                for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                    assert (getattr(a, name) - getattr(b, name)).abs().max() <= 1e-5, (
                        tdir.name,
                        h.name,
                        name,
                    )
            # its MLflow child run continued on the head's server: one run, finished, every step logged
            run = mc.get_run(done["run_id"])
            assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
            assert {m.step for m in mc.get_metric_history(done["run_id"], "train/loss")} == set(range(STEPS))
            if tdir.name in resumed:
                assert run.data.tags.get("ssae.resumed") == "true"
                assert json.loads((tdir / "run.json").read_text())["run_id"] == done["run_id"]
        assert len(resumed) == 1, resumed
    print(
        f"lost node: reference sweep {ref_secs:.0f} s; after the kill the sweep ended in {after_kill:.0f} s; "
        f"at the kill: {at_kill}"
    )
