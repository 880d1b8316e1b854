"""Several nodes: the work dir every node must see, and the tracking server every task logs to.

A job on a Ray cluster (`ray job submit`, `RAY_ADDRESS`, `ray.address`) keeps every stage's files
under the work dir, and stages run on whichever node Ray picks: the driver on the head writes the
corpus, a GPU worker reads it, trials on two workers write checkpoints the driver reads. So the
work dir must be one POSIX folder mounted at the same path on every node (EFS, Filestore, an NFS
export, a ReadWriteMany PVC: what `cluster/` sets up). `prepare(cfg)` proves it before any work:

1. The driver writes a nonce file under the work dir; one task pinned to each alive node
   (`NodeAffinitySchedulingStrategy`, zero CPUs, so a CPU-0 head runs it too) reads it back.
   A node that does not see it stops the job at once with one line naming the node, the path and
   the fix (`SharedStorageError`, exit 2), before the first stage.
2. Nodes that join later (the autoscaler) are checked where they take work: every GPU task and
   every trial first calls `check_here(root)`, which finds the work dir's marker file or raises the
   same one-line error naming that node.
3. MLflow: with no `MLFLOW_TRACKING_URI` / `tracking.uri`, the driver runs an MLflow tracking
   server on the head (store `<workdir>/mlflow/`, on the shared storage; reused while it answers,
   recorded in `<workdir>/mlflow/server.json`, left running for the UI) and hands its URL to every
   task in the config, so no node writes a store of its own.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from ssae_ray.config import Config

log = logging.getLogger("ssae_ray")

MARKER = ".ssae-ray-workdir"
"""`<workdir>/.ssae-ray-workdir`: written by the driver's preflight; a node that sees it sees the
driver's work dir."""

FIX = (
    "put the work dir on storage every node mounts at the same path (EFS, Filestore, NFS, a "
    "ReadWriteMany PVC: see README 'Run on a GPU cluster'), e.g. workdir=/mnt/shared/ssae-ray/<preset>"
)


class SharedStorageError(RuntimeError):
    """A node of the cluster does not see the driver's work dir."""


def on_cluster(cfg: Config) -> bool:
    """Whether this job joins a Ray cluster (rather than starting Ray in this process)."""
    return bool(os.environ.get("RAY_ADDRESS") or cfg.ray.address)


def _node_label(node_id: str, ip: str, head: bool) -> str:
    return f"{'head' if head else 'worker'} node {ip} (id {node_id[:12]})"


def _read_back(path: str, nonce: str) -> dict[str, Any]:
    """Run on one node: does it see `path` with content `nonce`?"""
    import ray

    ctx = ray.get_runtime_context()
    out = {"node_id": ctx.get_node_id(), "host": socket.gethostname(), "ok": False, "why": ""}
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        folder = p.parent.parent
        out["why"] = f"{folder} is not there" if not folder.exists() else f"{folder} holds no {p.name}"
        return out
    except OSError as e:
        out["why"] = f"{type(e).__name__}: {e}"
        return out
    out["ok"] = text == nonce
    if not out["ok"]:
        out["why"] = f"{p} holds another nonce (a different folder at the same path)"
    return out


