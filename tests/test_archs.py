"""GSAE architectures: exact import into the trainable form and back, per-architecture losses and
gradients, finetuning JumpReLU / TopK / BatchTopK SAEs, and the checks where GSAEs enter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE, StandardSAE, TopKSAE
from sae_lens.saes.jumprelu_sae import JumpReLU, Step
from safetensors.torch import save_file

from ssae_ray.config import TrainConfig
from ssae_ray.retrieval.tracin import (
    seed_gradient,
    tracin_scores,
    tracin_scores_naive,
    training_view,
    valid_tokens,
)
from ssae_ray.saes import SAEMismatchError, check_gsae, load_sae, make_random_sae, save_sae, slice_sae
from ssae_ray.training import finetune
from ssae_ray.training.archs import SAEArchError, arch_of, export_form, import_gsae, probe_inputs
from ssae_ray.training.loop import HookTrainer
from ssae_ray.training.losses import (
    TrainingError,
    batch_topk_acts,
    jumprelu_loss_and_grads,
    tilted_loss,
    topk_acts,
    topk_loss_and_grads,
)
from ssae_ray.training.ray_train import load_checkpoint, save_checkpoint

ARCHS = ("relu", "jumprelu", "topk", "batchtopk")
CLASS = {"relu": StandardSAE, "jumprelu": JumpReLUSAE, "topk": TopKSAE, "batchtopk": JumpReLUSAE}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: see conftest


def gsae(
    arch: str, d: int = 16, m: int = 48, seed: int = 1, norms: bool = True, apply_b_dec: bool = True
) -> SAE:
    """An SAE of `arch` with non-trivial biases, thresholds and (with `norms`) decoder-row norms != 1."""
    sae = make_random_sae(d, m, "blocks.1.hook_resid_post", seed=seed, arch=arch, k=5)
    sae.cfg.apply_b_dec_to_input = apply_b_dec
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if norms:
            sae.W_dec.mul_(torch.rand(m, 1, generator=g) * 2 + 0.2)
        sae.b_enc.copy_(torch.randn(m, generator=g) * 0.2)
        sae.b_dec.copy_(torch.randn(d, generator=g))
        if arch in ("jumprelu", "batchtopk"):
            sae.threshold.copy_(torch.rand(m, generator=g) * 0.5 + 0.1)
    return sae


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def planted(n_batches: int, n: int = 256, d: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Sparse codes (~5 of 64 per token) through fixed directions, plus noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(64, d, generator=g), dim=1)
    out = []
    for _ in range(n_batches):
        codes = torch.rand(n, 64, generator=g) * 3 * (torch.rand(n, 64, generator=g) < 0.08)
        out.append({"a": codes @ dirs + 0.05 * torch.randn(n, d, generator=g)})
    return out


# ---------------------------------------------------------------------------------------------
# Faithful import


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "variant", ["unit_rows", "row_norms", "no_b_dec_in", "norm_folded", "bos_on", "bos_off"]
)
def test_import_reproduces_gsae_and_zero_step_export_equals_it(arch, variant):
    sae = gsae(arch, norms=variant != "unit_rows", apply_b_dec=variant != "no_b_dec_in")
    ref = sae
    factor = None
    if variant == "norm_folded":  # an unfolded sae-lens input scale, folded at import as sae-lens folds it
        sae.cfg.normalize_activations = "expected_average_only_in"
        factor = 0.37
        ref = copy.deepcopy(sae)
        ref.fold_activation_norm_scaling_factor(factor)
    if variant.startswith("bos"):
        sae.cfg.metadata.prepend_bos = variant == "bos_on"
        assert check_gsae(sae, "blocks.1.hook_resid_post", prepend_bos=variant == "bos_on") == arch
    x = probe_inputs(ref).float()
    for c in (1.0, 0.3):
        form = import_gsae(sae, c, norm_scaling_factor=factor)
        assert form.arch == arch
        torch.testing.assert_close(form.W_dec.norm(dim=1), torch.ones(48))
        f = form.encode(x * c)
        assert rel(form.decode(f) / c, ref.decode(ref.encode(x))) < 1e-5
        assert rel(f / form.latent_scale(), ref.encode(x)) < 1e-5
        assert (ref.encode(x) > 0).any(-1).float().mean() > 0.9  # the probe makes latents fire
        out = export_form(form, "blocks.1.hook_resid_post")
        assert type(out) is CLASS[arch] and out.cfg.apply_b_dec_to_input == ref.cfg.apply_b_dec_to_input
        assert rel(out.decode(out.encode(x)), ref.decode(ref.encode(x))) < 1e-5
        assert rel(out.encode(x), ref.encode(x)) < 1e-5
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert rel(getattr(out, name), getattr(ref, name)) < 1e-5, name
        assert out.cfg.metadata.act_scale == c and out.cfg.normalize_activations == "none"
    # an SSAE exported by the trainer after 0 steps is the GSAE
    tr = HookTrainer(TrainConfig(), sae if factor is None else ref, "blocks.1.hook_resid_post", 0.3)
    out = tr.export()
    assert rel(out.decode(out.encode(x)), ref.decode(ref.encode(x))) < 1e-5
    if arch == "batchtopk":
        assert out.cfg.metadata.training_architecture == "batchtopk"
        assert out.cfg.metadata.training_architecture_details["k"] == 5


def test_topk_ranking_of_a_gsae_that_does_not_rescale_by_decoder_norm():
    """sae-lens TopK with rescale_acts_by_decoder_norm=False ranks raw pre-activations: folding the
    row norms must not change which latents win, and True ranks pre * norm."""
    for rescale in (False, True):
        sae = gsae("topk")
        sae.cfg.rescale_acts_by_decoder_norm = rescale
        x = probe_inputs(sae).float()
        form = import_gsae(sae)
        assert (form.select is None) == rescale
        assert torch.equal(form.encode(x) > 0, sae.encode(x) > 0)
        assert rel(form.encode(x) / form.latent_scale(), sae.encode(x)) < 1e-5
        out = export_form(form, "h")
        assert rel(out.encode(x), sae.encode(x)) < 1e-5 and rel(out.W_dec, sae.W_dec) < 1e-5


def test_refusals_hook_architecture_normalisation_and_bos():
    sae = gsae("relu")
    with pytest.raises(
        SAEMismatchError, match=r"hook blocks\.2\.hook_resid_post was trained on blocks\.1\.hook_resid_post"
    ):
        check_gsae(sae, "blocks.2.hook_resid_post")
    sae.cfg.metadata.prepend_bos = True
    with pytest.raises(SAEMismatchError, match=r"metadata.prepend_bos=True.*set model.prepend_bos=true"):
        check_gsae(sae, "blocks.1.hook_resid_post", prepend_bos=False)
    from sae_lens import Transcoder, TranscoderConfig

    tc = Transcoder(TranscoderConfig(d_in=16, d_sae=32, d_out=16, apply_b_dec_to_input=False))
    with pytest.raises(SAEArchError, match="cannot finetune a sae-lens Transcoder"):
        arch_of(tc)
    with pytest.raises(SAEMismatchError, match="cannot finetune a sae-lens Transcoder"):
        check_gsae(tc, "blocks.1.hook_resid_post")
    ln = gsae("relu")
    ln.cfg.normalize_activations = "layer_norm"
    with pytest.raises(SAEArchError, match="normalises each token at run time"):
        import_gsae(ln)
    relu = gsae("relu")
    with pytest.raises(
        TrainingError, match=r"train.k=8 sets k of TopK/BatchTopK SAEs, but the GSAE at h is a relu"
    ):
        HookTrainer(TrainConfig(k=8), relu, "h", 1.0)


def test_a_broken_import_is_caught():
    """The check is not vacuous: a form off by a small change is refused."""
    from ssae_ray.training.archs import check_form

    for arch in ARCHS:
        sae = gsae(arch)
        form = import_gsae(sae)
        form.b_dec += 1e-3
        with pytest.raises(SAEArchError, match="changed its function"):
            check_form(form, sae, probe_inputs(sae))


# ---------------------------------------------------------------------------------------------
# Losses and gradients


def _ps(seed: int = 0, d: int = 16, m: int = 48) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, m, generator=g, dtype=torch.float64) * 0.3, torch.randn(m, generator=g, dtype=torch.float64) * 0.1,
            torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1),
            torch.randn(d, generator=g, dtype=torch.float64) * 0.1]  # fmt: skip


@pytest.mark.parametrize("tilt", [0.0, 0.05])
def test_jumprelu_backward_equals_autograd_through_sae_lens_ste(tilt):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    ps = _ps()
    th = torch.rand(48, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5

    def objective(losses):
        return tilted_loss(losses, tilt, "raw", None)

    fast = jumprelu_loss_and_grads(x, *ps, th, 0.3, 0.2, objective)
    leaves = [p.clone().requires_grad_() for p in [*ps, th]]
    W_enc, b_enc, W_dec, b_dec, t = leaves
    pre = (x - b_dec) @ W_enc + b_enc
    f = JumpReLU.apply(pre, t, 0.2, False)
    loss = ((f @ W_dec + b_dec) - x).pow(2).sum(-1) + 0.3 * Step.apply(pre, t, 0.2, False).sum(-1)
    objective(loss).backward()
    torch.testing.assert_close(fast.losses.loss, loss.detach())
    assert fast.grads[4].abs().sum() > 0  # the thresholds get a gradient
    for mine, leaf in zip(fast.grads, leaves, strict=True):
        torch.testing.assert_close(mine, leaf.grad)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("with_dead", [False, True])
def test_topk_backward_equals_autograd_with_aux_loss(batch, with_dead):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    ps = _ps()
    dead = (torch.rand(48, generator=torch.Generator().manual_seed(4)) < 0.5) if with_dead else None

    def objective(losses):
        return tilted_loss(losses, 0.05, "raw", None)

    fast = topk_loss_and_grads(x, *ps, 5, objective, batch=batch, dead=dead, aux_coefficient=0.7)
    leaves = [p.clone().requires_grad_() for p in ps]
    W_enc, b_enc, W_dec, b_dec = leaves
    pre = (x - b_dec) @ W_enc + b_enc
    keep = (batch_topk_acts(pre.detach(), 5) if batch else topk_acts(pre.detach(), 5)) > 0
    x_hat = (pre.relu() * keep) @ W_dec + b_dec
    loss = (x_hat - x).pow(2).sum(-1)
    if dead is not None:  # sae-lens' calculate_topk_aux_loss, per token
        k_aux, scale = min(8, int(dead.sum())), min(int(dead.sum()) / 8, 1.0)
        top = torch.where(dead[None], pre, -torch.inf).topk(k_aux, sorted=False)
        aux_acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        loss = loss + 0.7 * scale * (aux_acts @ W_dec - (x - x_hat).detach()).pow(2).sum(-1)
    objective(loss).backward()
    torch.testing.assert_close(fast.losses.loss, loss.detach())
    assert (fast.losses.l1 > 0).all() == with_dead
    for mine, leaf in zip(fast.grads, leaves, strict=True):
        torch.testing.assert_close(mine, leaf.grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_term_at_tilt_zero_is_exact_erm(arch):
    x = planted(1, n=128)[0]["a"]
    sae = gsae(arch, d=32, m=64, norms=False)
    a = HookTrainer(TrainConfig(tilt=0.0, tilt_mode="raw"), sae, "a", 1.0)
    b = HookTrainer(TrainConfig(tilt=0.0, tilt_mode="scaled"), sae, "a", 1.0)
    oa = a.loss_and_grads(x, 0.1, lambda loss: tilted_loss(loss, 0.0, "raw", None))
    ob = b.loss_and_grads(x, 0.1, lambda loss: loss.mean())
    torch.testing.assert_close(oa.objective, ob.objective, rtol=0, atol=0)
    for ga, gb in zip(oa.grads, ob.grads, strict=True):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    torch.testing.assert_close(oa.weights, torch.full((128,), 1 / 128))


# ---------------------------------------------------------------------------------------------
# Finetuning


def test_jumprelu_finetune_moves_l0_to_its_target_and_lowers_error(tiny_cfg):
    sae = make_random_sae(32, 64, "a", arch="jumprelu", threshold=0.0, seed=4)
    cfg = tiny_cfg.replace(train={"lr": 5e-3, "steps": 120, "decay_steps": 0, "lam": 0.2, "l0_band": [6.0, 10.0],
                                  "adapt_rate": 0.05, "batch_tokens": 256, "scale_activations": False,
                                  "jumprelu_bandwidth": 0.1})  # fmt: skip
    res = finetune(cfg, {"a": sae}, planted(130), progress=False)
    h = res.history
    assert h[0]["a/l0"] > 20  # dense at the start
    tail = [m["a/l0"] for m in h[-10:]]
    assert 4.0 <= sum(tail) / len(tail) <= 12.0, tail
    assert h[-1]["a/fvu"] < 0.5 * h[0]["a/fvu"]
    out = res.saes["a"]
    assert type(out) is JumpReLUSAE and out.threshold.min() >= 0 and out.threshold.max() > 0


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_finetunes_keep_k_and_lower_error(tiny_cfg, arch):
    sae = make_random_sae(32, 64, "a", arch=arch, k=6, seed=4)
    cfg = tiny_cfg.replace(train={"lr": 5e-3, "steps": 60, "decay_steps": 0, "batch_tokens": 256,
                                  "dead_window_tokens": 2048, "topk_threshold_lr": 0.2})  # fmt: skip
    res = finetune(cfg, {"a": sae}, planted(70), progress=False)
    l0 = [m["a/l0"] for m in res.history]
    if arch == "topk":
        assert all(v == 6.0 for v in l0), l0[:5]
    else:  # int(k N) kept over the batch: k per token on average
        assert all(abs(v - 6.0) < 1e-9 for v in l0)
        assert res.history[0]["a/dead"] >= 0
    assert res.history[-1]["a/fvu"] < 0.7 * res.history[0]["a/fvu"]
    out = res.saes["a"]
    assert type(out) is CLASS[arch]
    x = planted(1, seed=9)[0]["a"]
    f = out.encode(x)
    if arch == "topk":
        assert out.cfg.k == 6 and ((f > 0).sum(-1) <= 6).all()
    else:  # saved for inference as JumpReLU at the running threshold: about k per token
        assert 2.0 < float((f > 0).sum(-1).float().mean()) < 15.0
        assert torch.allclose(out.threshold, out.threshold[0].expand(64) * 1.0)


def test_train_k_overrides_the_gsae_k(tiny_cfg):
    sae = make_random_sae(32, 64, "a", arch="topk", k=6)
    cfg = tiny_cfg.replace(train={"steps": 3, "batch_tokens": 128, "k": 3})
    res = finetune(cfg, {"a": sae}, planted(4, n=128), progress=False)
    assert res.history[-1]["a/l0"] == 3.0 and res.saes["a"].cfg.k == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trips_in_the_sae_lens_class(tmp_path, arch):
    tc = TrainConfig(lr=1e-2, batch_tokens=128)
    batches = planted(3, n=128)
    tr = HookTrainer(tc, gsae(arch, d=32, m=64), "a", 0.5)
    for s in range(2):
        tr.apply(tr.step(batches[s]["a"], 1e-2, s))
    save_checkpoint(tmp_path, {"a": tr}, step=2)
    saved = SAE.load_from_disk(tmp_path / "a")
    assert type(saved) is CLASS[arch]
    back = HookTrainer(tc, gsae(arch, d=32, m=64, seed=7), "a", 0.5)
    assert load_checkpoint(tmp_path, {"a": back}) == 2
    for p, q in zip(tr.params, back.params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # and both continue identically
    ma = tr.apply(tr.step(batches[2]["a"], 1e-2, 2))
    mb = back.apply(back.step(batches[2]["a"], 1e-2, 2))
    assert ma["a/loss"] == pytest.approx(mb["a/loss"], rel=1e-5)
    narrow = HookTrainer(tc, gsae(arch, d=32, m=48), "a", 0.5)
    with pytest.raises(TrainingError, match="width 64 .* this run trains width 48"):
        load_checkpoint(tmp_path, {"a": narrow})


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_and_slice_keep_the_architecture(tmp_path, arch):
    sae = gsae(arch)
    back = load_sae(save_sae(sae, tmp_path / arch))
    assert type(back) is CLASS[arch] and arch_of(back) == arch
    x = probe_inputs(sae).float()
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    s = slice_sae(sae, 20)
    assert type(s) is CLASS[arch] and s.cfg.d_sae == 20 and arch_of(s) == arch
    if arch != "topk":  # elementwise activations: the first 20 latents are unchanged
        torch.testing.assert_close(s.encode(x), sae.encode(x)[:, :20])
    else:
        assert s.cfg.k == 5 and ((s.encode(x) > 0).sum(-1) <= 5).all()
        with pytest.raises(SAEMismatchError, match="k=5 to 4 latents"):
            slice_sae(sae, 4)


def test_sparsify_topk_checkpoint_loads_from_disk(tmp_path):
    """A folder as sparsify writes it; the loaded TopKSAE computes sparsify's encode/decode."""
    g = torch.Generator().manual_seed(0)
    d, m, k = 16, 64, 4
    folder = tmp_path / "run" / "layers.1"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"d_in": d, "num_latents": m, "k": k, "expansion_factor": 4,
                                                  "normalize_decoder": True, "multi_topk": False}))  # fmt: skip
    enc_w, enc_b = torch.randn(m, d, generator=g), torch.randn(m, generator=g) * 0.1
    W_dec = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    b_dec = torch.randn(d, generator=g)
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
              str(folder / "sae.safetensors"))  # fmt: skip
    sae = load_sae(folder)
    assert type(sae) is TopKSAE and sae.cfg.k == k and arch_of(sae) == "topk"
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post" and sae.cfg.metadata.prepend_bos is True
    x = torch.randn(32, d, generator=g) * 2
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)  # sparsify: fused_encoder(x - b_dec, ...)
    top = pre.topk(k, dim=-1)
    ref = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(sae.encode(x), ref)
    torch.testing.assert_close(sae.decode(sae.encode(x)), ref @ W_dec + b_dec)
    assert check_gsae(sae, "blocks.1.hook_resid_post", prepend_bos=True) == "topk"


