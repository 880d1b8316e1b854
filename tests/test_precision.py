"""Precision choice (bf16 only where the hardware does it natively and faster) and the accuracy of
bf16 LM forwards against fp32."""

import logging

import pytest
import torch

from ssae_ray import precision as prec
from ssae_ray.config import ModelConfig
from ssae_ray.models import capture, load_lm, make_tiny_model, sae_splice, token_losses, tokenize_docs
from ssae_ray.saes import make_random_sae

TEXTS = [
    "Energy and momentum are conserved in every collision of particles.",
    "The river runs through the old city, where people sell bread and fish at the market.",
    "A king and a queen ruled the land for many years before the war began.",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: see conftest


@pytest.fixture
def hardware(monkeypatch):
    """Simulate the capability check: `hardware(native, speedup)`. These tests check what `auto`
    decides from the hardware, so a forced `auto` (SSAE_RAY_AUTO_PRECISION, as `make test` runs
    under in one of its modes) is lifted here."""
    monkeypatch.delenv(prec.AUTO_ENV, raising=False)

    def set_(native: bool, speedup: float = 4.0) -> None:
        prec.bf16_support.cache_clear()
        monkeypatch.setattr(prec, "_native_bf16", lambda device: native)
        monkeypatch.setattr(prec, "_matmul_speedup", lambda device, **k: speedup)

    yield set_
    prec.bf16_support.cache_clear()


def test_fp32_fallback_without_native_bf16(hardware, caplog):
    hardware(native=False)
    p = prec.resolve("auto", "cpu")
    assert p.name == "fp32" and p.dtype == torch.float32
    assert "no native bf16" in p.reason
    with caplog.at_level(logging.INFO, logger="ssae_ray"):
        prec._logged.clear()
        prec.choose("auto", "cpu", "LM forwards")
        prec.choose("auto", "cpu", "LM forwards")
    lines = [r.getMessage() for r in caplog.records if "precision for LM forwards" in r.getMessage()]
    assert lines == ["precision for LM forwards on cpu: fp32 (CPU (" + prec.cpu_capability() +
                     ") has no native bf16 (no AVX512-BF16 / AMX))"]  # fmt: skip
    assert prec.key_part("auto") == ()


def test_bf16_taken_only_when_native_and_faster(hardware):
    hardware(native=True, speedup=4.0)
    p = prec.resolve("auto", "cpu")
    assert p.name == "bf16" and p.dtype == torch.bfloat16 and "4.0x" in p.reason
    assert prec.key_part("auto") == ("bf16",)
    hardware(native=True, speedup=1.1)  # native but not worth it (e.g. a small core count)
    assert prec.resolve("auto", "cpu").name == "fp32"


def test_forced_settings_and_bad_value(hardware, caplog):
    hardware(native=False)
    assert prec.resolve("fp32", "cpu").name == "fp32"
    with caplog.at_level(logging.WARNING, logger="ssae_ray"):
        assert prec.resolve("bf16", "cpu").name == "bf16"
    assert any("emulated" in r.getMessage() for r in caplog.records)
    hardware(native=True)
    assert prec.resolve("fp32", "cpu").name == "fp32"  # fp32 forced even where bf16 is fast
    with pytest.raises(prec.PrecisionError, match="auto, fp32, bf16"):
        prec.resolve("fp16", "cpu")


def test_real_probe_runs_on_this_machine():
    prec.bf16_support.cache_clear()
    s = prec.bf16_support("cpu")
    assert isinstance(s.native, bool) and s.detail.startswith("CPU (")
    assert s.speedup is None or s.speedup > 0


def test_autocast_runs_matmuls_in_bf16_and_fp32_context_leaves_it():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with prec.autocast(prec.Precision("bf16", "test"), "cpu"):
        assert (a @ b).dtype == torch.bfloat16
        with prec.fp32("cpu"):
            assert (a @ b).dtype == torch.float32
    with prec.autocast(prec.Precision("fp32", "test"), "cpu"):
        assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_bf16_lm_forwards_close_to_fp32(arch, tmp_path):
    """Capture and spliced CE of a tiny model in bf16 vs fp32: activations within 1% (relative
    norm of the difference) and the mean spliced CE within 0.005 nats; the SAE itself stays fp32."""
    folder = make_tiny_model(tmp_path / arch, arch)
    lm32 = load_lm(ModelConfig(source=str(folder), precision="fp32"))
    lm16 = lm32._replace(precision=prec.Precision("bf16", "test"))
    batch = tokenize_docs(lm32.tokenizer, TEXTS, context_len=16)
    hook = "blocks.1.hook_resid_post"
    a32 = capture(lm32, batch.input_ids, batch.attention_mask, [hook])[hook]
    a16 = capture(lm16, batch.input_ids, batch.attention_mask, [hook])[hook]
    assert a16.dtype == torch.float32  # captured activations are always fp32
    assert float((a16 - a32).norm() / a32.norm()) < 0.01  # measured 0.004-0.005
    sae = make_random_sae(lm32.d_model, 128, hook, seed=1)
    ce = {}
    for name, lm in (("fp32", lm32), ("bf16", lm16)):
        out = token_losses(lm, batch.input_ids, batch.attention_mask, splice={hook: sae_splice(sae)})
        assert out.loss.dtype == torch.float32
        ce[name] = float(out.loss.sum() / out.mask.sum())
    assert abs(ce["bf16"] - ce["fp32"]) < 0.005, ce  # measured 1e-5 to 2e-4
    assert ce["bf16"] != ce["fp32"]  # the bf16 path really ran in bf16


# ---------------------------------------------------------------------------------------------
# The SAE step in bf16: matmuls in bf16, fp32 master weights, losses and gradients


def _planted(n_batches: int, n: int = 256, d: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sparse codes over 64 fixed directions plus noise: an SAE of width 64 can recover them."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(64, d, generator=g)
    return [{"a": (torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.08)) @ dirs
             + 0.05 * torch.randn(n, d, generator=g)} for _ in range(n_batches)]  # fmt: skip


@pytest.mark.parametrize(("arch", "k"), [("relu", None), ("jumprelu", None), ("topk", 8), ("batchtopk", 8)])
@pytest.mark.parametrize("tilt", [0.0, 2.0])
def test_bf16_step_gradient_matches_fp32(tiny_cfg, arch, k, tilt):
    """Same batch, same weights: the bf16 step's per-token losses within 1% and every gradient
    within 3% (relative norm of the difference) of the fp32 step, ERM and TERM alike."""
    from ssae_ray.training.loop import HookTrainer, with_train

    sae = make_random_sae(32, 96, "a", seed=3, arch=arch, k=k, threshold=0.05 if arch == "jumprelu" else 0.0)
    x = _planted(1)[0]["a"]
    grads, losses = {}, {}
    for p in ("fp32", "bf16"):
        tc = with_train(tiny_cfg.train, precision=p, tilt=tilt, lam=0.5 if arch == "relu" else 0.01)
        tr = HookTrainer(tc, sae, "a", 1.0)
        assert tr.precision.name == p
        pending = tr.step(x, 1e-3, 0)
        grads[p] = [q.grad.clone() for q in tr.params]
        losses[p] = pending["out"].losses.loss
        assert all(gr.dtype == torch.float32 for gr in grads[p])  # fp32 gradients for the fp32 masters
    assert float((losses["bf16"] - losses["fp32"]).norm() / losses["fp32"].norm()) < 0.01
    for g16, g32 in zip(grads["bf16"], grads["fp32"], strict=True):
        if g32.norm() > 0:
            assert float((g16 - g32).norm() / g32.norm()) < 0.03


def test_bf16_finetune_reaches_fp32_fvu_and_l0(tiny_cfg):
    """A planted problem finetuned 40 steps in bf16 and in fp32 from the same GSAE: final FVU
    within 0.02 and L0 within 10% of each other, and both learned (FVU well below the start)."""
    from ssae_ray.training import finetune

    end = {}
    for p in ("fp32", "bf16"):
        cfg = tiny_cfg.replace(train={"lr": 5e-3, "steps": 40, "decay_steps": 10, "lam": 0.3,
                                      "batch_tokens": 256, "precision": p})  # fmt: skip
        res = finetune(cfg, {"a": make_random_sae(32, 64, "a", seed=1)}, _planted(64), progress=False)
        first, last = res.history[0], res.history[-1]
        assert last["a/fvu"] < 0.6 * first["a/fvu"]
        end[p] = last
    assert abs(end["bf16"]["a/fvu"] - end["fp32"]["a/fvu"]) < 0.02, end
    assert abs(end["bf16"]["a/l0"] - end["fp32"]["a/l0"]) <= 0.1 * end["fp32"]["a/l0"], end


def test_index_key_names_the_precision_setting_not_what_this_process_resolves(hardware, tmp_path):
    """The index's key is the same on a process where `auto` resolves to fp32 (a CPU head) and one
    where it resolves to bf16 (a GPU worker, an AVX-512-bf16 CPU), and differs between settings."""
    from ssae_ray.config import load_config
    from ssae_ray.retrieval.index import index_key

    corpus = tmp_path / "corpus.parquet"
    corpus.write_bytes(b"the same corpus file")

    def key(setting):
        return index_key(
            load_config("tiny", overrides=[f"workdir={tmp_path}", f"model.precision={setting}"]), corpus
        )

    hardware(native=False)
    on_head = key("auto")
    assert prec.resolve("auto", "cpu").name == "fp32"
    hardware(native=True, speedup=4.0)
    assert prec.resolve("auto", "cpu").name == "bf16"
    assert key("auto") == on_head
    assert len({key("auto"), key("fp32"), key("bf16")}) == 3
