import pytest
import torch
from safetensors.torch import load_file

from ssae_ray.config import ModelConfig, load_config
from ssae_ray.models import capture, load_lm, make_tiny_model, tokenize_docs
from ssae_ray.saes import (
    SAEMismatchError,
    check_sae_fits,
    explained_variance,
    load_gsaes,
    load_sae,
    make_random_sae,
    save_sae,
    slice_sae,
)


def test_save_load_roundtrip_bit_for_bit(tmp_path):
    sae = make_random_sae(16, 48, "blocks.0.hook_resid_post", seed=3)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    p = save_sae(sae, tmp_path / "s")
    back = load_sae(p)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(back, name)), name
    assert back.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    assert set(load_file(p / "sae_weights.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_random_sae_has_unit_norm_decoder():
    sae = make_random_sae(16, 48, "h", seed=0)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))


def test_slice_keeps_first_k_latents():
    sae = make_random_sae(16, 48, "h", seed=1)
    s = slice_sae(sae, 10)
    assert s.cfg.d_sae == 10
    assert torch.equal(s.W_enc, sae.W_enc[:, :10]) and torch.equal(s.W_dec, sae.W_dec[:10])
    assert torch.equal(s.b_enc, sae.b_enc[:10]) and torch.equal(s.b_dec, sae.b_dec)
    x = torch.randn(5, 16)
    torch.testing.assert_close(s.encode(x), sae.encode(x)[:, :10])
    with pytest.raises(SAEMismatchError):
        slice_sae(sae, 49)
    sae.cfg.metadata.act_scale = 0.25
    assert slice_sae(sae, 4).cfg.metadata.act_scale == 0.25 and s.cfg.metadata.hook_name == "h"


def test_explained_variance_and_fit_check():
    x = torch.randn(200, 16)
    assert explained_variance(x, x) == pytest.approx(1.0)
    assert explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-6)
    sae = make_random_sae(16, 48, "blocks.2.hook_mlp_out")
    with pytest.raises(SAEMismatchError, match=r"blocks\.2\.hook_mlp_out.*explains only"):
        check_sae_fits(sae, x, "blocks.2.hook_mlp_out", min_ev=0.9)
    with pytest.raises(SAEMismatchError, match="d_in=16.*d=32"):
        check_sae_fits(sae, torch.randn(10, 32), "blocks.2.hook_mlp_out", min_ev=0.0)


def test_load_gsaes_random_folder_and_width_mismatch(tmp_path):
    lm = load_lm(ModelConfig(source=str(make_tiny_model(tmp_path / "m"))))
    cfg = load_config("tiny", overrides=[f"workdir={tmp_path}"])
    saes = load_gsaes(cfg, lm)
    assert list(saes) == list(cfg.sae.hooks) and all(s.cfg.d_in == 64 for s in saes.values())
    for h, s in saes.items():
        save_sae(s, tmp_path / "g" / h)
    back = load_gsaes(cfg.replace(sae={"source": str(tmp_path / "g"), "slice_to": 16}), lm)
    assert all(s.cfg.d_sae == 16 for s in back.values())
    save_sae(make_random_sae(32, 8, cfg.sae.hooks[0]), tmp_path / "g" / cfg.sae.hooks[0])
    with pytest.raises(SAEMismatchError, match="d_in=32"):
        load_gsaes(cfg.replace(sae={"source": str(tmp_path / "g")}), lm)
    # a GSAE trained on its own hook explains it; the check passes
    b = tokenize_docs(lm.tokenizer, ["the river runs through the old city"] * 4, 16)
    acts = capture(lm, b.input_ids, b.attention_mask, ["blocks.0.hook_resid_post"])[
        "blocks.0.hook_resid_post"
    ]
    assert check_sae_fits(saes["blocks.0.hook_resid_post"], acts[:, 1:], "blocks.0.hook_resid_post", -1e9) < 1
