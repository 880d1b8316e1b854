"""A real multi-node Ray cluster on one Linux machine, for tests (root only).

    with LocalCluster(shared=tmp / "efs", workers=2) as c:   # a head + 2 GPU workers
        c.submit("python jobs/physics.py --preset tiny workdir=...")

Every node is `ray start` in its own mount and PID namespace (`unshare --mount --pid --fork
--propagation private --mount-proc`):

- the head: `ray start --head --num-cpus 0 --num-gpus 0` (it only drives, as the shipped cluster
  configs' heads), with the dashboard and job agent on 127.0.0.1; it sees this machine's disk, so
  the test process can read what the driver wrote to its own `/tmp`;
- each worker: `ray start --address=<head> --num-gpus 1` (a logical GPU) with a private tmpfs
  over its node-local paths (`/tmp`, `/dev/shm`, `$HOME/.cache`): its own disk, as a cloud VM's.
  What the head writes under `/tmp` or `~/.cache` a worker cannot see, and the other way round;
- `shared`: one directory bind-mounted into every node at the same path, as EFS / Filestore / an
  NFS export or a ReadWriteMany PVC would be.

Nodes share the machine's (or the caller's) network namespace, so every node listens on
127.0.0.1 with its own ports. `stop()` SIGKILLs every process of every node's PID namespace (the
namespaces and their mounts go with their last process) and checks that none is left;
`kill_raylet(i)` kills one worker's raylet (a lost node, as Ray sees one).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NODE_RESOURCE = "ssae_test_node_"
"""Each node offers one unit of `ssae_test_node_<name>` (head, worker1, ...): how the test finds it."""


class ClusterError(RuntimeError):
    """The test cluster cannot start here (not root, no `unshare`) or did not come up."""


def missing() -> str | None:
    """Why no cluster can start here (None when one can)."""
    if sys.platform != "linux":
        return "the multi-node test cluster needs Linux namespaces"
    if os.geteuid() != 0:
        return "the multi-node test cluster needs root (unshare --mount --pid)"
    if not shutil.which("unshare"):
        return "the multi-node test cluster needs util-linux's unshare"
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it exits."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pidns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _procs_in(ns: str) -> list[int]:
    """Host PIDs of every live process in PID namespace `ns` (`pid:[inode]`)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and _pidns(int(d)) == ns:
            out.append(int(d))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _mounts() -> set[str]:
    return {" ".join(line.split()[3:5]) for line in Path("/proc/self/mountinfo").read_text().splitlines()}


@dataclass
class Node:
    name: str
    head: bool
    proc: subprocess.Popen
    ports: dict[str, int]
    ns: str = ""
    """The node's PID namespace (`pid:[inode]`)."""
    node_id: str = ""
    ip: str = ""
    """The node's IP as Ray reports it (`NodeManagerAddress`): the `--node-ip-address` given, or the
    host's address where Ray picks its own (CI's runners report theirs)."""
    log: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def pids(self) -> list[int]:
        return _procs_in(self.ns) if self.ns else []

    def pid_of(self, needle: str) -> int | None:
        """The host PID of this node's process whose command line contains `needle`."""
        for p in self.pids():
            if needle in _cmdline(p):
                return p
        return None


