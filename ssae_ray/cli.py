"""`ssae-ray`: one sub-command per stage of the pipeline.

    ssae-ray <stage> [--preset P] [--config FILE] [section.key=value ...]

Every stage is cached by a content hash of its inputs under the preset's work dir, so running
`physics` after `retrieve` reuses the retrieval. Errors a user can fix print one clear message and
exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

STAGES: dict[str, str] = {
    "config": "print the resolved config (preset + file + overrides) as YAML",
    "presets": "list the shipped presets",
    "corpus": "build the corpus splits (retrieval corpus, seed, validation, test, OOD)",
    "index": "embed the corpus with Ray Data and write the sharded FAISS index",
    "retrieve": "select subdomain data from the seed set (dense, bm25, +tracin, random)",
    "pretrain": "pretrain GSAEs from scratch (presets without published GSAEs)",
    "cache": "cache the activations of the selections at every hook",
    "finetune": "finetune the GSAEs into SSAEs on one selection with Ray Train",
    "sweep": "Ray Tune sweep over lambda x tilt x seed x strategy, logged to MLflow",
    "eval": "evaluate the GSAEs and the best SSAEs on the test sets; write the report",
    "autointerp": "score SSAE features with Claude (or the offline backend)",
    "dashboard": "build the feature dashboard (HTML site, GSAE->SSAE diff, Neuronpedia export)",
    "shift": "SHIFT on Bias in Bios (or its offline analogue)",
    "physics": "the whole pipeline: corpus -> index -> retrieve -> finetune sweep -> eval -> report",
    "run": "the whole job for your domain: --seed FILE (one document per line, or JSONL) [--ood FILE] [--name NAME]",
    "mlflow": "start a local MLflow tracking server (SQLite, 127.0.0.1) and print its URL",
}


_UPSTREAM = (
    "; corpus, index, GSAEs, selections and activation caches are reused (they are keyed by their "
    "inputs: delete a folder under <workdir>/<stage>/ to rebuild it)"
)
FORCE_HELP: dict[str, str] = {
    "sweep": "retrain every trial of this sweep (the previous trials are removed once the new sweep "
    "has finished)" + _UPSTREAM,
    "eval": "re-evaluate the sweep's best checkpoints and rewrite the report; trained trials are reused "
    "(`sweep --force` retrains them)" + _UPSTREAM,
    "physics": "retrain every trial of the sweep and re-evaluate" + _UPSTREAM,
    "run": "retrain every trial of the domain's sweep and re-evaluate" + _UPSTREAM,
    "dashboard": "rebuild the feature dashboard even when the cached one is current" + _UPSTREAM,
}
"""What `--force` does, per stage that has it."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssae-ray",
        description="Specialized Sparse Autoencoders on Ray. Stages:\n"
        + "\n".join(f"  {k:<11} {v}" for k, v in STAGES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="stage", metavar="stage", required=True)
    for name, help_ in STAGES.items():
        s = sub.add_parser(name, help=help_, description=help_)
        if name == "presets":
            continue
        s.add_argument("--preset", default="local", help="preset name (default: local)")
        s.add_argument("--config", dest="config_file", help="a YAML file of overrides")
        s.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lam=2")
        if name in ("retrieve", "finetune"):
            s.add_argument("--strategy", help="selection strategy (default: retrieval.strategy)")
        if name == "mlflow":
            s.add_argument("--port", type=int, default=5000)
        if name == "run":
            s.add_argument(
                "--seed",
                required=True,
                metavar="FILE",
                dest="seed_file",
                help="in-domain documents: one per line, or JSONL with a 'text' field (UTF-8)",
            )
            s.add_argument(
                "--ood",
                metavar="FILE",
                dest="ood_file",
                help="out-of-domain test documents, same format (default: no OOD test set)",
            )
            s.add_argument(
                "--name",
                help="the domain's name: titles the report, dashboard and MLflow "
                "experiment (default: the seed file's name)",
            )
            s.add_argument("--test-fraction", type=float, default=0.3,
                           help="share of the seed file held out as the in-domain test set (default 0.3; "
                           "0.2 more is the validation set, the rest is the retrieval seed)")  # fmt: skip
        if name == "pretrain":
            s.add_argument(
                "--ship", nargs="?", const="", metavar="RELEASE",
                help="write the pretrained GSAEs as a release shipped with the package "
                "(ssae_ray/releases/RELEASE; default: the release of this recipe, else "
                "smollm2-135m-wiki-gsae) with its manifest and held-out documents",
            )  # fmt: skip
        if name in FORCE_HELP:
            s.add_argument("--force", action="store_true", help=FORCE_HELP[name])
    return p


