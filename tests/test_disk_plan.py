"""Disk plans before large writes (refused on a small tmpfs before anything is written) and
activation-cache keys that the CPU driver and a GPU task compute alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssae_ray.resources import ResourceError, disk_plan


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root in a private mount namespace, as tests run here); skipped elsewhere."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_disk_plan_prints_sizes_and_refuses_in_one_line(small_disk, capsys):
    from ssae_ray.cli import user_error

    assert disk_plan(small_disk, [("a", 1000), ("b", 2000)], "small write") == 3000
    out = capsys.readouterr().out
    assert "disk plan [small write]: a: 1.0 KB" in out and "3.0 KB to write under" in out
    with pytest.raises(ResourceError) as e:
        disk_plan(small_disk / "work", [("embeddings", 10**9)], "the index")
    msg = str(e.value)
    assert "\n" not in msg and "the index needs 1.0 GB" in msg and "free" in msg
    assert user_error(e.value)  # the CLI prints it as one line and exits 2
    assert _files(small_disk) == []


def test_index_build_refused_on_a_small_disk_before_any_write(small_disk, tmp_path, capsys):
    """A corpus whose passages, embeddings and BM25 postings do not fit the work dir's file
    system: `build_index` prints the plan and refuses before creating anything under index/."""
    from ssae_ray.config import load_config
    from ssae_ray.retrieval.index import build_index

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    words = "energy momentum charge river city market king queen music painting".split()
    rows = [{"id": f"d{i}", "text": " ".join(words[(i + j) % 10] for j in range(300))} for i in range(400)]
    pq.write_table(pa.Table.from_pylist(rows), corpus_dir / "corpus.parquet")
    (small_disk / "work").mkdir()
    (tmp_path / "models").mkdir()
    (small_disk / "work" / "models").symlink_to(tmp_path / "models")  # the retriever lives elsewhere
    cfg = load_config("tiny", overrides=[f"workdir={small_disk / 'work'}"])
    before = _files(small_disk)
    with pytest.raises(ResourceError, match="needs .* but only .* is free"):
        build_index(cfg, corpus_dir)
    out = capsys.readouterr().out
    assert "disk plan [index:" in out and "embeddings (float32)" in out and "BM25 postings" in out
    assert _files(small_disk) == before and not (small_disk / "work" / "index").exists()


_KEY_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, os, sys
    os.environ.pop("SSAE_RAY_AUTO_PRECISION", None)
    import ray
    from ssae_ray import precision as prec
    from ssae_ray.config import load_config
    from ssae_ray.models import load_lm
    from ssae_ray.training.cache import cache_activations, cache_key, cache_plan

    def fake(native):
        prec.bf16_support.cache_clear()
        prec._native_bf16 = lambda device: native
        prec._matmul_speedup = lambda device, **k: 4.0

    root = sys.argv[1]
    cfg = load_config("tiny", overrides=[f"workdir={root}/work", "model.precision=auto", "train.steps=4",
                                         "train.batch_tokens=64"])
    texts = [f"Text {i}: the electron field and the photon interact, wave {i % 7}." * 3 for i in range(40)]
    hooks = list(cfg.sae.hooks)

    @ray.remote(num_gpus=1)
    def capture_on_gpu(texts, max_tokens):
        fake(True)  # the GPU task: auto resolves to bf16 there
        import ray as r
        lm = load_lm(cfg.model, f"{root}/models")
        path = cache_activations(cfg, lm, texts, hooks, max_tokens, progress=False)
        return {"gpus": r.get_gpu_ids(), "key": cache_key(cfg, texts, hooks, max_tokens), "path": str(path),
                "resolved": prec.resolve("auto", "cpu").name, "old_key_part": list(prec.key_part("auto")),
                "manifest": json.loads(open(f"{path}/manifest.json").read())}

    fake(False)  # the CPU driver: no native bf16, auto resolves to fp32 here
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    tok = load_lm(dataclasses.replace(cfg.model, precision="fp32"), f"{root}/models").tokenizer
    d_in = {h: 64 for h in hooks}
    plan = cache_plan(cfg, texts, hooks, d_in, tok)
    task = ray.get(capture_on_gpu.remote(plan.texts, plan.max_tokens), timeout=300)
    again = cache_plan(cfg, texts, hooks, d_in, tok)
    ray.shutdown()
    print(json.dumps({"driver_resolved": prec.resolve("auto", "cpu").name,
                      "driver_old_key_part": list(prec.key_part("auto")),
                      "before": [plan.cached, str(plan.path), plan.bytes],
                      "after": [again.cached, str(again.path)],
                      "driver_key": cache_key(cfg, plan.texts, hooks, plan.max_tokens), "task": task}))
    """
)


@pytest.mark.ray
@pytest.mark.slow
def test_cache_planned_on_the_driver_is_found_by_the_gpu_tasks_key(tmp_path):
    """The driver (CPU, auto -> fp32) plans the activation cache; a Ray task holding a logical GPU
    (auto -> bf16 there) builds it; the driver's second plan finds it at the same path and asks no
    disk for it. With the old key (precision resolved on the caller) the two keys differed."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("SSAE_RAY_AUTO_PRECISION", None)
    out = subprocess.run([sys.executable, "-c", _KEY_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    task = got["task"]
    assert len(task["gpus"]) == 1  # really ran holding the (logical) GPU
    assert got["driver_resolved"] == "fp32" and task["resolved"] == "bf16"
    assert got["driver_old_key_part"] != task["old_key_part"]  # the old keys would not have matched
    assert got["driver_key"] == task["key"] and task["manifest"]["precision"] == "bf16"
    assert got["before"][0] is False and got["before"][1] == task["path"] and got["before"][2] > 0
    assert got["after"] == [True, task["path"]]
