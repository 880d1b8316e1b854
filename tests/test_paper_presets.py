"""The paper presets end to end on CPU against the local Hugging Face Hub (tests/conftest.py,
ssae_ray/testing): the presets' real repo ids and code paths (transformers / sae-lens
`from_pretrained`, `datasets` streaming from the Hub, sentence-transformers' Contriever), shrunk only
in sizes by overrides (tokens, steps, widths through the fixtures) and moved off GPUs. Each job runs
as a subprocess, as `ray job submit` would run it, with HF_TOKEN for the gated google/gemma-2b.

Wall times measured on the 2-core development machine (shared, loaded) are in each test's docstring.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssae_ray.testing.hub_server import DEFAULT_TOKEN, environ_with_hub

ROOT = Path(__file__).resolve().parents[1]
# Off GPUs and onto the test machine: resources only (the preset's sizes are shrunk separately).
CPU = ["ray.address=null", "ray.num_cpus=2", "sweep.gpus_per_trial=0", "sweep.cpus_per_trial=1",
       "sweep.max_concurrent_trials=1", "train.num_workers=1", "model.device=cpu"]  # fmt: skip
# gemma-2b-res-jb and the pythia-70m-deduped releases resolve to fixture SAEs of width 256.
GEMMA = ["sae.d_sae=256", "model.batch_size=8", "retrieval.embed_batch_size=32", "retrieval.num_embed_actors=1",
         "retrieval.index_type=ivf", "retrieval.nlist=8", "retrieval.nprobe=8", "retrieval.train_sample=2000",
         "retrieval.shard_size=2000", "train.batch_tokens=256", "train.steps=6", "train.decay_steps=3",
         "train.checkpoint_every=3", "sweep.lams=[2,8]", "sweep.seeds=[0]", "eval.batch_size=8",
         "eval.val_tokens=512", "eval.bootstrap=50", "train.cache_shard_tokens=4096"]  # fmt: skip


def run_job(script: str, args: list[str], tmp_path: Path, hub_url: str, token: str | None = DEFAULT_TOKEN,
            timeout: int = 1800) -> tuple[subprocess.CompletedProcess, float]:  # fmt: skip
    env = environ_with_hub(hub_url, token=token, home=tmp_path / "hf")
    env["RAY_AUTH_MODE"] = "disabled"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    secs = time.perf_counter() - t0
    print(f"{script} {args[:2]}: {secs:.0f} s")
    return proc, secs


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.slow
def test_tinystories_term_end_to_end(local_hub, tmp_path):
    """tinystories-term on roneneldan/TinyStories-1M (GPT-Neo, real 8 layers) and roneneldan/TinyStories
    streamed from the Hub: ERM and TERM GSAEs of width 64 at blocks.7.hook_resid_post, the comparison
    report with CIs, figures and auto-interp (offline backend: Claude is unreachable here)."""
    work = tmp_path / "w"
    proc, _ = run_job("tinystories_term.py", [f"workdir={work}", "train.pretrain_tokens=20000",
                      "train.pretrain_steps=300", "eval.test_tokens=3000", "eval.bootstrap=50",
                      "corpus.sources.corpus.max_docs=400", "autointerp.backend=offline",
                      "autointerp.max_contexts=100"], tmp_path, local_hub.url, token=None)  # fmt: skip
    _ok(proc)
    report = next(work.glob("term/*/report.md"))
    m = json.loads((report.parent / "metrics.json").read_text())
    assert (
        m["hook"] == "blocks.7.hook_resid_post"
        and m["d_sae"] == 64
        and m["arms"] == {"ERM": 0.0, "TERM": 1e9}
    )
    stats = {r["stat"]: r for r in m["rows"]}
    assert {"error_p99", "error_max", "l0", "ce", "coverage", "tail_coverage"} <= set(stats)
    for r in stats.values():
        assert r["ERM_lo"] <= r["ERM"] <= r["ERM_hi"] or r["stat"] == "error_max"
    for f in (
        "fig22_error_distribution.png",
        "fig23_detection.png",
        "autointerp/report.md",
        "term_vs_erm.csv",
    ):
        assert (report.parent / f).is_file(), f
    corpus = next(work.glob("corpus/*/manifest.json"))
    prepared = json.loads(corpus.read_text())["prepared"]
    assert (
        prepared["test"]["source"] == "roneneldan/TinyStories"
        and prepared["test"]["source_split"] == "validation"
    )


def test_paper_dataset_errors_before_heavy_work(hub_online, tmp_path):
    """The paper presets' sources open against the Hub; a split that does not exist, a loading-script
    dataset without its Parquet revision and a missing dataset each fail in the pre-flight, before
    the LM is downloaded or anything is streamed."""
    from ssae_ray.config import load_config
    from ssae_ray.data import DataError
    from ssae_ray.data.corpus import preflight

    def cfg(preset: str, *extra: str):
        return load_config(preset, overrides=[f"workdir={tmp_path / 'w'}", *extra])

    for preset in ("paper-physics", "paper-toxicity", "pythia-70m-bib", "tinystories-term"):
        preflight(cfg(preset))
    with pytest.raises(DataError, match=r"corpus.sources.test: .* has no split 'validation'; its splits are \['train'\]"):
        preflight(cfg("paper-physics", "corpus.sources.test.split=validation"))
    with pytest.raises(DataError, match=r"corpus.sources.corpus: .*'Skylion007/openwebtext' is a loading script .*"
                                        r"`revision: refs/convert/parquet`"):  # fmt: skip
        preflight(cfg("paper-toxicity", "corpus.sources.corpus.revision=null"))
    with pytest.raises(DataError, match=r"corpus.sources.ood: cannot find the dataset 'AlgorithmicResearchGroup/nope'"):
        preflight(cfg("paper-physics", "corpus.sources.ood.path=AlgorithmicResearchGroup/nope"))
    with pytest.raises(DataError, match=r"no field 'text'; its fields are: question, answer"):
        preflight(cfg("paper-physics", "corpus.sources.ood.text_field=text"))
    assert not hub_online.fetched("google/gemma-2b") and not hub_online.fetched("TinyStories-1M")
    assert not (tmp_path / "w" / "corpus").exists()
