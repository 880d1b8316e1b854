"""The Bias-in-Bios SHIFT experiment end to end (what `jobs/bias_in_bios.py` runs)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ssae_ray.config import Config, config_hash
from ssae_ray.shift.data import load_bios
from ssae_ray.shift.sae_sets import build_sae_sets
from ssae_ray.shift.shift import ShiftResult, active_features, run_shift
from ssae_ray.shift.table import log_mlflow, to_markdown, write_outputs
from ssae_ray.stages import atomic_dir

log = logging.getLogger("ssae_ray")


def _on_worker(
    cfg: Config, out_dir: str | Path | None, with_ssae: bool, with_compressed: bool, checked: bool
) -> tuple[ShiftResult, Path]:
    """The experiment in the GPU task (`offload`): this node must see the work dir the preflight
    checked (a node that joined after it stops here, naming itself), then the same run as local."""
    from ssae_ray.multinode import check_here
    from ssae_ray.runtime import setup_logging

    setup_logging()
    check_here(cfg.root, checked)
    return run_bias_in_bios(cfg, out_dir, with_ssae, with_compressed)


def run_bias_in_bios(
    cfg: Config, out_dir: str | Path | None = None, with_ssae: bool = True, with_compressed: bool = True
) -> tuple[ShiftResult, Path]:
    """Data -> LM -> GSAEs (+ SSAEs finetuned on retrieved text) -> SHIFT -> Table 1 in
    `<workdir>/shift/<config hash>/` (or `out_dir`): table.csv, table.md, result.json, plots;
    logged to MLflow when a run is active or a tracking URI is set."""
    from tqdm.auto import tqdm

    from ssae_ray import tracking
    from ssae_ray.models import load_lm
    from ssae_ray.pipeline import offload

    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if uri:  # fail before the work, not after it
        tracking.check_tracking(uri)
    if offload(cfg):  # a CPU head driving a GPU cluster: the whole experiment runs on one GPU worker
        from ssae_ray.multinode import was_checked
        from ssae_ray.resources import on_gpu_worker

        return on_gpu_worker(_on_worker, cfg, out_dir, with_ssae, with_compressed, was_checked(cfg.root),
                             name="bias-in-bios")  # fmt: skip
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    bar = tqdm(desc="bias-in-bios", bar_format="{desc}: {elapsed} {postfix}")

    def say(msg: str) -> None:
        bar.set_postfix_str(msg)
        log.info("bias-in-bios: %s", msg)

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = round(now - since, 2)
        return now

    say("data")
    if with_ssae:  # the retrieval corpus's sources open before the LM is downloaded
        from ssae_ray.data.corpus import preflight

        preflight(cfg)
    data = load_bios(cfg)
    t = lap("data", t0)
    say(f"loading {cfg.model.source}")
    lm = load_lm(cfg.model)
    t = lap("load_lm", t)
    sets, info = build_sae_sets(cfg, lm, data, say, with_ssae, with_compressed)
    t = lap("sae_sets", t)
    result = run_shift(cfg, lm, data, sets, progress=say)
    t = lap("shift", t)
    from ssae_ray.shift.probe import tokenize_bios

    test = tokenize_bios(
        lm.tokenizer,
        data.balanced["test"].text,
        cfg.shift.context_len or cfg.model.context_len,
        cfg.model.prepend_bos,
    )
    active = {
        n: active_features(lm, test, s, result.layer, batch_size=cfg.shift.batch_size)
        for n, s in sets.items()
    }
    t = lap("active_features", t)
    gt = None
    if data.flipped:  # a planted dataset: check the selection and the ablations against the known cue
        from ssae_ray.shift.ground_truth import ground_truth

        say("ground truth: cue-responsive features, precision / recall, cue dependence")
        gt = ground_truth(cfg, lm, data, sets, result)
        lap("ground_truth", t)
    seconds.update({f"shift.{k}": v for k, v in result.seconds.items()})
    seconds["total"] = round(time.perf_counter() - t0, 2)
    result = result._replace(seconds=seconds)
    counts = data.manifest["counts"]
    notes = [
        f"dataset {data.source} ({data.professions[0]} vs {data.professions[1]}); balanced test "
        f"{counts['balanced']['test']} bios, ambiguous train {counts['ambiguous']['train']}",
        *data.manifest.get("notes", []),
        f"model {cfg.model.source}, probe on blocks.{result.layer}.hook_resid_post; SAE sets: "
        + ", ".join(f"{k} ({len(v)} hooks)" for k, v in sets.items()),
    ]
    meta: dict[str, Any] = {"notes": notes, "data": data.manifest, "sae_sets": info, "active_features": active,
                            "config": cfg.to_dict()}  # fmt: skip
    final = Path(out_dir) if out_dir else cfg.root / "shift" / config_hash(cfg)
    with atomic_dir(final) as tmp:
        write_outputs(result, tmp, meta)
        if gt is not None:
            from ssae_ray.shift.ground_truth import to_markdown as gt_markdown
            from ssae_ray.stages import write_json_atomic

            write_json_atomic(tmp / "ground_truth.json", gt)
            (tmp / "ground_truth.md").write_text(gt_markdown(gt))
    log_mlflow(
        result,
        final,
        {"preset": cfg.name, "dataset": data.source, "probe_layer": result.layer},
        uri=cfg.tracking.uri,
        experiment=tracking.experiment_name(cfg),
    )
    bar.close()
    print(to_markdown(result.rows, notes))
    if gt is not None:
        from ssae_ray.shift.ground_truth import to_markdown as gt_markdown

        print(gt_markdown(gt))
    print("wall time (s): " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
    print(f"outputs: {final}")
    return result, final
