"""TERM vs ERM GSAEs on TinyStories (the paper's section 3.2.1, appendices N and Q).

    python jobs/tinystories_term.py                                  # tinystories-term (the Hub)
    python jobs/tinystories_term.py --preset term-local              # offline analogue, CPU, minutes
    python jobs/tinystories_term.py train.pretrain_tokens=470000000 train.pretrain_steps=7343750
    ray job submit --working-dir . -- python jobs/tinystories_term.py

Pretrains an ERM and a TERM GSAE (width 64, TinyStories-1M `blocks.7.hook_resid_post`) on the same
cached activations, holds both at L0 16, and compares them on held-out stories: reconstruction error
distribution (Figure 22), detection vs threshold (Figure 23), error by token frequency (Figure 3),
tail-token coverage, spliced CE, decoder geometry, and auto-interp of both (`ssae_ray/term.py`).
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a Ray working dir


def main(argv: list[str]) -> int:
    from ssae_ray.cli import _user_error
    from ssae_ray.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tinystories-term")
    p.add_argument("--config", dest="config_file")
    p.add_argument("--split", help="evaluation split (default: test; general_test for the local corpus)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        from ssae_ray.multinode import prepare
        from ssae_ray.term import run_term

        cfg = load_config(args.preset, args.config_file, args.overrides)
        cfg = prepare(cfg)  # on a cluster: every node sees the work dir; one MLflow server
        run_term(cfg, args.split)
    except Exception as e:
        if _user_error(e):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
