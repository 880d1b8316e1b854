"""MLflow: a local tracking server, a reachability check made before any work, and run logging.

`start_mlflow_server(root)` runs `mlflow server` bound to 127.0.0.1 with a SQLite backend
(`<root>/mlflow.db`) and artifacts served from `<root>/mlartifacts`, and waits until `/health`
answers. Jobs log to `MLFLOW_TRACKING_URI`, else `tracking.uri`, else a SQLite store under the
work dir (no server needed). Sweeps log one parent run and one child run per trial (tag
`mlflow.parentRunId`); all logging goes through `MlflowClient` with explicit run ids, so trials
in other Ray processes log to the same runs. Parameters are filtered: no API key is ever logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ssae_ray.config import Config

log = logging.getLogger("ssae_ray")

_SECRET_KEY = re.compile(r"(api_?key|secret|password|auth|credential)", re.I)
_SECRET_VALUE = re.compile(r"^(sk-|sk_|ghp_|xox)")


class TrackingError(RuntimeError):
    """The tracking server cannot be started or reached."""


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_mlflow_server(
    root: str | Path, port: int = 5000, host: str = "127.0.0.1", timeout: float = 300.0
) -> tuple[str, subprocess.Popen]:
    """Start `mlflow server` (SQLite backend, artifacts under `root`, one worker) and return its URL
    and process once `/health` answers. The caller owns the process (terminate it when done). A
    server that exits is reported at once; `timeout` only bounds one that hangs (it answers in ~5 s
    on a quiet machine, in over 90 s on a heavily loaded one)."""
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not _port_free(host, port):
        raise TrackingError(
            f"port {port} on {host} is already in use (another MLflow server?): pass another port "
            f"(ssae-ray mlflow --port N) or use the running server via MLFLOW_TRACKING_URI=http://{host}:{port}"
        )
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "mlartifacts"),
        "--serve-artifacts", "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    logf = open(root / "mlflow-server.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"  # all interfaces: ask locally
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                tail = (root / "mlflow-server.log").read_text(errors="replace")[-2000:]
                raise TrackingError(f"mlflow server exited with code {proc.returncode}:\n{tail}")
            if _healthy(url, 1.0):
                log.info("MLflow server at %s (store %s)", url, root)
                return url, proc
            time.sleep(0.3)
    except BaseException:  # interrupted while waiting (Ctrl-C, SIGTERM): leave no server behind
        stop_server(proc)
        raise
    stop_server(proc)
    raise TrackingError(
        f"mlflow server did not answer at {url} within {timeout:.0f} s; see {root}/mlflow-server.log"
    )


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate the server's process group (gunicorn/uvicorn workers included)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, 9)


def serve_forever(cfg: Config, port: int = 5000) -> None:
    """`ssae-ray mlflow`: start a server under `<workdir>/mlflow`, print its URL, wait for Ctrl-C."""
    import signal

    def _stop(*_a: Any) -> None:
        raise KeyboardInterrupt

    # Before the server starts: a `kill` during its start-up stops it too (it runs in its own session)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        url, proc = start_mlflow_server(cfg.root / "mlflow", port)
    except KeyboardInterrupt:
        return
    print(
        f"MLflow tracking server: {url}\n  export MLFLOW_TRACKING_URI={url}\n  (Ctrl-C stops it)", flush=True
    )
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)


def _healthy(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tracking_uri(cfg: Config) -> str:
    """`MLFLOW_TRACKING_URI`, else `tracking.uri`, else a SQLite store under the work dir."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if uri:
        return uri
    return f"sqlite:///{(cfg.root / 'mlflow' / 'mlflow.db').resolve()}"


def check_tracking(uri: str, timeout: float = 5.0) -> str:
    """Fail fast (before hours of work) when the tracking URI cannot be used; returns the URI."""
    if uri.startswith(("http://", "https://")):
        if not _healthy(uri, timeout):
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri}: start one with `ssae-ray mlflow` "
                "(and export MLFLOW_TRACKING_URI=<its URL>), or unset MLFLOW_TRACKING_URI / tracking.uri "
                "to log to a SQLite file under the work dir"
            )
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the MLflow SQLite store folder {folder}: {e}") from e
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"the MLflow SQLite store folder {folder} is not writable")
    elif "://" in uri and not uri.startswith("file://"):
        raise TrackingError(f"unsupported tracking URI {uri!r}: use http(s)://host:port or sqlite:///path")
    return uri


