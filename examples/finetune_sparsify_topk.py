"""Finetune an EleutherAI sparsify TopK SAE on in-domain text: load the checkpoint from disk, check
it, finetune it with its own objective (k fixed, MSE + auxiliary dead-latent loss; TERM with
`train.tilt`), and save the SSAE as a sae-lens `TopKSAE`.

    # a sparsify run folder holds one `layers.<L>/` (cfg.json + sae.safetensors) per layer, e.g.
    huggingface-cli download EleutherAI/sae-pythia-70m-deduped-32k --include "layers.3/*" --local-dir ckpt
    python examples/finetune_sparsify_topk.py ckpt --texts my_domain.txt --out ssae \\
        model.source=EleutherAI/pythia-70m-deduped train.steps=500 train.tilt=500 train.tilt_mode=raw

The run folder is used as `sae.source` as it is (`layers.<L>` serves `blocks.<L>.hook_resid_post`),
sparsify trains with a BOS token (so `model.prepend_bos=true`), and every layer found is finetuned.
For the full method (retrieval, sweep, evaluation) pass the same overrides to `ssae-ray physics`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssae_ray.config import load_config  # noqa: E402
from ssae_ray.models import load_lm  # noqa: E402
from ssae_ray.saes import fit_check, load_gsaes, save_sae  # noqa: E402
from ssae_ray.training import finetune  # noqa: E402
from ssae_ray.training.cache import lm_activations  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="sparsify run folder holding layers.<L>/ folders")
    ap.add_argument("--texts", type=Path, required=True, help="in-domain text, one document per line")
    ap.add_argument("--out", type=Path, default=Path("ssae"), help="folder for the SSAEs (one per hook)")
    ap.add_argument("--preset", default="local")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.source=... train.steps=...")
    args = ap.parse_intermixed_args(argv)
    layers = sorted(
        int(m.group(1)) for p in args.checkpoint.iterdir() if (m := re.fullmatch(r"layers\.(\d+)", p.name))
    )
    if not layers:
        raise SystemExit(f"no sparsify layers.<L>/ folders in {args.checkpoint}")
    hooks = ",".join(f"blocks.{layer}.hook_resid_post" for layer in layers)
    cfg = load_config(args.preset, overrides=[f"sae.source={args.checkpoint}", f"sae.hooks=[{hooks}]",
                                              "model.prepend_bos=true", *args.overrides])  # fmt: skip
    lm = load_lm(cfg.model, cfg.root / "models")
    texts = [t for t in args.texts.read_text().splitlines() if t.strip()]
    saes = load_gsaes(cfg, lm)  # hook, BOS, architecture and exact-import checks
    for h, ev in fit_check(cfg, lm, saes, texts).items():
        print(f"{h}: TopK k={saes[h].cfg.k}, width {saes[h].cfg.d_sae}, explains {ev:.3f} of the variance")
    batches = ({h: b[h] for h in saes} for b, _ in lm_activations(cfg, lm, texts, list(saes)))
    result = finetune(cfg, saes, batches, progress=False)
    for h, sae in result.saes.items():
        save_sae(sae, args.out / h)
        last = result.history[-1]
        print(
            f"{h}: {type(sae).__name__} saved to {args.out / h} (L0 {last[f'{h}/l0']:.0f}, FVU {last[f'{h}/fvu']:.3f})"
        )
    return args.out


if __name__ == "__main__":
    main()