@pytest.mark.parametrize("arch", ARCHS)
def test_tracin_factorised_equals_autograd_per_architecture(arch):
    sae = gsae(arch)
    view = training_view(sae, 0.5)
    g = torch.Generator().manual_seed(1)
    acts = (probe_inputs(sae, 6 * 9).float() * 0.5).reshape(6, 9, 16)
    valid = valid_tokens(torch.ones(6, 9, dtype=torch.long))
    seed_acts = [
        (probe_inputs(sae, 27, seed=5).float() * 0.5).reshape(3, 9, 16)
        + 0.01 * torch.randn(3, 9, 16, generator=g)
    ]
    seed = seed_gradient(view, seed_acts, [valid_tokens(torch.ones(3, 9, dtype=torch.long))], 0.7)
    fast = tracin_scores(view, acts, valid, seed, 0.7)
    slow = tracin_scores_naive(view, acts, valid, seed, 0.7)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert fast.abs().max() > 0


def test_bos_tokenisation_and_gsaes_refused_where_they_enter(tmp_path):
    from ssae_ray.config import ModelConfig, load_config
    from ssae_ray.models import load_lm, make_tiny_model, tokenize_docs
    from ssae_ray.saes import fit_check, load_gsaes

    lm = load_lm(ModelConfig(source=str(make_tiny_model(tmp_path / "m"))))
    texts = ["the river runs through the old city where people sell bread and fish " * 3]
    plain = tokenize_docs(lm.tokenizer, texts, 12)
    bos = tokenize_docs(lm.tokenizer, texts, 12, prepend_bos=True)
    assert lm.tokenizer.bos_token_id is not None and (bos.input_ids[:, 0] == lm.tokenizer.bos_token_id).all()
    assert (plain.input_ids[:, 0] != lm.tokenizer.bos_token_id).any()
    assert bos.input_ids.shape[1] == 12 and torch.equal(bos.input_ids[0, 1:], plain.input_ids[0, :11])
    cfg = load_config("tiny", overrides=[f"workdir={tmp_path}", "sae.min_explained_variance=-1e9"])
    hooks = list(cfg.sae.hooks)
    for arch in ARCHS:  # every architecture enters through load_gsaes and the fit check
        saes = load_gsaes(cfg.replace(sae={"arch": arch, "k": 8}), lm)
        assert all(arch_of(s) == arch for s in saes.values())
        assert set(fit_check(cfg, lm, saes, texts)) == set(hooks)
    g = load_gsaes(cfg, lm)
    swapped = tmp_path / "swapped"
    for h in hooks:
        save_sae(g[h], swapped / h)
    save_sae(g[hooks[0]], swapped / hooks[-1])
    save_sae(g[hooks[-1]], swapped / hooks[0])
    if hooks[0] != hooks[-1]:
        with pytest.raises(SAEMismatchError, match=f"hook {hooks[0]} was trained on {hooks[-1]}"):
            load_gsaes(cfg.replace(sae={"source": str(swapped)}), lm)
    with_bos = tmp_path / "bos"
    for h, s in g.items():
        s.cfg.metadata.prepend_bos = True
        save_sae(s, with_bos / h)
    with pytest.raises(SAEMismatchError, match="set model.prepend_bos=true"):
        load_gsaes(cfg.replace(sae={"source": str(with_bos)}), lm)
    assert set(
        load_gsaes(cfg.replace(sae={"source": str(with_bos)}, model={"prepend_bos": True}), lm)
    ) == set(hooks)