def check_nodes(root: Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """One task on every alive node reads back a nonce the driver wrote under `root`; raises
    `SharedStorageError` naming the first node that does not see it. Returns one row per node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    nonce = secrets.token_hex(16)
    folder = root / ".preflight"
    folder.mkdir(exist_ok=True)
    path = folder / f"{nonce}.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(nonce)
    tmp.replace(path)
    marker = root / MARKER
    if not marker.is_file():
        tmp = marker.with_suffix(".tmp")
        tmp.write_text("ssae-ray work dir: every node of the cluster must see this file\n")
        tmp.replace(marker)
    task = ray.remote(num_cpus=0, max_retries=0)(_read_back)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    head_id = _head_node_id()
    refs = {
        n["NodeID"]: task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            name="shared-workdir-check",
        ).remote(str(path), nonce)
        for n in nodes
    }
    rows = []
    try:
        for n in nodes:
            nid = n["NodeID"]
            label = _node_label(nid, n.get("NodeManagerAddress", "?"), nid == head_id)
            try:
                row = ray.get(refs[nid], timeout=timeout)
            except ray.exceptions.GetTimeoutError as e:
                raise SharedStorageError(
                    f"{label} did not answer the work-dir check within {timeout:.0f} s (is it overloaded or "
                    f"gone?); the work dir {root} must be visible on every node: {FIX}"
                ) from e
            except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError,
                    ray.exceptions.WorkerCrashedError) as e:  # fmt: skip
                if _alive(nid):
                    raise SharedStorageError(
                        f"{label} could not run the work-dir check ({type(e).__name__}); the work dir {root} "
                        f"must be visible on every node: {FIX}"
                    ) from e
                # The node left between the listing and its check (the autoscaler removed it, or it
                # died): it takes no work, and a node that joins later is checked by `check_here`.
                log.warning("%s left the cluster during the work-dir check; not checked", label)
                continue
            row["label"] = label
            rows.append(row)
            if not row["ok"]:
                raise SharedStorageError(
                    f"{label} does not see the work dir {root} ({row['why']}: it is that node's own "
                    f"disk); {FIX}"
                )
    finally:
        path.unlink(missing_ok=True)
    return rows


def _alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())


def _head_node_id() -> str | None:
    try:
        import ray

        for n in ray.nodes():
            if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {}):
                return n["NodeID"]
    except Exception:  # noqa: BLE001
        return None
    return None


PREPARED: set[str] = set()
"""Work dirs this driver's preflight proved shared (`was_checked(root)`): tasks it starts check them."""


def was_checked(root: str | Path) -> bool:
    return str(Path(root).expanduser().resolve()) in PREPARED


def check_here(root: str | Path, checked: bool = True) -> None:
    """Called first by every task that reads or writes the work dir (GPU tasks, trials) of a job
    whose preflight ran (`checked`): a node that joined after the preflight and does not see the
    work dir stops there, naming itself."""
    marker = Path(root).expanduser() / MARKER
    if not checked or marker.is_file() or not _in_ray_worker():
        return
    import ray

    ctx = ray.get_runtime_context()
    ip = ray.util.get_node_ip_address()
    raise SharedStorageError(
        f"{_node_label(ctx.get_node_id(), ip, False)} does not see the work dir {root} (no {marker} there: "
        f"it is that node's own disk); {FIX}"
    )


def _in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001
        return False


# ---------------------------------------------------------------------------------------------
# MLflow on the cluster


SERVER_FILE = "server.json"


def needs_server() -> bool:
    """Whether tasks of this job may run on another node than the driver: more than one alive node,
    or a head that offers no CPU (its work goes to nodes the autoscaler adds)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    head = _head_node_id()
    head_cpus = next((n["Resources"].get("CPU", 0) for n in alive if n["NodeID"] == head), 0)
    return len(alive) > 1 or not head_cpus


def cluster_tracking(cfg: Config) -> str:
    """The tracking URI every task of this job logs to. With `MLFLOW_TRACKING_URI` / `tracking.uri`
    set, that URI; on a one-node cluster that runs its own tasks, the SQLite store under the work dir.
    Else the head's tracking server: the one recorded in `<workdir>/mlflow/server.json` while it
    answers, or a new one with its store there (SQLite on the shared storage, one writer: the
    server), listening on all of the head's interfaces (the nodes reach it at the head's address, a
    laptop by a port-forward; the cluster's security group / network admits no outside traffic). It
    keeps running after the job, so the UI shows the results; later jobs reuse it."""
    from ssae_ray import tracking

    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if uri or not needs_server():
        return uri or tracking.tracking_uri(cfg)
    root = cfg.root / "mlflow"
    rec = root / SERVER_FILE
    if rec.is_file():
        try:
            url = json.loads(rec.read_text())["url"]
        except (ValueError, KeyError):
            url = ""
        if url and tracking._healthy(url, 2.0):
            log.info("MLflow: the cluster's tracking server at %s", url)
            return url
    import ray

    ip = ray.util.get_node_ip_address()
    port = (
        5000
        if tracking._port_free("127.0.0.1", 5000) and tracking._port_free(ip, 5000)
        else tracking.free_port()
    )
    _, proc = tracking.start_mlflow_server(root, port=port, host="0.0.0.0")
    url = f"http://{ip}:{port}"
    tmp = rec.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"url": url, "pid": proc.pid, "host": socket.gethostname(), "started": time.time()})
    )
    tmp.replace(rec)
    log.info("MLflow tracking server on the head at %s (store %s); UI: port-forward %d", url, root, port)
    return url


def prepare(cfg: Config) -> Config:
    """On a cluster: join it, prove every node sees the work dir, and resolve the tracking URI.
    Returns the config every task gets (`tracking.uri` set)."""
    if not on_cluster(cfg):
        return cfg
    from ssae_ray.runtime import init_ray

    init_ray(cfg.ray)
    t0 = time.perf_counter()
    rows = check_nodes(cfg.root)
    PREPARED.add(str(cfg.root.resolve()))
    log.info(
        "work dir %s is shared: seen by %d nodes in %.1f s", cfg.root, len(rows), time.perf_counter() - t0
    )
    return cfg.replace(tracking={"uri": cluster_tracking(cfg)})
