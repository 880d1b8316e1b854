"""Auto-interp: marking, F1, strict parsing, the rate limiter, streaming examples, and the real
`anthropic` SDK end to end against a local Messages API server (retries, cache, malformed
answers, spend cap, no key in logs / MLflow / artifacts), without Ray."""

from __future__ import annotations

import json
import logging
import sqlite3
import time

import pandas as pd
import pytest
import torch
from autointerp_fixtures import HOOK, KEY, ai_config, make_texts, sparse_sae, tiny_lm
from fake_anthropic_server import FakeAnthropic

from ssae_ray.autointerp import AutoInterpError, f1_score, mark, render, run_autointerp
from ssae_ray.autointerp.examples import (
    diversity_pool,
    escape_delimiters,
    feature_acts,
    feature_examples,
    scan,
    scan_many,
)
from ssae_ray.autointerp.prompts import (
    ParseError,
    diversity_prompt,
    interpreter_prompt,
    parse_diversity,
    parse_explanation,
    parse_predictions,
    predictor_prompt,
)
from ssae_ray.autointerp.ratelimit import RateLimiter
from ssae_ray.config import ConfigError
from ssae_ray.models import tokenize_docs


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("ai_lm"))


@pytest.fixture(scope="module")
def texts():
    return make_texts(40)


@pytest.fixture(scope="module")
def saes(lm, texts):
    return {"gsae": sparse_sae(lm, texts, seed=0), "ssae": sparse_sae(lm, texts, seed=1)}


@pytest.fixture
def server():
    with FakeAnthropic() as s:
        yield s


@pytest.fixture
def claude_env(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_mark_hand_made_pattern():
    pieces = ["The", " quick", " brown", " fox", " jumps", " over", " it"]
    active = [False, True, True, False, True, False, True]
    assert mark(pieces, active) == "The <<quick brown>> fox <<jumps>> over <<it>>"
    assert mark(pieces, [True] * 7) == "<<The quick brown fox jumps over it>>"
    assert mark(pieces, [False] * 7) == "The quick brown fox jumps over it"
    assert mark(["a", " ", "b"], [False, True, False]) == "a<< >>b"
    assert mark(["a", "\n\n", "b"], [False, True, False]) == "a<<\\n\\n>>b"  # visible after one-lining


def test_delimiters_in_corpus_text_are_escaped():
    """`<<` / `>>` in the text (C++ streams, bit shifts, quotes) never look like activation marks."""
    import re

    pieces = ["std::cout ", "<<", " x ", ">>", " y; a <<<", "b", ">>> c <", "d", "> e"]
    active = [False, True, False, False, False, True, False, True, False]
    out = mark(pieces, active)
    assert out == "std::cout << < < >> x > > y; a < < < <<b>> > > > c < <<d>> > e", out
    spans = re.findall(r"<<(.+?)>>", out)
    assert [s.strip() for s in spans] == ["< <", "b", "d"]  # exactly the three active runs
    plain = "a << b >> c <<< d"
    assert escape_delimiters(plain) == "a < < b > > c < < < d"
    assert "<<" not in escape_delimiters(plain) and ">>" not in escape_delimiters(plain)
    prompt = interpreter_prompt([out], "physics")
    assert re.findall(r"<<(.+?)>>", prompt.messages[-1][1]) == spans


def test_render_decodes_runs(lm):
    ids = lm.tokenizer("the quantum field of the electron", add_special_tokens=False)["input_ids"]
    on = [False] * len(ids)
    on[1] = True
    text = render(lm.tokenizer, ids, on)
    assert text.replace("<<", "").replace(">>", "") == lm.tokenizer.decode(ids)
    assert text.count("<<") == 1 and "<<" + lm.tokenizer.decode([ids[1]]).strip() + ">>" in text


def test_f1_hand_made():
    s = f1_score([1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0])  # tp 2, fp 1, fn 1, tn 2
    assert s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 / 3) and s.accuracy == pytest.approx(4 / 6)
    assert f1_score([1, 1, 1, 1], [1, 1, 0, 0]).f1 == pytest.approx(2 / 3)
    assert f1_score([0, 0, 0], [1, 0, 1]) == (0.0, 0.0, 0.0, pytest.approx(1 / 3))
    assert f1_score([1, 0], [1, 0]).f1 == 1.0
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        f1_score([1, 0], [1, 0, 1])


