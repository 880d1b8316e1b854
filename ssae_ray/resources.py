"""Where each process runs, and whether a config's Ray requests can ever be placed.

Devices. Ray gives a task or actor GPUs by setting `CUDA_VISIBLE_DEVICES` to their ids, so a
worker holding one GPU sees it as `cuda:0`. `process_device` is the one place that turns that
assignment into a torch device: a Ray worker with GPU ids gets `cuda:0`, a Ray worker without any
gets `cpu` (it must not grab a GPU another worker holds), and the driver (not a Ray worker) gets
`cuda` when it has one, else `cpu`. Every process that runs the LM or an SAE calls it (through
`models.load_lm` with `model.device: auto`, the Train workers, the embedding actors).

Schedulability. `check_schedulable(cfg)` lists what a job will ask Ray for (sweep trials, Ray Train
workers, embedding actors, GPU tasks for caching / evaluation) and refuses, before any work, a
request that can never be placed on the cluster: now, or at the autoscaler's maximum when the
cluster publishes one. A request that fits only later (more trials than GPUs) just queues.

GPU tasks. `on_gpu_worker(fn, *args)` runs `fn` as a Ray task holding one GPU when the cluster has
GPUs and this process holds none (a CPU head driving GPU workers), else in this process.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch

log = logging.getLogger("ssae_ray")
T = TypeVar("T")

_WARNED: set[str] = set()


class ResourceError(ValueError):
    """A config whose Ray requests can never fit the cluster, or a work dir too small for a job."""


# ---------------------------------------------------------------------------------------------
# Devices


def pick_device(
    pref: str, gpu_ids: list[str] | None, cuda_available: bool, visible: list[str] | None = None
) -> str:
    """The device of a process. `gpu_ids` are the GPUs Ray assigned to it (None: not a Ray worker,
    i.e. the driver or a plain script). `pref` is `model.device` (`auto`, or an explicit device,
    which wins). `visible` is `CUDA_VISIBLE_DEVICES` as a list (None when unset): Ray narrows it
    to the task's GPUs, so one GPU is `cuda:0`; Ray Train shares the node's GPUs among its workers,
    so worker k's GPU is its position in that list."""
    if pref not in ("auto", "", None):
        return str(pref)
    if gpu_ids is None:  # the driver
        return "cuda" if cuda_available else "cpu"
    if not gpu_ids:
        return "cpu"
    if not cuda_available:  # logical GPUs (`ray start --num-gpus` on a CPU machine, tests)
        if "logical" not in _WARNED:
            _WARNED.add("logical")
            log.warning("Ray assigned GPU %s but CUDA is not available here; running on cpu", gpu_ids)
        return "cpu"
    if visible is None:
        return f"cuda:{gpu_ids[0]}"
    return f"cuda:{visible.index(gpu_ids[0])}" if gpu_ids[0] in visible else "cuda:0"


def ray_gpu_ids() -> list[str] | None:
    """The GPU ids Ray assigned to this process; None when it is not a Ray worker (the driver)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    if not ray.is_initialized():
        return None
    from ray._private.worker import WORKER_MODE, global_worker

    if global_worker.mode != WORKER_MODE:
        return None
    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return [str(i) for i in ids]


def process_device(pref: str = "auto") -> torch.device:
    """This process's device from what Ray assigned it (see the module docstring)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [v.strip() for v in env.split(",") if v.strip()] if env is not None else None
    return torch.device(pick_device(pref, ray_gpu_ids(), torch.cuda.is_available(), visible))


# ---------------------------------------------------------------------------------------------
# What the cluster offers


class Offer(NamedTuple):
    nodes: list[dict[str, float]]
    """CPU / GPU of every node the cluster has or can scale to (one dict per node)."""
    source: str
    """Where the numbers came from (for the error message)."""

    def total(self, key: str) -> float:
        return sum(n.get(key, 0.0) for n in self.nodes)

    def describe(self) -> str:
        shapes: dict[tuple[float, float], int] = {}
        for n in self.nodes:
            k = (n.get("CPU", 0.0), n.get("GPU", 0.0))
            shapes[k] = shapes.get(k, 0) + 1
        parts = [f"{c} x {{CPU: {k[0]:g}, GPU: {k[1]:g}}}" for k, c in sorted(shapes.items())]
        return (
            f"{self.total('GPU'):g} GPUs and {self.total('CPU'):g} CPUs ({', '.join(parts)}; {self.source})"
        )


