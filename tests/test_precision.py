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


@pytest.fixture
def hardware(monkeypatch):
    """Simulate the capability check: `hardware(native, speedup)`."""

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
