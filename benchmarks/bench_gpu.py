"""GPU checks and throughput at paper scale; needs a CUDA GPU. One command:

    python benchmarks/bench_gpu.py                # all three parts (goal: < 5 min on one H100/H200)
    python benchmarks/bench_gpu.py --tokens 1e6   # a shorter throughput run
    python benchmarks/bench_gpu.py --skip-tiny --skip-dp --tf32

1. The `tiny` job end to end (`pipeline.run_physics`, a local Ray that sees the GPUs): the driver's
   LM forwards and SAE evaluations are asserted to run on CUDA (wrapped here), each sweep trial
   records the device it trained on (`done.json`: must be `cuda:*`), the embedding actors' device
   is Ray's (`resources.process_device`).
2. With 2+ GPUs: a 2-worker data-parallel Ray Train finetune (NCCL: its collectives take CUDA
   tensors only, so finishing proves they were on the GPU), compared with one process.
3. Throughput: all 19 Pythia-70M-shaped SAEs (512 -> 32768, random weights) finetuned from one
   forward of a Pythia-70M-shaped GPT-NeoX (random weights, bf16) per batch of 4096 tokens, over
   `--tokens` tokens (default 8M: the `pythia-70m-bib` preset's 1953 steps). Prints tokens/s, the
   LM's share of the wall time, and the SAE FLOP/s as a share of the GPU's bf16 dense peak (the
   SAEs train in float32, or TF32 with `--tf32`; an SAE step is 5 matmuls of 2·N·d_in·d_sae FLOPs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "L40S": 362.0,
                    "A10": 125.0, "T4": 65.0, "V100": 125.0}  # fmt: skip
"""Dense bf16 (fp16 for T4/V100) tensor-core peaks, TFLOP/s, from the vendors' data sheets (SXM parts)."""


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v
    return None


def check_tiny_job(root: Path) -> dict[str, object]:
    """The tiny job end to end on the GPU, with every LM forward and SAE evaluation asserted on CUDA."""
    import ssae_ray.eval.evaluate as ev
    import ssae_ray.models as models
    from ssae_ray import pipeline
    from ssae_ray.config import load_config

    calls = {"capture": 0, "evaluate_sae": 0}
    capture, evaluate_sae = models.capture, ev.evaluate_sae

    def cuda_capture(lm, *a, **k):
        assert lm.device.type == "cuda", f"LM forward on {lm.device}"
        out = capture(lm, *a, **k)
        assert all(t.is_cuda for t in out.values()), "captured activations not on CUDA"
        calls["capture"] += 1
        return out

    def cuda_evaluate(lm, sae, *a, **k):
        assert lm.device.type == "cuda" and all(p.is_cuda for p in sae.parameters()), "evaluation off CUDA"
        calls["evaluate_sae"] += 1
        return evaluate_sae(lm, sae, *a, **k)

    models.capture, ev.evaluate_sae = cuda_capture, cuda_evaluate
    for mod in list(sys.modules.values()):  # modules that imported the names directly
        if getattr(mod, "__name__", "").startswith("ssae_ray"):
            if getattr(mod, "capture", None) is capture:
                mod.capture = cuda_capture
            if getattr(mod, "evaluate_sae", None) is evaluate_sae:
                mod.evaluate_sae = cuda_evaluate
    cfg = load_config("tiny", overrides=[f"workdir={root / 'tiny'}", "sweep.gpus_per_trial=0.5",
                                         "sweep.max_concurrent_trials=2", "ray.num_cpus=4"])  # fmt: skip
    t0 = time.perf_counter()
    report = pipeline.run_physics(cfg)
    secs = time.perf_counter() - t0
    devices = {}
    for done in sorted((report.parent.parent / "trials").glob("*/done.json")):
        devices[done.parent.name] = json.loads(done.read_text()).get("device")
    assert devices and all(str(d).startswith("cuda") for d in devices.values()), devices
    assert calls["capture"] > 0 and calls["evaluate_sae"] > 0, calls
    import ray

    ray.shutdown()
    return {"seconds": round(secs, 1), "trial devices": devices, **calls}


def check_dp_nccl(root: Path) -> dict[str, object]:
    """2-worker data-parallel Ray Train (NCCL) against one process on the same cache."""
    import ray
    from sae_lens import SAE

    from ssae_ray.config import load_config
    from ssae_ray.models import load_lm
    from ssae_ray.saes import load_gsaes, load_sae, save_sae
    from ssae_ray.training import finetune
    from ssae_ray.training.cache import cache_activations
    from ssae_ray.training.ray_train import run_finetune

    cfg = load_config("tiny", overrides=[f"workdir={root / 'dp'}", "train.steps=2", "train.checkpoint_every=2",
                                         "train.batch_tokens=256", "train.tilt=1.0", "ray.num_cpus=4"])  # fmt: skip
    lm = load_lm(cfg.model, root / "models")
    hooks = list(cfg.sae.hooks)[:1]
    cfg = cfg.replace(sae={"hooks": hooks})
    for h, s in load_gsaes(cfg, lm).items():
        save_sae(s, root / "gsae" / h)
    texts = [f"the quantum field of electron {i} and photon {i} in the river city" * 8 for i in range(40)]
    cache = cache_activations(cfg, lm, texts, hooks, progress=False)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    out = run_finetune(cfg, root / "gsae", cache, root / "dp_out", num_workers=2, placement="data_parallel")
    secs = time.perf_counter() - t0
    ray.shutdown()
    ref = finetune(cfg, {h: load_sae(root / "gsae" / h, "cuda") for h in hooks}, cache, progress=False)
    diff = max(float((getattr(SAE.load_from_disk(out / h), n) - getattr(ref.saes[h], n).cpu()).abs().max())
               for h in hooks for n in ("W_enc", "b_enc", "W_dec", "b_dec"))  # fmt: skip
    assert diff < 1e-4, diff
    return {"seconds": round(secs, 1), "max |dW| vs one process": diff, "backend": "nccl"}