def test_parsers_are_strict():
    assert parse_predictions("[1,0,1]", 3) == [1, 0, 1]
    assert parse_predictions(" [1, 0]\n", 2) == [1, 0]
    assert parse_predictions("```python\n[0, 1]\n```", 2) == [0, 1]
    for bad in (
        "[1,0]",
        "[1, 2, 0]",
        "Answer: [1,0,1]",
        "1,0,1",
        "[True, False, 1]",
        "[1, 0, 1",
        "",
        "(1,0,1)",
    ):
        with pytest.raises(ParseError):
            parse_predictions(bad, 3)
    assert parse_explanation("Reasoning...\n\n[EXPLANATION]: Idioms.\n") == "Idioms."
    for bad in ("[EXPLANATION]: Idioms.\nMore text", "no marker", "[EXPLANATION]:   ", ""):
        with pytest.raises(ParseError):
            parse_explanation(bad)
    assert parse_diversity("Unified explanation:\nx\n\nDiversity Score: 42\n\nJustification: y") == 42
    assert parse_diversity("Diversity Score: [7]") == 7
    for bad in (
        "Diversity Score: 0",
        "Diversity Score: 101",
        "no score",
        "Diversity Score: 5\nDiversity Score: 6",
    ):
        with pytest.raises(ParseError):
            parse_diversity(bad)


def test_prompts_follow_the_paper():
    p = interpreter_prompt(["a <<b>> c"], "physics text")
    assert "<<just like this>>" in p.system and "physics text" in p.system
    assert p.messages[0][1].startswith("Example 1: and he was <<over the moon>>")  # Box 5 few-shot
    assert p.messages[-1] == ("user", "Example 1: a <<b>> c")
    q = predictor_prompt("the token b", ["x  y\nz", "w"])
    assert "valid Python list" in q.system and q.messages[1] == ("assistant", "[1,1,1,1,1]")  # Box 7
    assert (
        q.messages[-1][1]
        == "Feature explanation: the token b\nText examples:\nExample 0: x y z\nExample 1: w"
    )
    d = diversity_prompt(["one", "two"], "physics text")
    assert "1. one\n2. two" in d.messages[0][1] and "1-20: Very low diversity" in d.messages[0][1]


def test_rate_limiter_buckets_and_cap():
    now = [0.0]
    lim = RateLimiter(60, 1000, spend_cap_tokens=2500, clock=lambda: now[0])
    for _ in range(5):
        assert lim.acquire(100, 100) == (
            0.0,
            None,
            None,
        )  # 5 requests, 1000 tokens: the token bucket is empty
    g = lim.acquire(100, 100)
    assert g.stop is None and g.wait_s == pytest.approx(200 * 60 / 1000)
    for _ in range(5):
        lim.settle(100, 100, 50, 10)  # real usage below the estimate refunds the token bucket
    now[0] += 1.0
    assert lim.acquire(100, 100).wait_s == 0.0
    lim.settle(100, 100, 2000, 100)  # 2400 spent: the next call could pass the 2500-token cap
    g = lim.acquire(100, 100)
    assert g.stop and "spend cap of 2,500 tokens" in g.stop
    assert lim.acquire(1, 1).stop == g.stop and g.kind == "spend_cap"  # the stop is sticky
    assert lim.stats()["input_tokens"] == 2250
    rpm = RateLimiter(2, 10**6, clock=lambda: now[0])
    assert rpm.acquire(1, 1).wait_s == 0 and rpm.acquire(1, 1).wait_s == 0
    assert rpm.acquire(1, 1).wait_s == pytest.approx(30.0)


def _client(server, tmp_path, name="c", **kw):
    from ssae_ray.autointerp.cache import ResponseCache
    from ssae_ray.autointerp.client import ClaudeClient, Secret

    lim = RateLimiter(10_000, 10**8)
    return ClaudeClient(
        "claude-test", Secret(KEY), lim, ResponseCache(tmp_path / f"{name}.sqlite"), server.url, **kw
    )