class LocalCluster:
    """A head (CPU 0) and `workers` worker nodes (`worker_cpus` CPUs, `worker_gpus` logical GPUs
    each), every one in its own mount + PID namespace, `shared` mounted on all of them."""

    def __init__(
        self,
        shared: str | Path,
        workers: int = 2,
        worker_cpus: int = 2,
        worker_gpus: int = 1,
        env: dict[str, str] | None = None,
        object_store_mb: int = 100,
        node_cache: str | Path | None = None,
    ) -> None:
        why = missing()
        if why:
            raise ClusterError(why)
        self.shared = Path(shared).resolve()
        self.shared.mkdir(parents=True, exist_ok=True)
        self.n_workers = workers
        self.worker_cpus = worker_cpus
        self.worker_gpus = worker_gpus
        self.object_store = object_store_mb * 1024**2
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, **(env or {})}
        self.env["PATH"] = f"{bindir}{os.pathsep}{self.env.get('PATH', '')}"
        self.env.setdefault("RAY_AUTH_MODE", "disabled")
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Ray's memory monitor reads the whole machine's memory, not a node's share of it: on one
        # machine shared by every node (and other users) it kills tasks no real node would.
        self.env.setdefault("RAY_memory_monitor_refresh_ms", "0")
        self.ray = str(Path(bindir) / "ray")
        # A short folder: Ray's Unix sockets live under the head's temp dir (107-byte path limit).
        self.base = Path(tempfile.mkdtemp(prefix="ssae-rc-", dir="/tmp"))
        self.node_cache = Path(node_cache or Path(self.env.get("HOME", "/root")) / ".cache")
        self.nodes: list[Node] = []
        self.gcs = ""
        self.dashboard = ""
        self._mounts_before = _mounts()
        # worker ports: a block of its own per cluster (below the ephemeral range; two clusters at once)
        self._launched = 0
        self._port_base = 10000 + 2000 * random.Random(os.getpid() ^ time.time_ns()).randrange(10)
        self.timings: dict[str, float] = {}

    # -- start / stop ------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> LocalCluster:
        t0 = time.perf_counter()
        try:
            gcs, dash, *rest = _free_ports(2 + 7)
            self.gcs = f"127.0.0.1:{gcs}"
            self.dashboard = f"http://127.0.0.1:{dash}"
            self._launch("head", True, [
                "--head", f"--port={gcs}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={self.base / 'head'}",
            ], rest)  # fmt: skip
            self._wait_nodes(1, timeout, t0)
            self.timings["head"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            for i in range(self.n_workers):
                self._launch(f"worker{i + 1}", False, self._worker_args(), _free_ports(7))
            self._wait_nodes(1 + self.n_workers, timeout, t1)
            self._wait_job_agent(timeout, t1)
            self.timings["workers"] = time.perf_counter() - t1
        except BaseException:
            self.stop()
            raise
        return self

    def _worker_args(self) -> list[str]:
        return [f"--address={self.gcs}", f"--num-cpus={self.worker_cpus}", f"--num-gpus={self.worker_gpus}"]

    def add_worker(self, name: str, shared: bool = True, timeout: float = 180.0) -> Node:
        """One more worker node (as the autoscaler adds one); `shared=False`: a node whose shared
        storage is not mounted (a misconfigured node: the shared path is on its own disk)."""
        node = self._launch(name, False, self._worker_args(), _free_ports(7), shared=shared)
        self._wait_nodes(len(self.nodes), timeout, time.perf_counter())
        return node

    def remove(self, node: Node, timeout: float = 30.0, wait_dead: bool = True) -> None:
        """SIGKILL every process of `node` (a node the autoscaler removed, or a crashed machine).
        `wait_dead`: return once the GCS marks it dead (seconds after the kill: until then Ray still
        lists it as alive, and the next test's preflight would send it a task)."""
        for pid in [*node.pids(), node.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.proc.wait(timeout)
        self.nodes.remove(node)
        deadline = time.perf_counter() + 90
        while wait_dead and time.perf_counter() < deadline:
            try:
                if not any(x.node_id == node.node_id and x.state == "ALIVE" for x in self._state_nodes()):
                    return
            except Exception:  # noqa: BLE001 - the dashboard is busy: ask again
                pass
            time.sleep(0.5)

    def _launch(self, name: str, head: bool, args: list[str], ports: list[int], shared: bool = True) -> Node:
        keys = ["node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc",
                "runtime-env-agent", "metrics-export", "worker-base"]  # fmt: skip
        p = dict(zip(keys, ports, strict=True))
        self._launched += 1
        wb = self._port_base + 200 * self._launched  # each node its own worker port range
        cmd = [
            self.ray, "start", "--block", *args, "--disable-usage-stats",
            f"--node-manager-port={p['node-manager']}", f"--object-manager-port={p['object-manager']}",
            f"--dashboard-agent-listen-port={p['dashboard-agent-listen']}",
            f"--dashboard-agent-grpc-port={p['dashboard-agent-grpc']}",
            f"--runtime-env-agent-port={p['runtime-env-agent']}", f"--metrics-export-port={p['metrics-export']}",
            f"--min-worker-port={wb}", f"--max-worker-port={wb + 199}",
            f"--object-store-memory={self.object_store}", "--node-ip-address=127.0.0.1",
            f"--resources={json.dumps({NODE_RESOURCE + name: 1})}",
        ]  # fmt: skip
        if head:
            script = 'exec "$@"'
        else:
            # The shared folder is opened before the tmpfs mounts (which may hide it) and bound back
            # at the same path through its descriptor.
            script = (
                'set -e; exec 3<"$SSAE_SHARED"; '
                "mount -t tmpfs -o mode=1777,size=4g ssae-node-tmp /tmp; "
                "mount -t tmpfs -o mode=1777,size=1g ssae-node-shm /dev/shm; "
                'mkdir -p "$SSAE_NODE_CACHE"; mount -t tmpfs -o size=4g ssae-node-cache "$SSAE_NODE_CACHE"; '
                + (
                    'mkdir -p "$SSAE_SHARED"; mount --no-canonicalize --bind /proc/self/fd/3 "$SSAE_SHARED"; '
                    if shared
                    else ""
                )
                + "exec 3<&-; "
                'exec "$@"'
            )
        log = self.base / f"{name}.log"
        env = {**self.env, "SSAE_SHARED": str(self.shared), "SSAE_NODE_CACHE": str(self.node_cache)}
        # --kill-child: the namespace's first process (and so the whole node) dies with `unshare`,
        # which dies with this process (PR_SET_PDEATHSIG): a test killed by a timeout leaves no node.
        full = ["unshare", "--mount", "--pid", "--fork", "--kill-child=SIGKILL", "--propagation", "private",
                "--mount-proc", "bash", "-c", script, name, *cmd]  # fmt: skip
        with open(log, "ab") as f:
            proc = subprocess.Popen(full, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)  # fmt: skip
        node = Node(name, head, proc, p, log=log, extra={"shared": shared})
        self.nodes.append(node)
        for _ in range(200):  # the namespace exists once unshare has forked its child
            try:
                ns = os.readlink(f"/proc/{proc.pid}/ns/pid_for_children")
            except OSError:
                ns = ""
            if ns and ns != _pidns(proc.pid):
                node.ns = ns
                break
            time.sleep(0.02)
        return node

    def _state_nodes(self) -> list[Any]:
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard, detail=True, raise_on_missing_output=False)

    def _wait_nodes(self, n: int, timeout: float, t0: float) -> None:
        last: Any = None
        while time.perf_counter() - t0 < timeout:
            for i, node in enumerate(self.nodes):
                if node.proc.poll() is not None:
                    tries = node.extra.get("tries", 1)
                    if node.head or tries >= 3:
                        raise ClusterError(
                            f"node {node.name} exited ({node.proc.returncode}):\n{self.log_tail(node)}"
                        )
                    # a worker whose `ray start` timed out reaching a loaded GCS: start it again
                    self.nodes.pop(i)
                    again = self._launch(node.name, False, self._worker_args(), _free_ports(7),
                                         shared=node.extra.get("shared", True))  # fmt: skip
                    self.nodes.remove(again)
                    self.nodes.insert(i, again)
                    again.extra["tries"] = tries + 1
                    break
            try:
                alive = [x for x in self._state_nodes() if x.state == "ALIVE"]
            except Exception as e:  # noqa: BLE001 - the dashboard is still coming up
                last, alive = e, []
            if len(alive) >= n:
                for node in self.nodes:
                    for x in alive:
                        if (x.resources_total or {}).get(f"{NODE_RESOURCE}{node.name}"):
                            node.node_id = x.node_id
                            node.ip = x.node_ip or ""
                if all(node.node_id for node in self.nodes):
                    return
            time.sleep(0.5)
        raise ClusterError(f"{n} Ray nodes did not come up in {timeout:.0f} s (last error: {last})")

    def _wait_job_agent(self, timeout: float, t0: float) -> None:
        while time.perf_counter() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/jobs/", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise ClusterError(f"the head's job agent did not answer in {timeout:.0f} s")

    def log_tail(self, node: Node, n: int = 3000) -> str:
        try:
            return node.log.read_text(errors="replace")[-n:] if node.log else ""
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGKILL every process of every node (their namespaces and mounts go with them) and
        check that none is left. Raises `ClusterError` when a process or mount outlived it."""
        for node in self.nodes:
            for pid in [*node.pids(), node.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        left: list[int] = []
        for node in self.nodes:
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline:
            left = [p for node in self.nodes for p in node.pids()]
            if not left:
                break
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        shutil.rmtree(self.base, ignore_errors=True)
        extra_mounts = _mounts() - self._mounts_before
        if left:
            raise ClusterError(f"processes left after stop: {[_cmdline(p)[:80] for p in left]}")
        if extra_mounts:
            raise ClusterError(f"mounts left after stop: {sorted(extra_mounts)}")

    # -- use -----------------------------------------------------------------------------------

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    def node_name(self, node_id: str) -> str:
        return next((n.name for n in self.nodes if n.node_id == node_id), node_id)

    def run_on(self, node: Node, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
        """`cmd` inside `node`'s mount namespace (what a shell on that node would see)."""
        target = node.pid_of("raylet") or node.pids()[0]
        return subprocess.run(["nsenter", "-t", str(target), "-m", "-p", "--", *cmd],
                              capture_output=True, text=True, **kw)  # fmt: skip

    def kill_raylet(self, node: Node) -> int:
        """SIGKILL `node`'s raylet (Ray marks the node dead; its workers die with it)."""
        pid = node.pid_of("/raylet ") or node.pid_of("raylet")
        if pid is None:
            raise ClusterError(f"no raylet on {node.name}")
        os.kill(pid, signal.SIGKILL)
        return pid

    def submit(
        self, entrypoint: str, working_dir: str | Path | None = None, env_vars: dict[str, str] | None = None,
        timeout: float = 900.0,
    ) -> tuple[str, str, str]:  # fmt: skip
        """Submit `entrypoint` as a Ray job (`ray job submit --working-dir ...`), wait for it; returns
        (job id, final status, logs)."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard)
        runtime_env: dict[str, Any] = {}
        if working_dir:
            runtime_env["working_dir"] = str(working_dir)
            runtime_env["excludes"] = [".venv", ".git", "**/__pycache__", ".ruff_cache", ".pytest_cache"]
        if env_vars:
            runtime_env["env_vars"] = env_vars
        job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None)
        t0 = time.monotonic()
        status = ""
        while time.monotonic() - t0 < timeout:
            status = str(client.get_job_status(job).value)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1)
        else:
            client.stop_job(job)
        return job, status, client.get_job_logs(job)

    def describe(self) -> str:
        return json.dumps({n.name: {"node_id": n.node_id, "ns": n.ns} for n in self.nodes})
