"""Where the main job's time goes: cold `jobs/physics.py` (set-up excluded) per stage, with the CPU,
the precision `auto` chose and the machine's load before and after. Asserts nothing.

    python benchmarks/bench_physics_stages.py                         # cold `local` in a fresh work dir
    python benchmarks/bench_physics_stages.py --preset tiny
    python benchmarks/bench_physics_stages.py --baseline old/timings.json   # side by side, with ratios
    python benchmarks/bench_physics_stages.py --workdir W --keep      # reuse W (warm rerun: seconds)

The GGUF model is dequantised once into `--models` (default: the user cache) and reused, as
`make physics` does after set-up; every other stage starts cold unless `--workdir` holds it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def table(rows: list[dict], base: dict[str, float] | None) -> str:
    head = "| stage | seconds | cached |" + (" baseline s | ratio |" if base else "")
    lines = [head, "|" + " --- |" * (5 if base else 3)]
    for r in rows:
        cells = f"| {r['stage']} | {r['seconds']:.1f} | {'yes' if r['cached'] else ''} |"
        if base:
            b = base.get(r["stage"])
            cells += f" {b:.1f} | {r['seconds'] / b:.2f} |" if b else " – | – |"
        lines.append(cells)
    total = sum(r["seconds"] for r in rows)
    last = f"| **total** | {total:.1f} | |"
    if base:
        bt = sum(base.values())
        last += f" {bt:.1f} | {total / bt:.2f} |"
    lines.append(last)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="local")
    ap.add_argument("--workdir", help="work dir (default: a fresh temp dir, removed unless --keep)")
    ap.add_argument("--models", help="where the dequantised LM is cached (default: ~/.cache/ssae-ray/models)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--baseline", help="a timings.json of an earlier run: adds its seconds and the ratio")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    from ssae_ray.config import load_config
    from ssae_ray.pipeline import run_physics
    from ssae_ray.precision import choose
    from ssae_ray.runtime import setup_logging

    setup_logging()
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench-physics-"))
    models = Path(a.models or "~/.cache/ssae-ray/models").expanduser()
    cfg = load_config(a.preset, overrides=[f"workdir={work}", *a.overrides])
    (cfg.root).mkdir(parents=True, exist_ok=True)
    if not (cfg.root / "models").exists():  # share the dequantised model: set-up, not the job
        models.mkdir(parents=True, exist_ok=True)
        (cfg.root / "models").symlink_to(models, target_is_directory=True)
    prec = choose(cfg.model.precision, "cpu", "LM forwards")
    before = load()
    t0 = time.perf_counter()
    report = run_physics(cfg)
    wall = time.perf_counter() - t0
    rows = json.loads((report.parent / "timings.json").read_text())["rows"]
    base = None
    if a.baseline:
        base = {r["stage"]: r["seconds"] for r in json.loads(Path(a.baseline).read_text())["rows"]}
    print(f"\ncold `{a.preset}` per stage ({cpu_name()}, {os.cpu_count()} CPUs; precision {prec.name}: "
          f"{prec.reason}; load average before {before}, after {load()}; wall {wall:.0f} s)\n")  # fmt: skip
    print(table(rows, base))
    print(f"\ntimings: {report.parent / 'timings.json'}")
    if not a.workdir and not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