def test_client_honours_retry_after_and_retries_timeouts(tmp_path, caplog):
    import asyncio

    import anthropic

    from ssae_ray.autointerp.client import retry_after

    assert retry_after({"retry-after-ms": "250"}) == 0.25 and retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0 and retry_after({}) is None
    prompt = predictor_prompt("x", ["a"])
    with FakeAnthropic() as server:
        server.faults.append((429, "0.4"))
        client = _client(server, tmp_path, retry_base_s=10.0)  # the backoff would be 5-15 s: retry-after wins
        t0 = time.perf_counter()
        answer = asyncio.run(client.complete(prompt))
        assert 0.4 <= time.perf_counter() - t0 < 3.0
        assert answer.requests == 2 and not answer.cached and server.requests == 2
    with FakeAnthropic(latency_s=1.5) as slow:
        client = _client(slow, tmp_path, "c2", timeout_s=0.5, max_retries=1, retry_base_s=0.01)
        t0 = time.perf_counter()
        with pytest.raises(anthropic.APITimeoutError):
            asyncio.run(client.complete(prompt))
        assert time.perf_counter() - t0 >= 1.0  # two 0.5 s timeouts
        assert "APITimeoutError, retry 1/1" in caplog.text  # one retry, then the error surfaces


# ---------------------------------------------------------------------------------------------
# Examples


def test_streaming_scan_matches_dense(lm, saes, texts):
    sae = saes["gsae"]
    ctx = tokenize_docs(lm.tokenizer, texts, 32)
    idx = scan(lm, sae, HOOK, ctx, k_top=4, k_sample=6, batch_size=7, progress=False)
    dense = feature_acts(lm, sae, HOOK, ctx).cpu()  # [N, T, F], position 0 and padding zeroed
    assert dense[:, 0].abs().sum() == 0
    ctx_max = dense.amax(1)  # [N, F]
    active = ctx_max > 0
    assert torch.equal(idx.n_active_ctx, active.sum(0))
    assert torch.equal(idx.n_active_tok, (dense > 0).sum((0, 1)))
    assert idx.n_tokens == int(ctx.attention_mask[:, 1:].sum())
    c, f = active.nonzero(as_tuple=True)
    assert torch.equal(idx.pairs, (c * sae.W_dec.shape[0] + f).sort().values)
    for feat in range(sae.W_dec.shape[0]):
        k = min(4, int(active[:, feat].sum()))
        ref = ctx_max[:, feat].topk(k).values
        assert torch.allclose(idx.top_acts[feat, :k], ref, atol=1e-6)
        assert torch.allclose(ctx_max[idx.top_ctx[feat, :k], feat], ref, atol=1e-6)
        sample = idx.sample_ctx[feat][idx.sample_ctx[feat] >= 0]
        assert len(sample) == min(6, int(active[:, feat].sum())) and bool(active[sample, feat].all())
        acts = idx.sample_acts[feat][: len(sample)]  # each sampled context's max activation
        assert torch.allclose(acts, ctx_max[sample, feat], atol=1e-6)
        # diversity sets draw from the top half of the activating contexts (appendix N.6)
        pool = diversity_pool(idx, feat)
        assert pool and all(
            ctx_max[c, feat] >= ctx_max[sample, feat].double().quantile(0.5) - 1e-6 for c in pool
        )
    assert 0 < int((idx.n_active_ctx > 0).sum())
    # Several SAEs in one pass (one LM forward per batch) give each SAE the same index as alone.
    both = scan_many(
        lm, {"a": (sae, HOOK), "b": (saes["ssae"], HOOK)}, ctx, 4, 6, batch_size=7, progress=False
    )
    alone = scan(lm, saes["ssae"], HOOK, ctx, 4, 6, batch_size=7, progress=False)
    assert torch.equal(both["a"].top_ctx, idx.top_ctx) and torch.equal(both["a"].pairs, idx.pairs)
    assert torch.equal(both["b"].top_acts, alone.top_acts) and torch.equal(
        both["b"].n_active_ctx, alone.n_active_ctx
    )


