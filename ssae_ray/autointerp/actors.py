"""Ray wiring: async scoring actors, one shared rate limiter, one shared cache.

`score_on_ray` starts `num_actors` async actors (each `max_concurrency` features in flight), a
`RateLimiter` actor (requests / tokens per minute and the spend cap, cluster-wide) and a
`ResponseCache` actor pinned to the driver's node (one SQLite file, reachable from every node).
When an actor dies its features are resubmitted to a fresh one; calls that had finished are
answered from the cache, so they are never paid twice. `score_local` does the same in-process
(asyncio) for runs without a Ray cluster.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ssae_ray.autointerp.cache import ResponseCache
from ssae_ray.autointerp.client import ClaudeClient, Secret
from ssae_ray.autointerp.offline import OfflineScorer
from ssae_ray.autointerp.ratelimit import RateLimiter
from ssae_ray.autointerp.score import ClaudeScorer, Job, base_row, score_feature
from ssae_ray.config import AutoInterpConfig

log = logging.getLogger("ssae_ray")


STOP_STATUSES = ("spend_cap", "api_down")
"""Row statuses that stop the whole run cleanly (features not yet started are recorded as such)."""


def limiter_args(ai: AutoInterpConfig) -> tuple[Any, ...]:
    return (ai.requests_per_minute, ai.tokens_per_minute, ai.spend_cap_tokens, ai.spend_cap_usd,
            ai.usd_per_mtok_in, ai.usd_per_mtok_out)  # fmt: skip


def make_limiter(ai: AutoInterpConfig) -> RateLimiter:
    return RateLimiter(*limiter_args(ai), max_consecutive_failures=ai.max_consecutive_failures)


def make_scorer(ai: AutoInterpConfig, api_key: Secret | None, limiter: Any, cache: Any) -> Any:
    if ai.backend == "offline":
        return OfflineScorer()
    assert api_key is not None
    client = ClaudeClient(
        ai.model,
        api_key,
        limiter,
        cache,
        base_url=ai.base_url,
        max_retries=ai.max_retries,
        retry_base_s=ai.retry_base_s,
        max_retry_wait_s=ai.max_retry_wait_s,
        timeout_s=ai.timeout_s,
    )
    return ClaudeScorer(client, ai.domain, ai.max_tokens, ai.parse_retries)


class InterpActor:
    """Scores features concurrently (an async Ray actor). `crash_after` / `crash_marker` inject one
    crash (os._exit) when that many features have finished (the last one's row is lost with the
    actor; its calls are in the cache), once per marker file: for fault-tolerance tests."""

    def __init__(
        self,
        ai: AutoInterpConfig,
        api_key: Secret | None,
        limiter: Any,
        cache: Any,
        crash_after: int | None = None,
        crash_marker: str | None = None,
    ):
        self.ai = ai
        self.scorer = make_scorer(ai, api_key, limiter, cache)
        self.done = 0
        self.crash_after, self.crash_marker = crash_after, crash_marker

    async def score(self, job: Job) -> dict[str, Any]:
        row = await score_feature(job, self.scorer, self.ai.diversity)
        self.done += 1
        # The crash comes once `crash_after` features have *finished* on this actor, before the last
        # one is returned: with more jobs than actors * crash_after some actor always gets there, so
        # the injected fault does not depend on how the driver happened to spread the work.
        if self.crash_after is not None and self.done >= self.crash_after and self.crash_marker:
            marker = Path(self.crash_marker)
            if not marker.exists():
                marker.touch()
                os._exit(1)
        return row

    def pid(self) -> int:
        return os.getpid()


def _progress(n: int, desc: str) -> Any:
    return tqdm(total=n, desc=desc, disable=n == 0)


def _not_run(job: Job, ai: AutoInterpConfig, stop: tuple[str, str]) -> dict[str, Any]:
    """The row of a feature never started because the run stopped (`stop` = (status, reason))."""
    model = "offline-keywords" if ai.backend == "offline" else ai.model
    row = base_row(job, ai.backend, model)
    if row["status"] == "ok":
        row.update(status=stop[0], error=f"not run: {stop[1]}")
    return row


def score_on_ray(
    jobs: list[Job],
    ai: AutoInterpConfig,
    api_key: Secret | None,
    cache_path: Path,
    crash_after: int | None = None,
    crash_marker: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score `jobs` on async Ray actors; returns (rows in job order, limiter stats)."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    limiter = (
        ray.remote(RateLimiter)
        .options(num_cpus=0)
        .remote(*limiter_args(ai), max_consecutive_failures=ai.max_consecutive_failures)
    )
    cache = ray.remote(ResponseCache).options(num_cpus=0, scheduling_strategy=here).remote(str(cache_path))
    actor_cls = ray.remote(InterpActor).options(num_cpus=0, max_concurrency=ai.max_concurrency)

    def new_actor(crash: bool) -> Any:
        args = (crash_after, crash_marker) if crash else (None, None)
        return actor_cls.remote(ai, api_key, limiter, cache, *args)

    t0 = time.perf_counter()
    actors = [new_actor(True) for _ in range(ai.num_actors)]
    ray.get([a.pid.remote() for a in actors])  # started (imports done) before work is handed out
    startup_s = time.perf_counter() - t0
    load = [0] * len(actors)
    pending = collections.deque(range(len(jobs)))
    inflight: dict[Any, tuple[int, Any, int]] = {}
    rows: dict[int, dict[str, Any]] = {}
    stop: tuple[str, str] | None = None
    restarts = 0
    bar = _progress(len(jobs), f"autointerp ({ai.backend})")
    try:
        while pending or inflight:
            while pending and stop is None:
                a = min(range(len(actors)), key=load.__getitem__)
                if load[a] >= ai.max_concurrency:
                    break
                j = pending.popleft()
                inflight[actors[a].score.remote(jobs[j])] = (a, actors[a], j)
                load[a] += 1
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                a, handle, j = inflight.pop(ref)
                load[a] -= 1
                try:
                    row = ray.get(ref)
                except RayActorError:
                    if actors[a] is handle:
                        restarts += 1
                        if restarts > 3 * ai.num_actors:
                            raise RuntimeError(
                                f"autointerp actors died {restarts} times; giving up"
                            ) from None
                        log.warning(
                            "autointerp actor %d died; a fresh one redoes its features (cached calls are free)",
                            a,
                        )
                        actors[a], load[a] = new_actor(False), 0
                    pending.appendleft(j)
                    continue
                rows[j] = row
                bar.update(1)
                if row["status"] in STOP_STATUSES and stop is None:
                    stop = (row["status"], row["error"])
                    log.warning("autointerp stopping: %s; finishing calls in flight", stop[1])
        stats = {
            **ray.get(limiter.stats.remote()),
            "startup_s": round(startup_s, 3),
            "actor_restarts": restarts,
        }
    finally:
        bar.close()
        for h in actors:
            ray.kill(h)
        ray.kill(limiter)
        ray.kill(cache)
    for j in pending:
        rows[j] = _not_run(jobs[j], ai, stop or ("spend_cap", "stopped"))
    return [rows[j] for j in range(len(jobs))], stats


def score_local(
    jobs: list[Job], ai: AutoInterpConfig, api_key: Secret | None, cache_path: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The same scoring in this process: asyncio with num_actors * max_concurrency in flight."""
    limiter = make_limiter(ai)
    cache = ResponseCache(cache_path)
    scorer = make_scorer(ai, api_key, limiter, cache)
    rows: dict[int, dict[str, Any]] = {}
    bar = _progress(len(jobs), f"autointerp ({ai.backend})")

    async def main() -> None:
        sem = asyncio.Semaphore(max(1, ai.num_actors * ai.max_concurrency))
        stop: list[tuple[str, str]] = []

        async def one(j: int) -> None:
            async with sem:
                if stop:
                    rows[j] = _not_run(jobs[j], ai, stop[0])
                    return
                rows[j] = row = await score_feature(jobs[j], scorer, ai.diversity)
                bar.update(1)
                if row["status"] in STOP_STATUSES and not stop:
                    stop.append((row["status"], row["error"]))
                    log.warning("autointerp stopping: %s; finishing calls in flight", row["error"])

        try:
            await asyncio.gather(*(one(j) for j in range(len(jobs))))
        finally:
            await scorer.close()

    try:
        asyncio.run(main())
    finally:
        bar.close()
        cache.close()
    return [rows[j] for j in range(len(jobs))], limiter.stats()


Runner = Callable[..., tuple[list[dict[str, Any]], dict[str, Any]]]
