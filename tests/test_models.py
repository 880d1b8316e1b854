import pytest
import torch

from ssae_ray.config import ModelConfig
from ssae_ray.models import (
    HookError,
    ModelLoadError,
    TokenBatch,
    by_length,
    cap_tokens,
    capture,
    load_lm,
    make_tiny_model,
    parse_hook,
    sae_splice,
    token_losses,
    tokenize_docs,
    validate_hooks,
    zero_splice,
)
from ssae_ray.saes import make_random_sae

TEXTS = [
    "Energy and momentum are conserved in every collision of particles.",
    "The river runs through the old city, where people sell bread and fish at the market.",
    "A king and a queen",
]


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def lm(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("m") / request.param, request.param)
    return load_lm(ModelConfig(source=str(folder), precision="fp32"))  # exact comparisons


@pytest.fixture(scope="module")
def batch(lm):
    return tokenize_docs(lm.tokenizer, TEXTS, context_len=12)


def test_loaded_through_the_real_loader(lm):
    assert lm.arch in ("gpt_neox", "llama")
    assert lm.n_layers == 2 and lm.d_model == 64
    assert lm.tokenizer.padding_side == "right" and lm.tokenizer.pad_token is not None


def test_tokenize_docs_cuts_and_pads(lm, batch):
    n_tok = [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert int(batch.attention_mask.sum()) == sum(n_tok)
    assert batch.input_ids.shape[1] <= 12
    assert batch.doc_index.tolist() == sorted(batch.doc_index.tolist())
    assert set(batch.doc_index.tolist()) == {0, 1, 2}


def test_by_length_and_cap_tokens():
    lengths = [3, 7, 2, 7, 5]
    ids = torch.zeros(5, 7, dtype=torch.long)
    mask = torch.zeros(5, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) + 10 * i
        mask[i, :n] = 1
    tb = TokenBatch(ids, mask, torch.tensor([0, 0, 1, 2, 2]))
    s = by_length(tb)
    assert s.attention_mask.sum(1).tolist() == [7, 7, 5, 3, 2]
    assert s.doc_index.tolist() == [0, 2, 2, 0, 1]  # rows move with their document; ties keep order
    assert torch.equal(s.input_ids[0], ids[1]) and torch.equal(s.input_ids[1], ids[3])
    # cap_tokens: the shortest prefix of contexts holding >= max_tokens tokens
    assert cap_tokens(tb, 10).input_ids.shape[0] == 2  # 3 + 7
    assert cap_tokens(tb, 11).input_ids.shape[0] == 3
    assert cap_tokens(tb, 8, skip_first=True).input_ids.shape[0] == 2  # 2 + 6
    assert cap_tokens(tb, 10**6).input_ids.shape[0] == 5 and cap_tokens(tb, None) is tb


def test_capture_matches_hidden_states_and_modules(lm, batch):
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out",
             "blocks.0.hook_attn_out"]  # fmt: skip
    acts = capture(lm, batch.input_ids, batch.attention_mask, hooks)
    with torch.no_grad():
        out = lm.model(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    hs = out.hidden_states
    torch.testing.assert_close(acts["blocks.0.hook_resid_pre"], hs[0])
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hs[1])
    # module outputs, grabbed independently with plain forward hooks
    layers = lm.model.gpt_neox.layers if lm.arch == "gpt_neox" else lm.model.model.layers
    got = {}
    mlp = layers[1].mlp
    attn = layers[0].attention if lm.arch == "gpt_neox" else layers[0].self_attn
    h1 = mlp.register_forward_hook(lambda m, a, o: got.__setitem__("mlp", o))
    h2 = attn.register_forward_hook(lambda m, a, o: got.__setitem__("attn", o[0]))
    with torch.no_grad():
        lm.model(batch.input_ids, attention_mask=batch.attention_mask)
    h1.remove(), h2.remove()
    torch.testing.assert_close(acts["blocks.1.hook_mlp_out"], got["mlp"])
    torch.testing.assert_close(acts["blocks.0.hook_attn_out"], got["attn"])
    assert list(acts) == hooks and all(a.shape == (*batch.input_ids.shape, 64) for a in acts.values())