def test_gemma_scope_fast_import_fit_check_and_finetune(local_hub, monkeypatch, tmp_path):
    """The default-suite variant of the test below: `gemma-scope-physics`'s model and Gemma Scope SAE
    (trained on the fixture model: realistic explained variance, non-zero b_dec, thresholds) through
    the product's loaders, the exact import, the fit check with the preset's threshold, and three
    finetune steps of 64 tokens that move the thresholds."""
    from ssae_ray.config import load_config
    from ssae_ray.models import load_lm
    from ssae_ray.saes import fit_check, load_gsaes
    from ssae_ray.testing.hub_fixtures import fixture_texts
    from ssae_ray.testing.hub_server import DEFAULT_TOKEN, go_online
    from ssae_ray.training.archs import import_gsae
    from ssae_ray.training.cache import lm_activations

    go_online(monkeypatch, local_hub.url, tmp_path / "hf", token=DEFAULT_TOKEN)
    cfg = load_config("gemma-scope-physics", overrides=[f"workdir={tmp_path}", "model.dtype=float32",
                                                        "model.device=cpu", "model.context_len=32"])  # fmt: skip
    hook = "blocks.12.hook_resid_post"
    lm = load_lm(cfg.model, tmp_path / "models")
    sae = load_gsaes(cfg, lm)[hook]
    assert type(sae) is JumpReLUSAE and sae.b_dec.abs().max() > 0 and (sae.threshold > 0).all()
    texts = fixture_texts(8, seed=5)
    ev = fit_check(cfg, lm, {hook: sae}, texts)[hook]
    assert cfg.sae.min_explained_variance <= ev < 0.97, ev  # realistic: passes the preset's check, not ~1
    import_gsae(sae)  # the exact import, checked on probe inputs (dead latents: zero decoder rows)
    x = torch.cat([b[hook] for b, _ in lm_activations(cfg, lm, texts, [hook])])[:192]
    tr = HookTrainer(TrainConfig(lr=1e-3, lam=2.0, batch_tokens=64), sae, hook, 1.0)
    before = tr.form.threshold.clone()
    for s in range(3):
        m = tr.apply(tr.step(x[64 * s : 64 * (s + 1)], 1e-3, s))
    assert m[f"{hook}/l0"] > 0 and torch.isfinite(torch.tensor(m[f"{hook}/mse"]))
    assert not torch.equal(tr.form.threshold, before)