def cluster_offer() -> Offer:
    """The alive nodes of the running Ray cluster plus the nodes its autoscaler may still add
    (from the cluster config the autoscaler publishes; absent on a plain `ray start`)."""
    import ray

    nodes = [
        {"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
        for n in ray.nodes()
        if n.get("Alive")
    ]
    source = "nodes alive now"
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - older clusters / no autoscaler: nodes alive only
        config = None
    groups: list[tuple[dict[str, float], int]] = []
    if config is not None and config.node_group_configs:
        for group in config.node_group_configs:
            shape = {"CPU": float(group.resources.get("CPU", 0)), "GPU": float(group.resources.get("GPU", 0))}
            groups.append((shape, group.max_count if group.max_count >= 0 else 64))  # -1: unbounded
    elif Path(BOOTSTRAP).expanduser().is_file():  # the cluster launcher's config on the head (v1 autoscaler)
        try:
            groups = [
                (n, 1) for n in offer_from_cluster_yaml(Path(BOOTSTRAP).expanduser(), workers_only=True).nodes
            ]
        except Exception as e:  # noqa: BLE001 - an unreadable file: alive nodes only
            log.warning("cannot read %s (%s); counting the nodes alive now only", BOOTSTRAP, e)
    if groups:
        extra = []
        taken: dict[tuple[float, float], int] = {}
        for shape, count in groups:
            key = (shape["CPU"], shape["GPU"])
            alive = sum(1 for n in nodes if n == shape) - taken.get(key, 0)
            use = min(max(alive, 0), count)
            taken[key] = taken.get(key, 0) + use
            extra += [dict(shape) for _ in range(count - use)]
        nodes += extra
        source = "nodes alive now + the autoscaler's maximum"
    return Offer(nodes, source)


BOOTSTRAP = "~/ray_bootstrap_config.yaml"
"""Where `ray up` leaves the cluster config on the head (read when the autoscaler publishes none)."""


def cluster_has_gpus() -> bool:
    """Ray is up and its cluster has (or its autoscaler can add) GPUs."""
    import ray

    if not ray.is_initialized():
        return False
    return cluster_offer().total("GPU") > 0


# ---------------------------------------------------------------------------------------------
# What a config asks for


class Request(NamedTuple):
    what: str
    """Who asks, for the message (`sweep trial`, `Ray Train worker`, ...)."""
    unit: dict[str, float]
    """CPU / GPU of one task or actor."""
    gang: int
    """How many of them must be placed at the same time (Train workers, an actor pool)."""
    held: tuple[dict[str, float], int] | None = None
    """(unit, count) that other processes hold while the gang waits (the trials driving Train runs)."""
    fix: str = ""

    def describe(self) -> str:
        u = f"{{CPU: {self.unit.get('CPU', 0):g}, GPU: {self.unit.get('GPU', 0):g}}}"
        s = f"{self.gang} x {u} at once" if self.gang > 1 else u
        if self.held:
            (u, k) = self.held
            s += f" while {k} trial(s) hold {{CPU: {u.get('CPU', 0):g}, GPU: {u.get('GPU', 0):g}}} each"
        return f"{self.what}: {s}"


def gpu_unit(has_gpus: bool, cpus: float = 1.0) -> dict[str, float]:
    """One task or actor that runs the LM or SAEs: a GPU when the cluster has them."""
    return {"CPU": cpus, "GPU": 1.0} if has_gpus else {"CPU": cpus}


def trial_resources(cfg: Any, has_gpus: bool) -> dict[str, float]:
    """A sweep trial's own request. A trial that drives a Ray Train run (`train.num_workers > 1`)
    asks for no GPU: its Train workers hold them (a trial holding a GPU while its trainer waits for
    `num_workers` more never schedules on a full cluster)."""
    s = cfg.sweep
    gpus = 0.0 if cfg.train.num_workers > 1 else s.gpus_per_trial
    return {"CPU": float(s.cpus_per_trial), "GPU": float(gpus)}


def requests_for(
    cfg: Any, has_gpus: bool, parts: tuple[str, ...] = ("index", "gpu_tasks", "sweep")
) -> list[Request]:
    """What the pipeline asks Ray for, per part: `index` (embedding actors), `gpu_tasks` (caching,
    evaluation, fit check, TracIn on a GPU worker), `sweep` (trials and their Train workers)."""
    out: list[Request] = []
    if "index" in parts:
        n = max(1, cfg.retrieval.num_embed_actors)
        out.append(Request("embedding actors (retrieval.num_embed_actors)", gpu_unit(has_gpus), n,
                           fix="lower retrieval.num_embed_actors"))  # fmt: skip
    if "gpu_tasks" in parts and has_gpus:
        out.append(Request("GPU task (caching, evaluation, fit check, TracIn)", gpu_unit(True), 1))
    if "sweep" in parts or "finetune" in parts:
        tr = trial_resources(cfg, has_gpus)
        if "sweep" in parts:
            out.append(Request("sweep trial (sweep.cpus_per_trial, sweep.gpus_per_trial)", tr, 1,
                               fix="lower sweep.gpus_per_trial / sweep.cpus_per_trial"))  # fmt: skip
        if cfg.train.num_workers > 1:
            held = None
            if "sweep" in parts:
                k = max(1, min(cfg.sweep.max_concurrent_trials, n_trials(cfg)))
                held = ({key: v for key, v in tr.items() if v}, k)
            out.append(Request(f"Ray Train workers (train.num_workers={cfg.train.num_workers})",
                               gpu_unit(has_gpus), cfg.train.num_workers, held or None,
                               fix="lower train.num_workers (or sweep.max_concurrent_trials / "
                                   "sweep.cpus_per_trial)"))  # fmt: skip
    return out


def n_trials(cfg: Any) -> int:
    from ssae_ray.sweep import grid

    return len(grid(cfg))


def fits(req: Request, offer: Offer) -> bool:
    """Whether `req.gang` units can be placed at once after the `req.held` units (first-fit, fullest
    GPU nodes first)."""
    free = sorted(({k: n.get(k, 0.0) for k in ("CPU", "GPU")} for n in offer.nodes),
                  key=lambda n: (-n["GPU"], -n["CPU"]))  # fmt: skip

    def place(unit: dict[str, float], count: int) -> bool:
        left = count
        for node in free:
            while left and all(node.get(k, 0.0) + 1e-9 >= v for k, v in unit.items()):
                for k, v in unit.items():
                    node[k] -= v
                left -= 1
        return left == 0

    if req.held is not None and not place(*req.held):
        return False
    return place(req.unit, req.gang)


def check_schedulable(cfg: Any, offer: Offer | None = None,
                      parts: tuple[str, ...] = ("index", "gpu_tasks", "sweep")) -> list[Request]:  # fmt: skip
    """Refuse, before any work, a config with a request the cluster can never place; returns the
    requests (for logging). `offer` defaults to the running cluster's (`cluster_offer`)."""
    offer = offer or cluster_offer()
    has_gpus = offer.total("GPU") > 0
    reqs = requests_for(cfg, has_gpus, parts)
    for r in reqs:
        if not fits(r, offer):
            why = (
                "Ray may place the trials so that this waits forever"
                if r.held and fits(r._replace(held=None), offer)
                else "this can never be scheduled"
            )
            raise ResourceError(
                f"the config asks Ray for {r.describe()}, but the cluster offers {offer.describe()}: "
                f"{why}; {r.fix or 'lower the request'} or add nodes"
            )
    return reqs


# ---------------------------------------------------------------------------------------------
# GPU work off the driver


_CUDA_PROBE: dict[str, bool] = {}


def cluster_gpus_have_cuda() -> bool:
    """Whether the cluster's GPUs are CUDA devices (one probe task holding a GPU); False for
    logical GPUs (`num_gpus` on a CPU machine). Picks NCCL vs gloo for Ray Train."""
    if torch.cuda.is_available():
        return True
    if "v" not in _CUDA_PROBE:
        import ray

        @ray.remote(num_gpus=1, num_cpus=0)
        def probe() -> bool:
            import torch

            return torch.cuda.is_available()

        _CUDA_PROBE["v"] = bool(ray.get(probe.remote(), timeout=600))
    return _CUDA_PROBE["v"]


def offload_to_gpu_workers() -> bool:
    """True when this process holds no GPU of its own but the Ray cluster has GPUs: the LM work
    then goes to Ray tasks on GPU workers, and this process (the driver on a CPU head) loads no LM."""
    if process_device().type == "cuda":  # the driver on a GPU machine, or a worker holding a GPU
        return False
    if ray_gpu_ids():  # a worker holding a logical GPU (tests): it does the work itself
        return False
    return cluster_has_gpus()


def on_gpu_worker(fn: Callable[..., T], *args: Any, name: str | None = None, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a Ray task holding one GPU (and one CPU) when
    `offload_to_gpu_workers()`, else here. `fn` must load what it needs itself (the LM from its
    config): it runs in a fresh process."""
    if not offload_to_gpu_workers():
        return fn(*args, **kwargs)
    import ray

    unit = gpu_unit(True)  # the request `check_schedulable` checks ("GPU task")
    task = ray.remote(num_gpus=unit["GPU"], num_cpus=unit["CPU"], max_retries=1)(fn)
    label = name or getattr(fn, "__name__", "task")
    log.info("running %s on a GPU worker", label)
    return ray.get(task.options(name=label).remote(*args, **kwargs))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def check_free_space(path: Any, need_bytes: float, what: str) -> None:
    """Refuse to start when the file system holding `path` has less than `need_bytes` free."""
    import shutil
    from pathlib import Path

    p = Path(path).expanduser()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < need_bytes:
        raise ResourceError(
            f"{what} needs {human_bytes(need_bytes)} under {path} but only {human_bytes(free)} is free; "
            "free space, point workdir at a larger disk, or lower train.steps / train.batch_tokens / "
            "the number of hooks"
        )


def disk_plan(path: Any, items: list[tuple[str, float]], what: str, say: Any = None) -> int:
    """Print the sizes a stage is about to write under `path` (one line per item, then the total
    against the free space), and refuse at once, before anything is written, when the file system
    holding `path` has less free: a `ResourceError` (one line, exit status 2 from the CLI).
    Items already on disk are left out by the caller. Returns the bytes planned."""
    import shutil
    from pathlib import Path

    say = say or (lambda line: print(line, flush=True))
    need = int(sum(max(0, b) for _, b in items))
    p = Path(path).expanduser()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    for name, b in items:
        say(f"disk plan [{what}]: {name}: {human_bytes(b)}")
    say(f"disk plan [{what}]: {human_bytes(need)} to write under {path}, {human_bytes(free)} free")
    check_free_space(path, need, what)
    return need


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b))


def offer_from_cluster_yaml(path: Any, workers_only: bool = False) -> Offer:
    """The nodes a cluster config can bring up at its maximum: a Ray launcher YAML
    (`available_node_types`: head + `max_workers` of each type) or a KubeRay RayCluster / RayJob
    (head + `maxReplicas` of each worker group; CPUs from `num-cpus` or the container's limit,
    GPUs from `nvidia.com/gpu`). For checking a preset against a cluster before launching it."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    nodes: list[dict[str, float]] = []
    if "available_node_types" in doc:
        head = doc.get("head_node_type")
        for name, t in doc["available_node_types"].items():
            res = t.get("resources", {})
            shape = {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}
            count = 1 if name == head else int(t.get("max_workers", 0))
            if not (workers_only and name == head):
                nodes += [dict(shape) for _ in range(count)]
        return Offer(nodes, f"{Path(path).name} at max_workers")
    spec = doc.get("spec", {})
    spec = spec.get("rayClusterSpec", spec)

    def shape(group: dict[str, Any]) -> dict[str, float]:
        params = group.get("rayStartParams") or {}
        c = group["template"]["spec"]["containers"][0].get("resources", {})
        lim = {**c.get("requests", {}), **c.get("limits", {})}
        cpu = params.get("num-cpus", lim.get("cpu", 0))
        gpu = params.get("num-gpus", lim.get("nvidia.com/gpu", 0))
        return {
            "CPU": float(str(cpu).rstrip("m")) / (1000 if str(cpu).endswith("m") else 1),
            "GPU": float(gpu),
        }

    if not workers_only:
        nodes.append(shape(spec["headGroupSpec"]))
    for g in spec.get("workerGroupSpecs", []):
        nodes += [shape(g) for _ in range(int(g.get("maxReplicas", g.get("replicas", 0))))]
    return Offer(nodes, f"{Path(path).name} at maxReplicas")
