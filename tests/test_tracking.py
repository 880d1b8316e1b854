"""MLflow tracking: a real local server (SQLite, 127.0.0.1, free port), parent/child runs with
params (never an API key), per-step metrics and artifacts; unreachable URIs fail fast."""

from __future__ import annotations

import socket

import pytest

from ssae_ray import tracking


def test_server_parent_and_child_runs_with_artifacts(mlflow_server, tmp_path):
    assert mlflow_server.startswith("http://127.0.0.1:")
    client, exp = tracking.open_experiment(mlflow_server, "test-tracking")
    parent = tracking.start_run(client, exp, "sweep", {"sweep.lams": (1.0, 2.0)})
    child = tracking.start_run(
        client,
        exp,
        "trial-0",
        {"lam": 1.0, "autointerp.api_key": "sk-ant-secret", "token": "sk-ant-x"},
        parent,
    )
    for step in range(3):
        tracking.log_metrics(client, child, {"train/loss": 1.0 / (step + 1), "nan": float("nan")}, step)
    f = tmp_path / "table.csv"
    f.write_text("a,b\n1,2\n")
    client.log_artifact(child, str(f), "tables")
    tracking.end_run(client, child)
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params == {"lam": "1.0"}  # the key and the key-like value were dropped
    assert [m.value for m in client.get_metric_history(child, "train/loss")] == pytest.approx([1, 0.5, 1 / 3])
    assert "nan" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(child, "tables")] == ["tables/table.csv"]
    assert run.info.status == "FINISHED"