def user_error(e: BaseException) -> bool:
    """Errors raised by this package's own checks (config, hooks, SAEs, stages, data, tracking, ...):
    printed as one line with exit status 2; anything else is a bug and keeps its traceback."""
    return type(e).__module__.startswith("ssae_ray") or isinstance(e, FileNotFoundError)


_user_error = user_error


def main(argv: list[str] | None = None) -> int:
    from ssae_ray.runtime import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("ssae-ray: interrupted; finished stages are kept and a rerun resumes", file=sys.stderr)
        return 130
    except Exception as e:
        if not _user_error(e):
            raise
        print(f"ssae-ray {args.stage}: error: {e}", file=sys.stderr)
        logging.getLogger("ssae_ray").debug("details", exc_info=True)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from ssae_ray.config import load_config, preset_names

    if args.stage == "presets":
        print("\n".join(preset_names()))
        return 0
    if args.stage == "run":
        from ssae_ray import domain

        cfg, summary = domain.domain_config(args.preset, args.seed_file, args.ood_file, args.name,
                                            args.config_file, args.overrides, args.test_fraction)  # fmt: skip
        print(domain.run_domain(cfg, summary, force=args.force))
        return 0
    cfg = load_config(args.preset, args.config_file, args.overrides)
    if args.stage == "config":
        print(cfg.to_yaml())
        return 0
    if args.stage == "mlflow":
        from ssae_ray.tracking import serve_forever

        serve_forever(cfg, port=args.port)
        return 0
    from ssae_ray import multinode, pipeline

    # On a Ray cluster: every node sees the work dir (or one line, exit 2), and every task logs to
    # one MLflow server (the head's, started here when none is named); before any work.
    cfg = multinode.prepare(cfg)
    return _run_stage(args, cfg, pipeline)


def _run_stage(args: argparse.Namespace, cfg: object, pipeline: object) -> int:
    handlers: dict[str, Callable[..., object]] = {
        "corpus": pipeline.stage_corpus,
        "index": pipeline.stage_index,
        "retrieve": lambda c: pipeline.stage_retrieve(c, args.strategy),
        "pretrain": lambda c: _pretrain(c, args.ship),
        "cache": pipeline.stage_cache,
        "finetune": lambda c: pipeline.stage_finetune(c, args.strategy),
        "sweep": lambda c: pipeline.stage_sweep(c, force=args.force),
        "eval": lambda c: pipeline.stage_eval(c, force=args.force),
        "autointerp": pipeline.stage_autointerp,
        "dashboard": lambda c: pipeline.stage_dashboard(c, force=args.force),
        "shift": pipeline.stage_shift,
        "physics": lambda c: pipeline.run_physics(c, force=args.force),
    }
    out = handlers[args.stage](cfg)
    if out is not None:
        print(out)
    return 0


def _pretrain(cfg, ship: str | None) -> object:
    """Pretrain (or find) the GSAEs of `cfg`; compare them with the shipped release of the same
    recipe (how close the rebuild is); with `ship`, write them as a shipped release."""
    from ssae_ray import pipeline, release

    if cfg.sae.source != "pretrain":
        return pipeline.stage_pretrain(cfg)  # its error
    lm = None if pipeline.offload(cfg) else pipeline._lm(cfg)  # a CPU head: pretraining on GPU workers
    corpus_dir = pipeline.stage_corpus(cfg, lm)
    folder = pipeline.stage_gsaes(cfg, lm, corpus_dir)
    existing = release.release_for_recipe(cfg)
    if lm is None and (existing is not None or ship is not None):
        lm = pipeline._lm(cfg)  # the comparison and the release check run here
    if existing is not None:
        print(release.compare(cfg, lm, folder, existing))
    else:
        print(f"no shipped release was built by this recipe (config hash {release.recipe_hash(cfg)})")
    if ship is not None:
        out = release.ship(cfg, lm, folder, corpus_dir, ship or existing or release.LOCAL_RELEASE)
        print(f"shipped: {out}")
    return folder


if __name__ == "__main__":
    sys.exit(main())
