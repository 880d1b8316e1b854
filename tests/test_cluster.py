"""Cluster configs: the launcher YAML through Ray's own validation, the KubeRay manifests by structure."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = sorted(CLUSTER.glob("*.yaml"))
KUBERAY = sorted(p for p in (CLUSTER / "kuberay").glob("*.yaml") if p.name != "storage.yaml")
STORAGE = CLUSTER / "kuberay" / "storage.yaml"
RAY_MINOR = ".".join(ray.__version__.split(".")[:2])


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def prepared(path: Path) -> dict:
    """The config as `ray up` sees it: merged with the provider defaults, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load(path)))
    validate_config(config)
    return config


def test_launcher_configs_exist():
    assert [p.name for p in LAUNCHER] == ["aws-gpu.yaml", "gcp-gpu.yaml"]
    assert {p.name for p in KUBERAY} == {"raycluster.yaml", "rayjob.yaml"}
    assert STORAGE.is_file()


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path):
    config = prepared(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0  # a CPU head, no tasks
    assert workers and all(w["resources"]["GPU"] >= 1 and w["max_workers"] >= 1 for w in workers)
    node = workers[0]["node_config"]
    if config["provider"]["type"] == "aws":
        assert re.match(r"g[4-6]", node["InstanceType"])
    else:  # gcp: a GPU attached, and the VM stops (GPUs cannot live-migrate) on host maintenance
        assert config["provider"]["type"] == "gcp"
        assert node["guestAccelerators"][0]["acceleratorCount"] == workers[0]["resources"]["GPU"]
        assert {"onHostMaintenance": "TERMINATE"} in node["scheduling"]
        assert {"key": "install-nvidia-driver", "value": "True"} in node["metadata"]["items"]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_validation_is_real(path):
    """The validator rejects what `ray up` would reject, so a pass above means something."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = load(path) | {"dashboard_port": 8265}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = load(path) | {"head_node_type": "ray.head.missing"}
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_security(path):
    config = prepared(path)
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token ray start --address" in worker_start
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token, never in the file
    assert "RAY_AUTH_TOKEN=" not in path.read_text()
    # No extra inbound rules: the launcher opens only SSH and intra-cluster traffic (AWS), and no
    # firewall rule is added to the default network (GCP).
    assert "IpPermissions" not in config["provider"].get("security_group", {})
    assert "firewall" not in yaml.safe_dump(config["provider"]).lower()
    assert ".venv" in config["rsync_exclude"]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_installs_the_project(path):
    config = prepared(path)
    assert config["file_mounts"]["~/ssae-ray"] == "."
    assert any("ssae-ray[gpu]" in c and "torch==" in c for c in config["worker_setup_commands"])
    assert any("ssae-ray" in c for c in config["head_setup_commands"])
    images = [config["docker"]["head_image"], config["docker"]["worker_image"]]
    assert all(i.startswith(f"rayproject/ray:{RAY_MINOR}.") for i in images)
    assert config["docker"]["worker_image"].endswith("-gpu")


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_copies_the_hf_token_file_to_every_node(path):
    """HF_TOKEN reaches every node as the file `hf auth login` writes (huggingface_hub's default
    token path), mounted from the submitter's machine: never a literal in a committed file."""
    config = prepared(path)
    assert config["file_mounts"]["~/.cache/huggingface/token"] == "~/.cache/huggingface/token"
    text = path.read_text()
    assert "hf auth login" in text
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text) and not re.search(r"HF_TOKEN=\S", text)


def test_no_token_literal_in_committed_cluster_files_or_readme():
    for p in [*CLUSTER.rglob("*"), ROOT / "README.md"]:
        if p.is_file():
            assert not re.search(r"hf_[A-Za-z0-9]{20,}", p.read_text(errors="ignore")), p
    # a job's runtime_env is shown by the dashboard and `ray job list`: no token in it
    assert '"HF_TOKEN"' not in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("token", ["granted", "empty"])
def test_a_node_with_the_mounted_token_file_reads_gated_repos(local_hub, tmp_path, token):
    """What a node sees after `ray up`: $HOME/.cache/huggingface/token and no HF_TOKEN in the
    environment. huggingface_hub reads the file: the gated fixture repo opens with the granted
    token; with an empty file the product stops with its one-line HF_TOKEN error."""
    import os
    import subprocess
    import sys

    from ssae_ray.testing.hub_server import DEFAULT_TOKEN, environ_with_hub

    home = tmp_path / "node-home"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text(DEFAULT_TOKEN + "\n" if token == "granted" else "")
    env = environ_with_hub(local_hub.url)
    for k in ("HF_HOME", "HF_HUB_CACHE", "HF_TOKEN_PATH", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        env.pop(k, None)
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    code = "from huggingface_hub import hf_hub_download\n"
    if token == "empty":  # the product's pre-flight (imports torch: only where it is the point)
        code += "from ssae_ray.models import check_hub_access\ncheck_hub_access('google/gemma-2b')\n"
    code += "print(open(hf_hub_download('google/gemma-2b', 'config.json')).read()[:1])\n"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=os.fspath(tmp_path))  # fmt: skip
    if token == "granted":
        assert r.returncode == 0 and r.stdout.strip() == "{", r.stderr[-2000:]
    else:
        assert r.returncode != 0
        assert "HF_TOKEN" in r.stderr and f"{local_hub.url}/google/gemma-2b" in r.stderr
        assert DEFAULT_TOKEN not in r.stderr + r.stdout