def pythia70m_like(device: str = "cuda"):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    c = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                      intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25,
                      use_parallel_residual=True)  # fmt: skip
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(c).to(torch.bfloat16).to(device).eval()


def throughput(
    tokens: int,
    batch_tokens: int,
    context: int,
    tf32: bool,
    peak: float | None,
    d_sae: int = 32768,
    device: str = "cuda",
) -> dict[str, object]:
    from ssae_ray.config import TrainConfig
    from ssae_ray.models import LM, capture
    from ssae_ray.saes import make_random_sae
    from ssae_ray.training.loop import make_trainers, train_step

    torch.backends.cuda.matmul.allow_tf32 = tf32
    model = pythia70m_like(device)
    lm = LM(model, None, "gpt_neox", 6, 512, torch.device(device))
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    hooks = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_{k}" for k in ("resid_post", "mlp_out", "attn_out")
                                          for i in range(6)]  # fmt: skip
    assert len(hooks) == 19
    d_in = 512
    saes = {h: make_random_sae(d_in, d_sae, h, device=device) for h in hooks}
    steps = tokens // batch_tokens
    tc = TrainConfig(lr=1e-4, batch_tokens=batch_tokens, steps=steps, decay_steps=min(1000, steps), lam=0.1)
    rows = batch_tokens // (context - 1)  # position 0 of each context is not trained on
    g = torch.Generator(device=device).manual_seed(0)

    def batch():
        ids = torch.randint(0, 50304, (rows + 1, context), device=device, generator=g)
        mask = torch.ones_like(ids)
        acts = capture(lm, ids, mask, hooks)
        return {h: a[:, 1:].reshape(-1, d_in)[:batch_tokens].float() for h, a in acts.items()}

    trainers = make_trainers(tc, saes, batch(), device)
    for tr in trainers.values():
        assert all(p.device.type == torch.device(device).type for p in tr.params)
    lm_s = sae_s = 0.0
    sync()
    t_all = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        b = batch()
        sync()
        t1 = time.perf_counter()
        train_step(trainers, b, step, steps)
        sync()
        t2 = time.perf_counter()
        lm_s, sae_s = lm_s + t1 - t0, sae_s + t2 - t1
    wall = time.perf_counter() - t_all
    for tr in trainers.values():
        st = tr.opt.state[tr.params[0]]
        assert tr.W_enc.device.type == st["exp_avg"].device.type == torch.device(device).type, "state moved"
    flops = 10 * d_in * d_sae * batch_tokens * steps * len(hooks)
    out = {"tokens": steps * batch_tokens, "steps": steps, "wall s": round(wall, 1),
           "tokens/s": round(steps * batch_tokens / wall), "LM share": round(lm_s / wall, 3),
           "SAE TFLOP/s": round(flops / sae_s / 1e12, 1), "matmul": "tf32" if tf32 else "fp32"}  # fmt: skip
    if peak:
        out["share of bf16 peak (SAE time)"] = round(flops / sae_s / 1e12 / peak, 3)
        out["share of bf16 peak (wall)"] = round(flops / wall / 1e12 / peak, 3)
    return out


def table(title: str, rows: dict[str, object]) -> str:
    lines = [f"\n{title}", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=8e6)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=128)
    p.add_argument(
        "--tf32", action="store_true", help="TF32 matmuls for the SAEs (training itself uses fp32)"
    )
    p.add_argument("--peak-tflops", type=float, help="bf16 dense peak of this GPU (default: from its name)")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--skip-dp", action="store_true")
    p.add_argument("--d-sae", type=int, default=32768)
    p.add_argument(
        "--cpu-smoke", action="store_true", help="the throughput part alone on cpu (checks the script)"
    )
    a = p.parse_args(argv)
    if a.cpu_smoke:
        print(table("throughput smoke run on cpu", throughput(int(a.tokens), a.batch_tokens, a.context, False, None,
                                                              a.d_sae, "cpu")))  # fmt: skip
        return 0
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here; run it on a GPU machine", file=sys.stderr)
        return 2
    from ssae_ray.runtime import setup_logging

    setup_logging()
    name = torch.cuda.get_device_name(0)
    print(f"GPU: {name} x {torch.cuda.device_count()}, torch {torch.__version__}")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not a.skip_tiny:
            out.append(table("tiny job end to end on CUDA", check_tiny_job(root)))
            print(out[-1], flush=True)
        if not a.skip_dp:
            if torch.cuda.device_count() >= 2:
                out.append(table("data-parallel Ray Train, 2 workers, NCCL", check_dp_nccl(root)))
            else:
                out.append("\ndata-parallel NCCL check skipped: 1 GPU")
            print(out[-1], flush=True)
        res = throughput(
            int(a.tokens), a.batch_tokens, a.context, a.tf32, peak_tflops(name, a.peak_tflops), a.d_sae
        )
        out.append(
            table(f"19 Pythia-70M-shaped SAEs (512 -> {a.d_sae}), one LM forward per batch, {name}", res)
        )
        print(out[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