def open_experiment(uri: str, name: str, artifact_root: Path | None = None) -> tuple[Any, str]:
    """(MlflowClient, experiment id), creating the experiment if needed (its artifacts under
    `artifact_root` for file stores; a server decides for itself)."""
    from mlflow.tracking import MlflowClient

    check_tracking(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return client, exp.experiment_id
    loc = None
    if artifact_root is not None and not uri.startswith(("http://", "https://")):
        loc = Path(artifact_root).resolve().as_uri()
    exp_id = client.create_experiment(
        name, artifact_location=loc, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )
    return client, exp_id


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's UI opens an experiment by its kind: without this tag it guesses GenAI ("Send your first
trace") and hides the runs one click away; `custom_model_development` ("Model training") opens on
the runs table, where the sweep's parent and trial runs are."""


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Stringified params with secrets dropped (keys like *api_key*, values like `sk-...`)."""
    out = {}
    for k, v in params.items():
        s = str(v)
        if _SECRET_KEY.search(k) or _SECRET_VALUE.match(s):
            continue
        out[k] = s[:6000]
    return out


def flat_config(cfg: Config) -> dict[str, Any]:
    """`section.key -> value` for every config field."""
    out: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def start_run(
    client: Any, experiment_id: str, name: str, params: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
) -> str:  # fmt: skip
    """Create a run (a child of `parent_run_id` when given) and log its params; returns its id."""
    from mlflow.entities import Param

    all_tags = {"mlflow.runName": name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=name)
    rid = run.info.run_id
    items = [Param(k, v) for k, v in safe_params(params or {}).items()]
    for s in range(0, len(items), 100):
        client.log_batch(rid, params=items[s : s + 100])
    return rid


def experiment_name(cfg: Config) -> str:
    """`tracking.experiment`, else one experiment per preset: `ssae-ray-<name>`."""
    return cfg.tracking.experiment or f"ssae-ray-{cfg.name}"


PARENT_RUN_FILE = "mlflow_parent_run.json"
"""Written in a sweep's folder: the MLflow parent run of that sweep (run id, experiment, store)."""


def recorded_parent_run(folder: str | Path, uri: str | None = None) -> str | None:
    """The parent run id recorded in a sweep folder (None when there is none, or when it was
    recorded for another tracking store than `uri`)."""
    import json

    p = Path(folder) / PARENT_RUN_FILE
    if not p.is_file():
        return None
    rec = json.loads(p.read_text())
    if uri is not None and rec.get("tracking_uri") != uri:
        return None
    return rec.get("run_id")


def sweep_parent_run(
    client: Any, experiment_id: str, uri: str, folder: str | Path, name: str,
    params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
) -> str:  # fmt: skip
    """The MLflow parent run of the sweep in `folder`, stable across invocations: the run recorded in
    `<folder>/mlflow_parent_run.json` when it is still in this store and experiment (reopened as
    RUNNING), else a new run, recorded there. A re-invoked sweep (trials cached, re-evaluated) so
    never opens a second, empty parent."""
    from ssae_ray.stages import write_json_atomic

    folder = Path(folder)
    rid = recorded_parent_run(folder, uri)
    if rid is not None:
        try:
            run = client.get_run(rid)
        except Exception:  # deleted from the store, or the store was reset
            run = None
        if (
            run is not None
            and run.info.lifecycle_stage == "active"
            and run.info.experiment_id == experiment_id
        ):
            client.update_run(rid, status="RUNNING")
            log.info("MLflow: reusing the sweep's parent run %s", rid)
            return rid
    rid = start_run(client, experiment_id, name, params, tags=tags)
    write_json_atomic(
        folder / PARENT_RUN_FILE, {"run_id": rid, "experiment_id": experiment_id, "tracking_uri": uri}
    )
    return rid


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric metrics (names sanitised for MLflow) at `step`. A NaN or infinite value is not
    logged as a metric: it is recorded as a run tag `nonfinite.<metric>` (`nan at step 3`) and warned
    about, so a diverged number is visible in the UI instead of silently missing."""
    log_metric_rows(client, run_id, [(metrics, step or 0)])


def log_metric_rows(client: Any, run_id: str, rows: list[tuple[Mapping[str, float], int]]) -> None:
    """`log_metrics` of several steps at once, `(metrics, step)` each, in as few `log_batch` calls as
    MLflow allows (a trial's training curve: one call per flush instead of one per step; each call
    is a round trip and a transaction, ~16 ms on a SQLite store)."""
    import math

    from mlflow.entities import Metric, RunTag

    ts = int(time.time() * 1000)
    items, bad = [], []
    for metrics, step in rows:
        for k, v in metrics.items():
            if not isinstance(v, int | float):
                continue
            if math.isfinite(float(v)):
                items.append(Metric(_metric_name(k), float(v), ts, int(step)))
            else:
                bad.append(RunTag(f"nonfinite.{_metric_name(k)}", f"{float(v)} at step {int(step)}"))
    if bad:
        steps = {t.value.split(" at step ")[1] for t in bad}
        what = (
            f"step {next(iter(steps))}: non-finite "
            + ", ".join(f"{t.key[len('nonfinite.') :]}={t.value.split()[0]}" for t in bad)
            if len(steps) == 1
            else "non-finite " + ", ".join(f"{t.key[len('nonfinite.') :]}={t.value}" for t in bad)
        )
        log.warning("MLflow run %s, %s (recorded as nonfinite.* tags)", run_id, what)
    for s in range(0, len(items), 1000):  # MLflow's limit per log_batch: 1000 metrics
        client.log_batch(run_id, metrics=items[s : s + 1000])
    if bad:
        client.log_batch(run_id, tags=bad)


def _metric_name(k: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", k)


@contextlib.contextmanager
def fluent(uri: str, experiment: str | None = None) -> Iterator[None]:
    """MLflow's fluent API (`mlflow.start_run`, `mlflow.log_*`) pointed at `uri` (and `experiment`)
    for the block, then the process as it was. `mlflow.set_tracking_uri` also writes
    `MLFLOW_TRACKING_URI` into `os.environ`, which wins over `tracking.uri` here: every later job in
    the process (a notebook running a second preset, the test suite) and every process it starts
    (a local Ray's workers, a test cluster's nodes) then logged to the first job's store; and
    `mlflow.set_experiment` left the active experiment set."""
    import mlflow

    with mlflow_state_kept():
        mlflow.set_tracking_uri(uri)
        if experiment is not None:
            mlflow.set_experiment(experiment)
        yield


@contextlib.contextmanager
def mlflow_state_kept() -> Iterator[None]:
    """On leaving the block, `MLFLOW_TRACKING_URI`, MLflow's fluent tracking URI and its active
    experiment are what they were on entering it (used by `fluent`, and by the test suite around
    every test)."""
    import mlflow
    from mlflow.tracking import fluent as fl
    from mlflow.tracking._tracking_service import utils

    env = os.environ.get("MLFLOW_TRACKING_URI")
    old_uri, old_exp = getattr(utils, "_tracking_uri", None), getattr(fl, "_active_experiment_id", None)
    try:
        yield
    finally:
        if getattr(utils, "_tracking_uri", None) != old_uri:
            mlflow.set_tracking_uri(old_uri)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
        if hasattr(fl, "_active_experiment_id"):
            fl._active_experiment_id = old_exp


@contextlib.contextmanager
def resume_run(run_id: str) -> Iterator[Any]:
    """`mlflow.start_run(run_id=...)` of an existing run (the sweep's parent, for the dashboard's
    artifacts), under the run's own experiment: MLflow refuses to resume a run whose experiment is
    not the process's active one, which a SHIFT run or a notebook may have set before."""
    import mlflow

    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def end_run(client: Any, run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(run_id, status=status)