def test_bf16_scan_top_activations_within_bf16_error_of_fp32(lm, saes, texts, auto_bf16):
    """`precision=auto` resolved to bf16 (forced where emulated): every feature's top activations
    (sorted, so near-ties may swap contexts) within the bf16 bound of the fp32 scan, through the two
    layers to the hook; the SAE itself runs in fp32."""
    from ssae_ray.testing.precision import assert_bf16_close

    ctx = tokenize_docs(lm.tokenizer, texts, 32)
    idx32 = scan(lm, saes["gsae"], HOOK, ctx, k_top=4, k_sample=6, batch_size=7, progress=False)
    idx16 = scan(lm._replace(precision=auto_bf16), saes["gsae"], HOOK, ctx, k_top=4, k_sample=6, batch_size=7,
                 progress=False)  # fmt: skip
    assert idx16.n_tokens == idx32.n_tokens
    assert_bf16_close(idx16.top_acts.clamp_min(0), idx32.top_acts.clamp_min(0), 2 * 6, "top activations")


def test_diversity_pool_is_the_top_half_of_a_uniform_sample():
    from ssae_ray.autointerp.examples import ActivationIndex

    inf = float("inf")
    idx = ActivationIndex(
        None, None, None, torch.tensor([[5, 2, 9, 7, -1]]), torch.tensor([4]), None, None, 0,
        torch.tensor([[1.0, 4.0, 3.0, 0.5, -inf]]),
    )  # fmt: skip
    assert diversity_pool(idx, 0) == [2, 9]  # max acts 4.0 and 3.0: the upper half of {1, 4, 3, 0.5}
    assert diversity_pool(idx, 0, {2}) == [9]


def test_feature_examples_labels_and_seed(lm, saes, texts):
    sae = saes["gsae"]
    ctx = tokenize_docs(lm.tokenizer, texts, 32)
    idx = scan(lm, sae, HOOK, ctx, k_top=5, k_sample=5 + 3 + 2 * 5, progress=False)  # as build_jobs sizes it
    counts = idx.n_active_ctx
    dead = int((counts == 0).nonzero()[0]) if (counts == 0).any() else None
    alive = [int(f) for f in (counts >= 10).nonzero().flatten()[:4]]
    feats = alive + ([dead] if dead is not None else [])
    kw = dict(n_top=5, n_predict=3, window=12, seed=3, sample_sets=1)
    exs = feature_examples(lm, sae, HOOK, idx, feats, **kw)
    again = feature_examples(lm, sae, HOOK, idx, feats, **kw)
    assert exs == again  # seeded
    for ex in exs[: len(alive)]:
        assert ex.status == "ok" and len(ex.top_texts) == 5
        assert all("<<" in t and ">>" in t for t in ex.top_texts)
        assert ex.top_acts == sorted(ex.top_acts, reverse=True)
        assert sorted(ex.predict_labels) == [0, 0, 0, 1, 1, 1]
        assert all("<<" not in t for t in ex.predict_texts)
        assert ex.active_tokens
        # the top half of the sample, minus the Predictor positives, at most n_top
        pool = diversity_pool(idx, ex.feature)
        assert (
            len(ex.sample_sets) == 1
            and 1 <= len(ex.sample_sets[0]) <= 5
            and len(pool) >= len(ex.sample_sets[0])
        )
        assert all("<<" in t for t in ex.sample_sets[0])
    if dead is not None:
        assert exs[-1].status == "dead" and exs[-1].top_texts == []


# ---------------------------------------------------------------------------------------------
# Claude backend end to end (the real SDK against a local server), in-process


