"""Auto-interp on a real local Ray head node: async actors against a local Messages API server,
a shared limiter and cache, a rerun that makes no requests, and a crashed actor's work redone."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from autointerp_fixtures import HOOK, KEY, ai_config, make_texts, sparse_sae, tiny_lm
from fake_anthropic_server import FakeAnthropic

from ssae_ray.autointerp import run_autointerp
from ssae_ray.autointerp.actors import score_local, score_on_ray
from ssae_ray.autointerp.client import Secret
from ssae_ray.autointerp.run import build_jobs

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lm = tiny_lm(tmp_path_factory.mktemp("ai_ray_lm"))
    texts = make_texts(40)
    return lm, texts, {"gsae": sparse_sae(lm, texts, seed=0), "ssae": sparse_sae(lm, texts, seed=1)}


def test_ray_actors_end_to_end_then_all_cached(ray_local, setup, tmp_path, monkeypatch):
    lm, texts, saes = setup
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    with FakeAnthropic(latency_s=0.05) as server:
        server.faults.extend([429, 529])
        cfg = ai_config(tmp_path, backend="claude", base_url=server.url)
        out = run_autointerp(cfg, lm, saes, HOOK, texts, tmp_path / "out", use_ray=True)
        df = pd.read_parquet(out / "results.parquet")
        assert len(df) == 16 and (df.status == "ok").all(), df[["status", "error"]]
        assert server.requests == 3 * 16 + 2 and server.api_keys == {KEY}
        assert server.max_in_flight > 1  # features really ran concurrently across the actors
        paid = server.requests
        out2 = run_autointerp(cfg, lm, saes, HOOK, texts, tmp_path / "out2", use_ray=True)
        assert server.requests == paid  # a rerun makes zero requests
        df2 = pd.read_parquet(out2 / "results.parquet")
        assert df2.f1.tolist() == df.f1.tolist() and (df2.cached_calls == 3).all()


def test_crashed_actor_work_is_redone_from_cache(ray_local, setup, tmp_path):
    lm, texts, saes = setup
    with FakeAnthropic(latency_s=0.05) as server:
        cfg = ai_config(tmp_path, backend="claude", base_url=server.url, num_actors=2, max_concurrency=3)
        jobs, _ = build_jobs(cfg, lm, {"gsae": saes["gsae"]}, HOOK, texts, tmp_path / "out")
        marker = tmp_path / "crashed"
        rows, _ = score_on_ray(jobs, cfg.autointerp, Secret(KEY), tmp_path / "cache.sqlite", 2, str(marker))
        assert marker.exists()  # an actor did die (os._exit) after two features
        assert [r["status"] for r in rows] == ["ok"] * len(jobs)
        # At most the calls in flight on the dead actor are paid twice; all finished ones come from the cache.
        unique = 3 * len(jobs)
        assert unique <= server.requests <= unique + 3
        paid = server.requests
        again, _ = score_local(jobs, cfg.autointerp, Secret(KEY), tmp_path / "cache.sqlite")
        assert server.requests == paid
        assert [r["f1"] for r in again] == [r["f1"] for r in rows]
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    for p in logs.rglob("*"):
        if p.is_file():
            assert b"SECRET123" not in p.read_bytes(), p  # the key passed to the actors is never logged


def test_spend_cap_on_ray_stops_cleanly(ray_local, setup, tmp_path):
    lm, texts, saes = setup
    with FakeAnthropic(latency_s=0.05) as server:
        cfg = ai_config(
            tmp_path, backend="claude", base_url=server.url, spend_cap_tokens=5000, max_concurrency=1
        )
        jobs, _ = build_jobs(cfg, lm, saes, HOOK, texts, tmp_path / "out")
        rows, stats = score_on_ray(jobs, cfg.autointerp, Secret(KEY), tmp_path / "cache.sqlite")
        status = [r["status"] for r in rows]
        assert "ok" in status and "spend_cap" in status and set(status) <= {"ok", "spend_cap"}
        assert "spend cap of 5,000 tokens" in stats["stopped"]
        assert stats["input_tokens"] + stats["output_tokens"] <= 5000
