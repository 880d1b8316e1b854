"""Auto-interp throughput against a local Messages API server with a fixed latency per request.

    python benchmarks/bench_autointerp.py [--features 200] [--latency 0.3] [--actors 2] [--concurrency 8]

Each feature makes 3 calls in sequence (Interpreter, Predictor, diversity), so with C features in
flight the ideal wall time is calls x latency / C. The table gives the measured wall time, the
share of ideal achieved, the requests made, and the requests and wall time of a rerun (all
cached). Ray actors (num_actors x max_concurrency) and in-process asyncio (the same total
concurrency) run side by side in one process against the same server. Jobs are synthetic
(generated marked examples): this measures the client / actor machinery, not the LM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ssae_ray.autointerp.actors import score_local, score_on_ray
from ssae_ray.autointerp.client import Secret
from ssae_ray.autointerp.score import FeatureExamples, Job
from ssae_ray.config import load_config

WORDS = (
    "quantum field electron photon energy momentum charge river city market bread king queen music".split()
)


def synthetic_jobs(n: int, n_top: int = 10, n_predict: int = 5, seed: int = 0) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for f in range(n):
        key = WORDS[f % len(WORDS)] + str(f)

        def sent(marked: bool, has: bool, key: str = key) -> str:
            words = [rng.choice(WORDS) for _ in range(20)]
            if has:
                words[rng.randrange(20)] = f"<<{key}>>" if marked else key
            return " ".join(words)

        labels = [1] * n_predict + [0] * n_predict
        rng.shuffle(labels)
        ex = FeatureExamples(
            feature=f, status="ok", n_active_ctx=50, max_act=1.0,
            top_texts=[sent(True, True) for _ in range(n_top)], top_acts=[1.0] * n_top,
            predict_texts=[sent(False, bool(y)) for y in labels], predict_labels=labels, active_tokens=[key],
        )  # fmt: skip
        jobs.append(Job("bench", "blocks.0.hook_resid_post", ex))
    return jobs


class ServerProcess:
    """The fake Messages API server in its own process (as a remote API would be), so its CPU
    does not compete with the client's; counters come from GET /stats."""

    def __init__(self, latency: float):
        server = Path(__file__).resolve().parents[1] / "tests" / "fake_anthropic_server.py"
        self.proc = subprocess.Popen(
            [sys.executable, str(server), str(latency)], stdout=subprocess.PIPE, text=True
        )
        self.url = self.proc.stdout.readline().strip()

    @property
    def requests(self) -> int:
        with urllib.request.urlopen(f"{self.url}/stats") as r:
            return json.load(r)["requests"]

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.3)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--modes", default="ray,local")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    jobs = synthetic_jobs(args.features)
    conc = args.actors * args.concurrency
    rows = []
    with ServerProcess(args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            cfg = load_config(
                "tiny",
                overrides=[
                    "autointerp.backend=claude", f"autointerp.base_url={server.url}",
                    f"autointerp.num_actors={args.actors}", f"autointerp.max_concurrency={args.concurrency}",
                    "autointerp.requests_per_minute=1000000", "autointerp.tokens_per_minute=1000000000",
                ],
            )  # fmt: skip
            runner = score_on_ray if mode == "ray" else score_local
            cache = Path(tmp) / f"{mode}.sqlite"
            r0 = server.requests
            t0 = time.perf_counter()
            out, stats = runner(jobs, cfg.autointerp, Secret("sk-ant-bench-0000"), cache)
            wall = time.perf_counter() - t0
            start = stats.get("startup_s", 0.0)
            calls = server.requests - r0
            t1 = time.perf_counter()
            _, stats2 = runner(jobs, cfg.autointerp, Secret("sk-ant-bench-0000"), cache)
            rerun_wall = time.perf_counter() - t1
            start2 = stats2.get("startup_s", 0.0)
            rerun_calls = server.requests - r0 - calls
            ideal = calls * args.latency / conc
            ok = sum(r["status"] == "ok" for r in out)
            f1 = sum(r["f1"] for r in out if r["f1"] is not None) / max(ok, 1)
            rows.append((mode, conc, ok, calls, start, wall - start, ideal, ideal / (wall - start), ideal / wall,
                         rerun_calls, rerun_wall - start2, f1))  # fmt: skip
    print(f"\n{args.features} features x 3 calls, {args.latency * 1000:.0f} ms per request, "
          f"{args.actors} actors x max_concurrency {args.concurrency}, {os.cpu_count()} CPUs")  # fmt: skip
    print("| mode | in flight | scored | requests | actor start s | scoring wall s | ideal s | % of ideal "
          "| % of ideal incl. start | rerun requests | rerun scoring s | mean F1 |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, c, ok, calls, st, wall, ideal, eff, eff_all, rc, rw, f1 in rows:
        print(f"| {m} | {c} | {ok} | {calls} | {st:.2f} | {wall:.2f} | {ideal:.2f} | {eff:.0%} | {eff_all:.0%} "
              f"| {rc} | {rw:.2f} | {f1:.2f} |")  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