def test_claude_end_to_end_retries_then_cache(lm, saes, texts, server, claude_env, tmp_path):
    cfg = ai_config(tmp_path, backend="claude", base_url=server.url)
    server.faults.extend([429, 529, 503])
    out = run_autointerp(cfg, lm, saes, HOOK, texts, tmp_path / "out", use_ray=False)
    df = pd.read_parquet(out / "results.parquet")
    assert set(df.sae) == {"gsae", "ssae"} and len(df) == 16
    assert (df.status == "ok").all(), df[["status", "error"]]
    assert (df.backend == "claude").all() and (df.model == cfg.autointerp.model).all()
    for r in df.itertuples():
        assert r.f1 == pytest.approx(f1_score(list(r.predictions), list(r.labels)).f1)
        assert r.explanation.startswith("The tokens") and 1 <= r.diversity <= 100
    calls = 3 * 16
    assert server.requests == calls + 3 and int(df.requests.sum()) == calls + 3  # 3 retried faults
    assert server.kinds == {"interpreter": 16, "predictor": 16, "diversity": 16}
    assert server.api_keys == {KEY}
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["usage"]["calls"] == calls + 3
    for name in ("f1_gsae.png", "f1_ssae.png", "f1_comparison.png", "report.md", "features_gsae.parquet"):
        assert (out / name).stat().st_size > 0
    assert len(pd.read_parquet(out / "features_gsae.parquet")) == 128

    before = server.requests
    out2 = run_autointerp(cfg, lm, saes, HOOK, texts, tmp_path / "out2", use_ray=False)
    assert server.requests == before  # all cached: zero requests
    df2 = pd.read_parquet(out2 / "results.parquet")
    assert (df2.cached_calls == 3).all() and df2.requests.sum() == 0
    assert df2.f1.tolist() == df.f1.tolist()


def test_malformed_predictor_is_retried_then_failed(lm, saes, texts, server, claude_env, tmp_path):
    cfg = ai_config(tmp_path, backend="claude", base_url=server.url, max_features=2, parse_retries=2)
    server.malformed_predictor = True
    out = run_autointerp(cfg, lm, {"gsae": saes["gsae"]}, HOOK, texts, tmp_path / "out", use_ray=False)
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "failed").all()
    assert df.f1.isna().all() and df.predictions.isna().all()  # never guessed
    assert df.error.str.contains("predictor: the Predictor answer is not a Python list").all()
    assert df.raw_answer.str.startswith("I believe").all()
    assert server.kinds == {"interpreter": 2, "predictor": 6}  # 1 ask + 2 re-asks per feature
    assert "failed" in (out / "report.md").read_text().lower()


def test_diversity_from_sampled_sets_box8_box9(lm, saes, texts, server, claude_env, tmp_path):
    cfg = ai_config(tmp_path, backend="claude", base_url=server.url, max_features=2, diversity_sets=2)
    out = run_autointerp(cfg, lm, {"gsae": saes["gsae"]}, HOOK, texts, tmp_path / "out", use_ray=False)
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all() and (df.n_explanations == 3).all()
    assert df.unified_explanation.notna().all() and df.diversity.between(1, 100).all()
    # per feature: top-example explanation + 2 sampled sets, Predictor, Box 8 unify, Box 9 diversity
    assert server.kinds == {"interpreter": 6, "predictor": 2, "other": 2, "diversity": 2}


def test_spend_cap_stops_cleanly_and_keeps_work(lm, saes, texts, server, claude_env, tmp_path, caplog):
    # About 3 features' worth of tokens (a feature is 3 calls of ~300-700 reserved tokens).
    cfg = ai_config(tmp_path, backend="claude", base_url=server.url, spend_cap_tokens=5000, max_concurrency=1,
                    num_actors=1)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="ssae_ray"):
        out = run_autointerp(cfg, lm, {"gsae": saes["gsae"]}, HOOK, texts, tmp_path / "out", use_ray=False)
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] is False and "spend cap of 5,000 tokens" in man["stopped"]
    assert man["usage"]["input_tokens"] + man["usage"]["output_tokens"] <= 5000
    assert "stopped early" in caplog.text and "spend cap" in caplog.text
    assert "Stopped early: spend cap" in (out / "report.md").read_text()
    df = pd.read_parquet(out / "results.parquet")
    done = df[df.status == "ok"]
    assert 0 < len(done) < 8 and set(df.status) == {"ok", "spend_cap"}
    # Nothing lost: a rerun without a cap replays finished calls from the cache and pays only the rest.
    paid = server.requests
    cfg2 = ai_config(tmp_path, backend="claude", base_url=server.url)
    out2 = run_autointerp(cfg2, lm, {"gsae": saes["gsae"]}, HOOK, texts, tmp_path / "out2", use_ray=False)
    df2 = pd.read_parquet(out2 / "results.parquet")
    assert (df2.status == "ok").all()
    assert server.requests - paid == 3 * 8 - int(df2.cached_calls.sum())
    assert int(df2.cached_calls.sum()) >= 3 * len(done)
    assert df2.set_index("feature").loc[done.feature, "f1"].tolist() == done.f1.tolist()