@pytest.mark.slow
def test_gemma_scope_preset_loads_checks_and_finetunes_through_the_local_hub(
    local_hub, monkeypatch, tmp_path
):
    """`gemma-scope-physics`: gated google/gemma-2-2b and Gemma Scope's canonical 16k layer-12 JumpReLU
    SAE from the (local) Hub through the product's loaders; BOS, hook and exact-import checks, the fit
    check on the model's activations, two finetune steps, and the JumpReLU SSAE saved back."""
    from ssae_ray.config import load_config
    from ssae_ray.models import load_lm
    from ssae_ray.saes import fit_check, load_gsaes
    from ssae_ray.testing.hub_server import DEFAULT_TOKEN, go_online
    from ssae_ray.training.cache import lm_activations

    go_online(monkeypatch, local_hub.url, tmp_path / "hf", token=DEFAULT_TOKEN)
    cfg = load_config("gemma-scope-physics", overrides=[f"workdir={tmp_path}", "model.dtype=float32",
                                                        "model.device=cpu", "model.context_len=16"])  # fmt: skip
    assert cfg.model.prepend_bos and cfg.sae.hooks == ("blocks.12.hook_resid_post",)
    lm = load_lm(cfg.model, tmp_path / "models")
    saes = load_gsaes(cfg, lm)
    sae = saes["blocks.12.hook_resid_post"]
    assert type(sae) is JumpReLUSAE and (sae.cfg.d_in, sae.cfg.d_sae) == (2304, 16384)
    assert sae.cfg.metadata.prepend_bos is True and arch_of(sae) == "jumprelu"
    from ssae_ray.testing.hub_fixtures import fixture_texts

    texts = fixture_texts(8, seed=5)  # unseen documents of the fixture SAE's distribution
    assert 0.5 <= fit_check(cfg, lm, saes, texts)["blocks.12.hook_resid_post"] < 0.97  # trained fixture SAE
    with pytest.raises(SAEMismatchError, match="set model.prepend_bos=true"):
        load_gsaes(cfg.replace(model={"prepend_bos": False}), lm)
    x = torch.cat(
        [b["blocks.12.hook_resid_post"] for b, _ in lm_activations(cfg, lm, texts * 2, list(cfg.sae.hooks))]
    )
    assert x.shape[0] >= 256
    x = x[:256]
    tc = TrainConfig(lr=1e-3, lam=2.0, batch_tokens=128)
    tr = HookTrainer(tc, sae, "blocks.12.hook_resid_post", 1.0)
    before = tr.form.threshold.clone()
    for s in range(2):
        m = tr.apply(tr.step(x[128 * s : 128 * (s + 1)], 1e-3, s))
    assert m["blocks.12.hook_resid_post/l0"] > 0
    out = load_sae(save_sae(tr.export(), tmp_path / "ssae"))
    assert type(out) is JumpReLUSAE and out.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    assert not torch.equal(tr.form.threshold, before) or not torch.equal(out.W_enc, sae.W_enc)