def test_unreachable_uri_is_a_clear_error_fast():
    port = tracking.free_port()
    with pytest.raises(tracking.TrackingError, match=rf"cannot reach .*127.0.0.1:{port}.*ssae-ray mlflow"):
        tracking.check_tracking(f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(tracking.TrackingError, match="unsupported tracking URI"):
        tracking.check_tracking("ftp://example/x")


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(tracking.TrackingError, match="already in use"):
            tracking.start_mlflow_server(tmp_path, port=port)


def test_tracking_uri_precedence_and_local_default(tiny_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri(tiny_cfg)
    assert uri.startswith("sqlite:///") and uri.endswith("mlflow/mlflow.db")
    assert tracking.check_tracking(uri) == uri
    cfg = tiny_cfg.replace(tracking={"uri": "http://127.0.0.1:1"})
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:2")
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:2"


def test_sqlite_store_logs_without_a_server(tmp_path):
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"  # a fresh store: every MLflow migration runs
    client, exp = tracking.open_experiment(uri, "local", tmp_path / "art")
    rid = tracking.start_run(client, exp, "r", {"a": 1})
    tracking.log_metrics(client, rid, {"x": 2.0}, 0)
    assert client.get_run(rid).data.metrics == {"x": 2.0}
    # MLflow 3's UI opens a "Model training" experiment on its runs (not the GenAI trace page)
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    client.delete_experiment_tag(exp, "mlflow.experimentKind")  # an experiment made before the tag
    assert tracking.open_experiment(uri, "local")[1] == exp
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"


def test_safe_params_and_flat_config(tiny_cfg):
    flat = tracking.flat_config(tiny_cfg)
    assert flat["train.lam"] == tiny_cfg.train.lam and "sweep.lams" in flat
    p = tracking.safe_params({"train.batch_tokens": 256, "my_api_key": "x", "password": "y", "v": "sk-ant-1"})
    assert p == {"train.batch_tokens": "256"}


def test_cli_mlflow_serves_until_terminated(tmp_path):
    """`ssae-ray mlflow` prints its URL, answers /health, and SIGTERM stops the server with it."""
    import subprocess
    import sys
    import time

    port = tracking.free_port()
    cmd = [
        sys.executable,
        "-m",
        "ssae_ray.cli",
        "mlflow",
        "--preset",
        "tiny",
        f"workdir={tmp_path}",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        lines = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300:  # seconds on a quiet machine, minutes on a loaded one
            lines.append(proc.stdout.readline())
            if f"MLflow tracking server: {url}" in lines[-1] or proc.poll() is not None:
                break
        assert f"MLflow tracking server: {url}" in lines[-1], "".join(lines)[-3000:]
        assert tracking._healthy(url, 5.0)
        proc.terminate()
        proc.communicate(timeout=60)
        assert not tracking._healthy(url, 1.0) and (tmp_path / "mlflow" / "mlflow.db").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sweep_parent_run_is_stable_per_sweep_folder(tiny_cfg, mlflow_server, tmp_path):
    """A sweep invoked again (trials cached) logs into the parent run recorded in its folder, not a
    new empty one; another sweep folder has its own parent, whichever started last."""
    uri = mlflow_server
    client, exp = tracking.open_experiment(uri, f"parent-{tmp_path.name}")
    a = tracking.sweep_parent_run(client, exp, uri, tmp_path / "A", "sweep-a", {"x": 1})
    tracking.end_run(client, a)
    again = tracking.sweep_parent_run(client, exp, uri, tmp_path / "A", "sweep-a", {"x": 1})
    assert again == a and client.get_run(a).info.status == "RUNNING"  # reopened for this invocation
    tracking.end_run(client, a)
    b = tracking.sweep_parent_run(client, exp, uri, tmp_path / "B", "sweep-b")
    assert b != a
    assert tracking.recorded_parent_run(tmp_path / "A", uri) == a  # not the newest run of the experiment
    assert tracking.recorded_parent_run(tmp_path / "A", "sqlite:///elsewhere.db") is None
    runs = client.search_runs([exp])
    assert sorted(r.info.run_id for r in runs) == sorted([a, b])
    client.delete_run(a)  # a parent deleted in the UI: the next invocation starts a new one
    a2 = tracking.sweep_parent_run(client, exp, uri, tmp_path / "A", "sweep-a")
    assert a2 not in (a, b) and tracking.recorded_parent_run(tmp_path / "A", uri) == a2


def test_default_experiment_is_per_preset(tiny_cfg):
    from ssae_ray.config import load_config

    assert tracking.experiment_name(tiny_cfg) == "ssae-ray-tiny"
    assert tracking.experiment_name(load_config("local")) == "ssae-ray-local"
    assert tracking.experiment_name(tiny_cfg.replace(tracking={"experiment": "mine"})) == "mine"


def test_interrupted_start_leaves_no_server_behind(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM while the server starts (it runs in a session of its own, so it would
    outlive the CLI) stops the server before the interrupt goes on."""
    import subprocess

    started = []
    real_popen = subprocess.Popen

    def popen(*a, **k):
        started.append(real_popen(*a, **k))
        return started[-1]

    def interrupted(url, timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking.subprocess, "Popen", popen)
    monkeypatch.setattr(tracking, "_healthy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tracking.start_mlflow_server(tmp_path, port=tracking.free_port())
    assert len(started) == 1 and started[0].poll() is not None  # the server's process group is gone


def test_resume_run_works_after_another_experiment_was_set(tmp_path):
    """The physics job resumes its sweep's parent run to log the dashboard (`tracking.resume_run`);
    a process that set another experiment before (a SHIFT run, a notebook; `make test-all` hit it
    when the in-process `ssae-ray run` test came after the SHIFT tests) had MLflow refuse with "active
    experiment ID does not match". The run resumes under its own experiment."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, exp = tracking.open_experiment(uri, "physics-parent", tmp_path / "art")
    parent = tracking.start_run(client, exp, "sweep", {})
    with tracking.fluent(uri, "something-else"):  # what an earlier in-process job left behind
        try:
            with pytest.raises(mlflow.exceptions.MlflowException, match="active experiment ID"):
                with mlflow.start_run(run_id=parent):
                    pass
            with tracking.resume_run(parent) as run:
                assert run.info.run_id == parent and run.info.experiment_id == exp
                mlflow.log_metric("dashboard_features", 3)
        finally:
            while mlflow.active_run():
                mlflow.end_run()
    assert client.get_run(parent).data.metrics["dashboard_features"] == 3


def test_fluent_block_leaves_the_process_as_it_was(tmp_path, monkeypatch):
    """`tracking.fluent`: MLflow's fluent API logs to the job's store inside the block; after it,
    `MLFLOW_TRACKING_URI`, the fluent tracking URI and the active experiment are what they were
    (`mlflow.set_tracking_uri` writes the environment variable, which won over `tracking.uri` for
    every later job in the process and every process it started: `make test-all`'s multi-node
    lost-node sweep logged to a node-local SQLite file left by an earlier in-process job)."""
    import os

    import mlflow
    from mlflow.tracking import fluent as fl

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = (mlflow.get_tracking_uri(), fl._active_experiment_id)
    uri = f"sqlite:///{tmp_path / 'job.db'}"
    with tracking.fluent(uri, "shift-job"):
        assert os.environ["MLFLOW_TRACKING_URI"] == uri
        with mlflow.start_run(run_name="shift") as run:
            mlflow.log_metric("worst", 0.5)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert (mlflow.get_tracking_uri(), fl._active_experiment_id) == before
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run.info.run_id).data.metrics == {"worst": 0.5}
    assert client.get_experiment(run.info.experiment_id).name == "shift-job"
    # a URI the user exported stays exported
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    with tracking.fluent(uri):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