def test_api_key_never_in_logs_mlflow_or_artifacts(
    lm, saes, texts, server, claude_env, tmp_path, caplog, monkeypatch
):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    mlflow.set_experiment("ai-test")
    cfg = ai_config(tmp_path, backend="claude", base_url=server.url, max_features=3)
    server.faults.extend([429, 500])
    try:
        with (
            caplog.at_level(logging.DEBUG),
            caplog.at_level(logging.DEBUG, logger="anthropic"),  # the SDK's request logging too
            # the HTTP transport's request lines: anthropic 2.x sends through `httpx2`, 0.x through `httpx`
            caplog.at_level(logging.DEBUG, logger="httpx"),
            caplog.at_level(logging.DEBUG, logger="httpx2"),
            caplog.at_level(logging.DEBUG, logger="httpcore"),
            caplog.at_level(logging.DEBUG, logger="httpcore2"),
            mlflow.start_run() as run,
        ):
            out = run_autointerp(
                cfg, lm, {"gsae": saes["gsae"]}, HOOK, texts, tmp_path / "out", use_ray=False
            )
    finally:
        mlflow.set_tracking_uri(None)
    assert server.api_keys == {KEY}  # the key was sent...
    assert "retry" in caplog.text and len(caplog.records) > 5
    names = {r.name.split(".")[0] for r in caplog.records}
    assert {"anthropic", "ssae_ray"} <= names, names  # every logger that could leak was heard:
    assert names & {"httpx", "httpx2"} and names & {"httpcore", "httpcore2"}, names  # the transport's too
    assert "SECRET123" not in caplog.text  # ...but never logged
    client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").as_uri())
    data = client.get_run(run.info.run_id).data
    assert data.params["autointerp.backend"] == "claude" and "autointerp/gsae/f1_mean" in data.metrics
    assert "SECRET123" not in json.dumps(data.params) + json.dumps(data.tags)
    files = [p for p in (tmp_path / "mlruns").rglob("*") if p.is_file()] + [
        p for p in out.rglob("*") if p.is_file()
    ]
    assert any(p.name == "results.parquet" for p in (tmp_path / "mlruns").rglob("*"))
    for p in files + [tmp_path / "cache.sqlite"]:
        assert b"SECRET123" not in p.read_bytes(), p
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 9


