"""SHIFT on Bias in Bios (section 3.1.3, Table 1): GSAE vs SSAE feature ablation.

    python jobs/bias_in_bios.py                                   # offline: `local` preset, wiki analogue
    python jobs/bias_in_bios.py --preset tiny workdir=/tmp/x      # smoke run
    ray job submit --working-dir . -- python jobs/bias_in_bios.py --preset pythia-70m-bib   # needs the hub

Overrides are `section.key=value` (e.g. `shift.max_features=50`). The logic is in
`ssae_ray.shift.job.run_bias_in_bios`; every stage is cached, so a rerun resumes.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a Ray working dir


def main(argv: list[str] | None = None) -> int:
    from ssae_ray.cli import user_error
    from ssae_ray.config import load_config
    from ssae_ray.multinode import prepare
    from ssae_ray.runtime import setup_logging
    from ssae_ray.shift.job import run_bias_in_bios

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="local")
    p.add_argument("--config", help="a YAML file layered over the preset")
    p.add_argument("--out", help="output folder (default <workdir>/shift/<config hash>)")
    p.add_argument("--no-ssae", action="store_true", help="GSAE rows only (no retrieval / finetuning)")
    p.add_argument("--no-compressed", action="store_true", help="skip the compression rows")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging()
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
        cfg = prepare(
            cfg
        )  # on a cluster: every node sees the work dir (or one line, exit 2); one MLflow server
        run_bias_in_bios(cfg, args.out, with_ssae=not args.no_ssae, with_compressed=not args.no_compressed)
    except KeyboardInterrupt:
        print("bias_in_bios: interrupted; finished stages are kept and a rerun resumes", file=sys.stderr)
        return 130
    except Exception as e:  # the package's own errors (config, stages, model, tracking): one line, exit 2
        if not user_error(e):
            raise
        print(f"bias_in_bios: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