# Matmuls of each layer on the path to a hook: attention is q/k/v, scores, values, output (4), the
# MLP two; GPT-NeoX adds both branches to the residual in parallel, Llama runs them in sequence.
_PATH_MATMULS = {"blocks.0.hook_resid_pre": 0, "blocks.0.hook_attn_out": 4, "blocks.0.hook_resid_post": 6,
                 "blocks.1.hook_mlp_out": 12}  # fmt: skip


def test_capture_in_bf16_is_within_bf16_error_of_fp32(lm, batch, auto_bf16):
    """`precision=auto` resolved to bf16 (forced where emulated): every hook's activations within
    the bf16 bound of the fp32 capture, and really computed in bf16; the embeddings (no matmul)
    are exact."""
    from ssae_ray.testing.precision import assert_bf16_close

    lm16 = lm._replace(precision=auto_bf16)
    hooks = list(_PATH_MATMULS)
    a32 = capture(lm, batch.input_ids, batch.attention_mask, hooks)
    a16 = capture(lm16, batch.input_ids, batch.attention_mask, hooks)
    assert torch.equal(a16["blocks.0.hook_resid_pre"], a32["blocks.0.hook_resid_pre"])
    for h in hooks[1:]:
        assert a16[h].dtype == torch.float32  # captured activations are always fp32
        real = batch.attention_mask.bool()
        assert_bf16_close(a16[h][real], a32[h][real], _PATH_MATMULS[h], h)


def test_capture_stops_after_deepest_layer(lm, batch):
    layers = lm.model.gpt_neox.layers if lm.arch == "gpt_neox" else lm.model.model.layers
    calls = []
    h = layers[1].register_forward_hook(lambda *a: calls.append(1))
    head = lm.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("head"))
    try:
        capture(lm, batch.input_ids, batch.attention_mask, ["blocks.0.hook_resid_post"])
        assert calls == []
        capture(lm, batch.input_ids, batch.attention_mask, ["blocks.1.hook_resid_pre"])
        assert calls == []
        capture(lm, batch.input_ids, batch.attention_mask, ["blocks.1.hook_resid_post"])
        assert calls == [1]
    finally:
        h.remove(), head.remove()


class _Identity(torch.nn.Module):
    """An SAE whose reconstruction is exact: decode(encode(x)) == x."""

    def __init__(self, d):
        super().__init__()
        self.W_dec = torch.nn.Parameter(torch.eye(d))

    def encode(self, x):
        return x

    def decode(self, f):
        return f @ self.W_dec


def test_exact_splice_leaves_logits_and_zero_ablation_hurts(lm, batch):
    hook = "blocks.0.hook_resid_post"
    clean = token_losses(lm, batch.input_ids, batch.attention_mask)
    exact = token_losses(lm, batch.input_ids, batch.attention_mask, {hook: sae_splice(_Identity(64))})
    torch.testing.assert_close(exact.loss, clean.loss)
    zero = token_losses(lm, batch.input_ids, batch.attention_mask, {hook: zero_splice()})
    n = clean.mask.sum()
    assert (zero.loss.sum() / n) > (clean.loss.sum() / n)
    # position 0 predictions and padding never count
    assert not clean.mask[:, 0].any()
    assert clean.mask.sum() == (batch.attention_mask[:, 1:].sum() - batch.input_ids.shape[0])


def test_error_term_splice_is_exact_with_random_sae(lm, batch):
    hook = "blocks.1.hook_mlp_out"
    sae = make_random_sae(64, 128, hook)
    clean = token_losses(lm, batch.input_ids, batch.attention_mask)
    spl = token_losses(lm, batch.input_ids, batch.attention_mask, {hook: sae_splice(sae, error_term=True)})
    torch.testing.assert_close(spl.loss, clean.loss, atol=1e-5, rtol=1e-5)
    noerr = token_losses(lm, batch.input_ids, batch.attention_mask, {hook: sae_splice(sae)})
    assert not torch.allclose(noerr.loss, clean.loss)


def test_bad_hooks_and_sources(lm, tmp_path):
    with pytest.raises(HookError, match="not a hook point"):
        parse_hook("layer3.resid")
    with pytest.raises(HookError, match="has 2 layers"):
        validate_hooks(lm, ["blocks.7.hook_resid_post"])
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_lm(ModelConfig(source=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="not installed"):
        load_lm(ModelConfig(source="wheel:no_such_pkg_xyz"))