def test_offline_backend_is_labelled(lm, saes, texts, tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    cfg = ai_config(tmp_path, backend="offline")
    out = run_autointerp(
        cfg, lm, saes, None, texts, tmp_path / "out", use_ray=False
    )  # hooks from SAE metadata
    df = pd.read_parquet(out / "results.parquet")
    assert (df.backend == "offline").all() and (df.status == "ok").all()
    assert df.explanation.str.startswith("[offline keyword baseline]").all()
    assert df.f1.between(0, 1).all() and df.f1.mean() > 0.3
    text = (out / "report.md").read_text()
    assert "offline keyword baseline (not Claude)" in text and "not the paper's scores" in text
    man = json.loads((out / "manifest.json").read_text())
    assert man["backend_label"] == "offline keyword baseline (not Claude)" and man["complete"]
    assert man["hooks"] == {"gsae": HOOK, "ssae": HOOK}


def test_clear_errors(lm, saes, texts, tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(AutoInterpError, match="ANTHROPIC_API_KEY"):
        run_autointerp(ai_config(tmp_path, backend="claude"), lm, saes, HOOK, texts, tmp_path / "o")
    with pytest.raises(ConfigError, match="autointerp.backend=gpt: must be one of claude, offline"):
        ai_config(tmp_path, backend="gpt")  # refused when the config is loaded, before any work
    with pytest.raises(AutoInterpError, match=r"\[999\] are outside SAE 'gsae' \(width 128\)"):
        run_autointerp(ai_config(tmp_path, features=[1, 999]), lm, saes, HOOK, texts, tmp_path / "o")
    from ssae_ray.saes import make_random_sae

    wrong = {"wide": make_random_sae(32, 16, HOOK)}
    with pytest.raises(AutoInterpError, match="SAE 'wide' has d_in 32 but the LM's d_model is 64"):
        run_autointerp(ai_config(tmp_path), lm, wrong, None, texts, tmp_path / "o")
    with pytest.raises(AutoInterpError, match="no test text"):
        run_autointerp(ai_config(tmp_path), lm, saes, HOOK, ["", " "], tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# The API goes down: a circuit breaker, not hours of retries


def test_closed_port_stops_within_the_configured_failures(lm, saes, texts, claude_env, tmp_path):
    """The real SDK against a port nothing listens on: the run stops after
    `max_consecutive_failures` failed calls (not features × retries), naming the base URL."""
    from ssae_ray import tracking

    url = f"http://127.0.0.1:{tracking.free_port()}"
    cfg = ai_config(tmp_path, backend="claude", base_url=url, max_consecutive_failures=4, max_retries=5,
                    retry_base_s=0.2)  # fmt: skip
    t0 = time.perf_counter()
    with pytest.raises(AutoInterpError) as e:
        run_autointerp(cfg, lm, {"gsae": saes["gsae"]}, HOOK, texts, tmp_path / "out", use_ray=False)
    seconds = time.perf_counter() - t0
    msg = str(e.value)
    assert f"the Messages API at {url} failed 4 calls in a row" in msg and "0 finished features" in msg, msg
    assert "\n" not in msg
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["complete"] is False and man["usage"]["stop_kind"] == "api_down"
    # at most the threshold plus the calls already in flight (2 actors x 4) ever failed
    assert 4 <= man["usage"]["failures"] <= 4 + 2 * 4, man["usage"]
    df = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert set(df.status) == {"api_down"} and len(df) == 8
    assert seconds < 30, seconds  # 8 features x 6 attempts with backoff would take minutes


def test_api_down_midway_keeps_finished_features_and_a_rerun_pays_only_the_rest(
    lm, saes, texts, server, claude_env, tmp_path
):
    """The fake Messages API answers 6 calls (2 features x explain, predict, diversity), then 503 on
    every call: the run stops cleanly after 3 failures, keeps the 2 features, and a rerun once the
    API is back pays only for the other 6."""
    server.fail_from = 6
    cfg = ai_config(tmp_path, backend="claude", base_url=server.url, max_consecutive_failures=3,
                    num_actors=1, max_concurrency=1)  # fmt: skip
    with pytest.raises(AutoInterpError, match=f"the Messages API at {server.url} failed 3 calls in a row"):
        run_autointerp(cfg, lm, {"gsae": saes["gsae"]}, HOOK, texts, tmp_path / "out", use_ray=False)
    assert server.requests == 6 + 3  # stopped at the third 503, not after 8 features x 6 attempts
    df = pd.read_parquet(tmp_path / "out" / "results.parquet")
    done = df[df.status == "ok"]
    assert len(done) == 2 and set(df.status) == {"ok", "api_down"}
    assert "Stopped early: the Messages API" in (tmp_path / "out" / "report.md").read_text()
    server.fail_from = None
    paid = server.requests
    out2 = run_autointerp(cfg, lm, {"gsae": saes["gsae"]}, HOOK, texts, tmp_path / "out2", use_ray=False)
    df2 = pd.read_parquet(out2 / "results.parquet")
    assert (df2.status == "ok").all() and json.loads((out2 / "manifest.json").read_text())["complete"]
    assert server.requests - paid == 3 * 6 and int(df2.cached_calls.sum()) == 3 * 2
    assert df2.set_index("feature").loc[done.feature, "f1"].tolist() == done.f1.tolist()


def test_limiter_breaker_counts_failures_across_workers_and_resets_on_an_answer():
    lim = RateLimiter(1000, 1e9, max_consecutive_failures=3)
    assert lim.failure("HTTP 500", "http://x") is None
    assert lim.failure("APIConnectionError", "http://x") is None
    lim.settle(0, 0, 10, 10)  # one call answered (any worker): the run of failures is broken
    assert lim.failure("HTTP 503", "http://x") is None and lim.failure("HTTP 503", "http://x") is None
    reason = lim.failure("HTTP 503", "http://x")
    assert (
        reason
        == "the Messages API at http://x failed 3 calls in a row (last: HTTP 503); it looks down or unreachable"
    )
    g = lim.acquire(10, 10)
    assert g.stop == reason and g.kind == "api_down"