# ---------------------------------------------------------------------------------------------
# KubeRay


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    out = [c for g in groups for c in g["template"]["spec"]["containers"]]
    if doc["kind"] == "RayJob":
        out += doc["spec"]["submitterPodTemplate"]["spec"]["containers"]
    return out


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_structure(path):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[path.name]
    spec = cluster_spec(doc)
    assert spec["rayVersion"].startswith(f"{RAY_MINOR}.")
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"
    gpu_groups = spec["workerGroupSpecs"]
    assert gpu_groups
    for g in gpu_groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    head_res = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_res["limits"]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_auth_and_exposure(path):
    doc = load(path)
    text = path.read_text()
    assert "LoadBalancer" not in text and "NodePort" not in text
    assert cluster_spec(doc)["headGroupSpec"]["serviceType"] == "ClusterIP"
    for c in containers(doc):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "ssae-ray-auth", "key": "auth_token"} and "value" not in env["RAY_AUTH_TOKEN"]
        for key in ("HF_TOKEN", "ANTHROPIC_API_KEY"):  # secrets come from Secrets, never literals
            assert key not in env or "value" not in env[key]


def test_rayjob_entrypoint_runs_the_physics_job():
    from ssae_ray.cli import build_parser
    from ssae_ray.config import load_config

    entry = load(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "/home/ray/ssae-ray/jobs/physics.py"]
    assert (ROOT / "jobs" / "physics.py").is_file()
    args = build_parser().parse_args(["physics", *entry[2:]])
    assert args.preset == "paper-physics"
    assert load_config(args.preset).sweep.gpus_per_trial >= 1


def test_dockerfile_matches_ray_and_installs_gpu_extra():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_MINOR)}\.\d+-py311-gpu$", text, re.M)
    assert 'pip install --no-cache-dir -e ".[gpu]"' in text
    images = {c["image"] for p in KUBERAY for c in containers(load(p))}
    assert len(images) == 1  # one image for head, workers and submitter


# ---------------------------------------------------------------------------------------------
# Storage every node sees (the work dir is one folder on every node: see ssae_ray/multinode.py)

WORK_IN_CONTAINER = (
    "/home/ray/.cache/ssae-ray"  # ~/.cache/ssae-ray of the `ray` user: every preset's work dir root
)


def shared_mounts(path: Path) -> list[tuple[str, str, str]]:
    """(what, host / volume, path in the Ray containers) for each shared storage the config mounts."""
    if path.suffix == ".yaml" and path.parent.name == "kuberay":
        doc = load(path)
        spec = cluster_spec(doc)
        out = []
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = g["template"]["spec"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                      if "persistentVolumeClaim" in v}  # fmt: skip
            for c in pod["containers"]:
                for m in c.get("volumeMounts", []):
                    if m["name"] in claims:
                        out.append(
                            (f"PVC {claims[m['name']]} ({c['name']})", claims[m["name"]], m["mountPath"])
                        )
        return out
    config = load(path)
    init = " ".join(config.get("initialization_commands", []))
    out = []
    for opt in config["docker"]["run_options"]:
        if opt.startswith("-v "):
            host, inside = opt[3:].split(":")[:2]
            mount = re.search(r"mount -t nfs4? -o \S+ (\S+) ([^\s)]+)", init)
            assert mount, init
            out.append((f"NFS {mount.group(1)} at {mount.group(2)}", host, inside))
    return out


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_mounts_shared_storage_at_the_work_dir_on_every_node(path):
    """EFS (AWS) / Filestore (GCP) NFS-mounted on every host before its container starts
    (`initialization_commands` run on head and workers alike), and bound into every container at
    ~/.cache/ssae-ray: the presets' default work dirs are on it, on every node."""
    config = prepared(path)
    ((what, host, inside),) = shared_mounts(path)
    nfs_target = what.split(" at ")[1]
    assert host.startswith(nfs_target + "/") and inside == WORK_IN_CONTAINER, (what, host, inside)
    init = " ".join(config["initialization_commands"])
    assert f"mkdir -p {host}" in init and f"chmod 1777 {host}" in init  # the container's user writes there
    assert "mountpoint -q" in init  # a rerun of `ray up` does not mount twice
    assert {"efs": "aws", "filestore": "gcp"}[nfs_target.split("/")[-1]] == config["provider"]["type"]
    # both node types (no per-type initialization_commands overriding the shared ones)
    for t in config["available_node_types"].values():
        assert "initialization_commands" not in t
    # the placeholders a user fills are named in the README's storage section
    readme = (ROOT / "README.md").read_text()
    placeholder = re.search(r"YOUR-[A-Z-]+", init).group(0)
    assert placeholder in readme
    from ssae_ray.config import load_config

    for preset in ("paper-physics", "paper-toxicity", "pythia-70m-bib"):
        wd = load_config(preset).workdir
        assert wd.startswith("~/.cache/ssae-ray"), (preset, wd)  # lands on the shared mount


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_every_ray_pod_mounts_the_read_write_many_claim(path):
    doc = load(path)
    spec = cluster_spec(doc)
    mounts = shared_mounts(path)
    ray_containers = [c["name"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
                      for c in g["template"]["spec"]["containers"]]  # fmt: skip
    assert sorted(m[0].split("(")[1][:-1] for m in mounts) == sorted(ray_containers)
    assert {(m[1], m[2]) for m in mounts} == {("ssae-ray-work", WORK_IN_CONTAINER)}
    assert "emptyDir: {sizeLimit" not in path.read_text()  # no node-local work dir left
    pvc = load(STORAGE)
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "ssae-ray-work"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "storage.yaml" in path.read_text()  # the manifest says to apply the claim first


def test_shared_storage_table():
    """What each shipped config mounts and where (printed: the table in docs/MULTINODE.md)."""
    rows = [(p.relative_to(ROOT), *m) for p in [*LAUNCHER, *KUBERAY] for m in shared_mounts(p)]
    assert len(rows) >= 2 + 2 * 2
    print("\n| config | storage | on the host / volume | in the Ray containers |\n| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