def test_example_finetunes_a_sparsify_checkpoint_from_disk(tmp_path):
    import importlib.util
    from pathlib import Path

    from ssae_ray.models import make_tiny_model

    spec = importlib.util.spec_from_file_location(
        "ex", Path(__file__).parents[1] / "examples" / "finetune_sparsify_topk.py"
    )
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    g = torch.Generator().manual_seed(0)
    layer = tmp_path / "ckpt" / "layers.1"
    layer.mkdir(parents=True)
    (layer / "cfg.json").write_text(json.dumps({"d_in": 64, "num_latents": 128, "k": 8}))
    W_dec = torch.nn.functional.normalize(torch.randn(128, 64, generator=g), dim=1)
    save_file({"encoder.weight": W_dec.clone(), "encoder.bias": torch.zeros(128), "W_dec": W_dec,
               "b_dec": torch.zeros(64)}, str(layer / "sae.safetensors"))  # fmt: skip
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(["Energy and momentum are conserved in every collision of particles."] * 40))
    model = make_tiny_model(tmp_path / "m")
    out = ex.main([str(tmp_path / "ckpt"), "--texts", str(texts), "--out", str(tmp_path / "ssae"), "--preset", "tiny",
                   f"workdir={tmp_path / 'w'}", f"model.source={model}", "sae.min_explained_variance=-1e9",
                   "train.steps=3", "train.batch_tokens=64"])  # fmt: skip
    sae = load_sae(out / "blocks.1.hook_resid_post")
    assert type(sae) is TopKSAE and sae.cfg.k == 8 and sae.cfg.metadata.prepend_bos is True
    assert not torch.equal(sae.W_dec, W_dec)  # it was trained


def test_evaluation_and_autointerp_take_every_architecture(tmp_path):
    from ssae_ray.autointerp.examples import scan
    from ssae_ray.config import ModelConfig
    from ssae_ray.eval.evaluate import evaluate_sae, prepare_test_set
    from ssae_ray.models import load_lm, make_tiny_model, tokenize_docs

    lm = load_lm(ModelConfig(source=str(make_tiny_model(tmp_path / "m"))))
    hook = "blocks.1.hook_resid_post"
    texts = ["the quantum field of the electron interacts with the photon in a box " * 2] * 6
    ts = prepare_test_set(lm, "test", texts, [hook], context_len=16, batch_size=4)
    ctx = tokenize_docs(lm.tokenizer, texts, 16)
    for arch in ARCHS:
        sae = make_random_sae(lm.d_model, 96, hook, arch=arch, k=4, threshold=0.01)
        ev = evaluate_sae(lm, sae, hook, ts)
        assert ev.l0 > 0 and ev.ce_spliced > 0 and ev.fvu > 0, arch
        if arch == "topk":
            assert ev.l0 <= 4
        idx = scan(lm, sae, hook, ctx, k_top=3, k_sample=2, batch_size=4, progress=False)
        assert idx is not None
