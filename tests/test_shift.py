"""SHIFT on Bias in Bios: data sets, probe metrics, attribution vs true ablation, skylines, Table 1."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ssae_ray.config import load_config
from ssae_ray.models import LM, load_lm, sae_splice
from ssae_ray.saes import make_random_sae, slice_sae
from ssae_ray.shift.attribution import attribute, edge_effects, find_circuit, hook_means, metric
from ssae_ray.shift.data import (
    GROUPS,
    DataError,
    bias_in_bios_records,
    gender_from_pronouns,
    load_bios,
    make_sets,
    split_records,
    synthetic_records,
)
from ssae_ray.shift.probe import (
    forward_to,
    group_accuracies,
    pool,
    pooled_reps,
    predict,
    tokenize_bios,
    train_probe,
)
from ssae_ray.shift.shift import (
    ablate_features,
    choose_k,
    feature_ablation,
    neuron_ablation,
    rank_nodes,
    run_shift,
)
from ssae_ray.shift.table import to_csv, to_markdown, write_outputs

HOOKS = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post",
         "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny GPT-NeoX, synthetic bios tokenized, random SAEs at every hook, a trained probe."""
    cfg = load_config("tiny", overrides=["model.precision=fp32"])  # exact comparisons
    lm = load_lm(cfg.model, cache_dir=tmp_path_factory.mktemp("models"))
    rec = synthetic_records(8, seed=1)
    batch = tokenize_bios(lm.tokenizer, [r[0] for r in rec], 32)
    prof = torch.tensor([r[1] for r in rec])
    gen = torch.tensor([r[2] for r in rec])
    saes = {h: make_random_sae(lm.d_model, 96, h, seed=i) for i, h in enumerate(HOOKS)}
    x = pooled_reps(lm, batch, 1)
    probe = train_probe(x, prof, lr=0.01, epochs=20, batch_size=8)
    return lm, batch, prof, gen, saes, probe


def _mean_metric(lm: LM, batch, probe, y, splice=None) -> float:
    return float(metric(probe(pooled_reps(lm, batch, 1, splice)).squeeze(-1), y).mean())


# ------------------------------------------------------------------------------------------- data


def test_gender_from_pronouns():
    assert gender_from_pronouns("He was a physicist. His work ...") == 0
    assert gender_from_pronouns("She sang; her albums, his praise, her fame") == 1
    assert gender_from_pronouns("A band formed in 1960.") is None
    assert gender_from_pronouns("he and she") is None


def test_sets_are_equal_sized_and_test_is_unseen():
    by_split = split_records(synthetic_records(40, seed=0), seed=0)
    amb, bal = make_sets(by_split, {"train": 64, "dev": 32, "test": 48}, seed=0)
    for split in ("train", "dev", "test"):
        a, b = amb[split], bal[split]
        groups_a = {
            g: sum(1 for p, s in zip(a.profession, a.gender, strict=True) if (p, s) == g) for g in GROUPS
        }
        assert groups_a[(0, 1)] == groups_a[(1, 0)] == 0  # gender predicts the label
        assert groups_a[(0, 0)] == groups_a[(1, 1)] > 0
        groups_b = [
            sum(1 for p, s in zip(b.profession, b.gender, strict=True) if (p, s) == g) for g in GROUPS
        ]
        assert len(set(groups_b)) == 1 and groups_b[0] > 0
    assert len(bal["train"].text) == 64 and len(bal["test"].text) == 48
    assert not set(bal["test"].text) & (set(amb["train"].text) | set(bal["train"].text))


def test_missing_group_is_a_clear_error():
    rows = [r for r in synthetic_records(10) if (r[1], r[2]) != (0, 1)]  # no female professors
    with pytest.raises(DataError, match="prof0/f"):
        make_sets(split_records(rows, 0), {"train": 8, "dev": 8, "test": 8}, 0)


def test_bias_in_bios_stream_keeps_professors_and_nurses_per_group():
    stream = [
        {"hard_text": f"bio {i}", "profession": p, "gender": i % 2} for i, p in enumerate([21, 13, 5] * 20)
    ]
    seen = []

    def fake_load(name, split, streaming):
        seen.append((name, split, streaming))
        return iter(stream)

    out = bias_in_bios_records({"train": 3, "dev": 1, "test": 2}, fake_load)
    assert [s[1] for s in seen] == ["train", "dev", "test"] and seen[0][0] == "LabHC/bias_in_bios"
    assert len(out["train"]) == 12 and len(out["dev"]) == 4
    assert {(r[1], r[2]) for r in out["train"]} == set(GROUPS)

    def offline(*a, **k):
        raise ConnectionError("hub unreachable")

    with pytest.raises(DataError, match="wiki_people"):
        bias_in_bios_records({"train": 1, "dev": 1, "test": 1}, offline)


def test_load_bios_is_a_cached_stage(tmp_path):
    cfg = load_config("tiny", overrides=[f"workdir={tmp_path}"])
    a = load_bios(cfg)
    b = load_bios(cfg)
    assert a.ambiguous["train"] == b.ambiguous["train"] and a.source == "synthetic"
    assert a.manifest["counts"]["balanced"]["test"] == len(a.balanced["test"].text)
    assert len(list((tmp_path / "bios").iterdir())) == 1


# ------------------------------------------------------------------------------------------ probe


def test_worst_group_accuracy_on_a_hand_made_confusion_table():
    # male prof0: 4/4 right, female prof0: 1/4, male prof1: 2/4, female prof1: 4/4
    prof = [0] * 8 + [1] * 8
    gen = [0, 0, 0, 0, 1, 1, 1, 1] * 2
    pred = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1]
    acc = group_accuracies(pred, prof, gen)
    assert acc.groups == {"prof0/m": 1.0, "prof0/f": 0.25, "prof1/m": 0.5, "prof1/f": 1.0}
    assert acc.worst == 0.25
    assert acc.profession == pytest.approx(11 / 16)
    assert acc.gender == pytest.approx(13 / 16)  # predicted class == gender
    with pytest.raises(ValueError, match="equal"):
        group_accuracies([0, 1], [0], [0])


def test_probe_learns_a_separable_task():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    x = torch.randn(200, 8, generator=g) + 3 * (2 * y[:, None].float() - 1) * torch.eye(8)[0]
    probe = train_probe(x, y, lr=0.01, epochs=1, batch_size=16)
    assert (predict(probe, x) == y).float().mean() > 0.9
    again = train_probe(x, y, lr=0.01, epochs=1, batch_size=16)
    assert torch.equal(probe.weight, again.weight)  # seeded


def test_pooling_ignores_padding_and_position_zero():
    act = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(act, mask), torch.tensor([[1.5], [6.0]]))
    torch.testing.assert_close(pool(act, mask, skip_first=False), torch.tensor([[1.0], [5.5]]))


# ------------------------------------------------------------------------- splicing / attribution


def test_splicing_all_saes_with_error_terms_leaves_logits_unchanged(tiny):
    lm, batch, _, _, saes, probe = tiny
    clean = probe(pooled_reps(lm, batch, 1)).squeeze(-1)
    spliced = probe(pooled_reps(lm, batch, 1, {h: sae_splice(s, error_term=True) for h, s in saes.items()}))
    torch.testing.assert_close(spliced.squeeze(-1), clean, atol=1e-5, rtol=1e-5)
    without_error = probe(pooled_reps(lm, batch, 1, {h: sae_splice(s) for h, s in saes.items()})).squeeze(-1)
    assert (without_error - clean).abs().max() > 1e-3  # random SAEs reconstruct badly: the error term matters


def test_bf16_probe_logits_and_error_term_splices(tiny, auto_bf16):
    """`precision=auto` resolved to bf16 (forced where emulated): the probe's logits on the bf16
    forward within the bf16 bound of fp32 (both layers' matmuls on the path), and splicing every
    SAE with its error term leaves the bf16 forward's logits within the same bound."""
    from ssae_ray.testing.precision import assert_bf16_close

    lm, batch, _, _, saes, probe = tiny
    lm16 = lm._replace(precision=auto_bf16)
    with torch.no_grad():
        clean32 = probe(pooled_reps(lm, batch, 1)).squeeze(-1)
        clean = probe(pooled_reps(lm16, batch, 1)).squeeze(-1)
        splice = {h: sae_splice(s, error_term=True) for h, s in saes.items()}
        spliced = probe(pooled_reps(lm16, batch, 1, splice)).squeeze(-1)
    assert_bf16_close(clean, clean32, 2 * 6, "probe logits")
    assert_bf16_close(spliced, clean, 2 * 6, "error-term splices", vs_fp32=False)


def test_forward_to_stops_at_the_probe_layer(tiny):
    lm, batch, *_ = tiny
    from ssae_ray.models import capture

    act = forward_to(lm, batch.input_ids, batch.attention_mask, 0)
    ref = capture(lm, batch.input_ids, batch.attention_mask, ["blocks.0.hook_resid_post"])[
        "blocks.0.hook_resid_post"
    ]
    torch.testing.assert_close(act, ref)


def test_prefix_skips_early_layers_without_changing_results(tiny):
    lm, batch, prof, _, saes, probe = tiny
    from ssae_ray.shift.probe import make_prefix

    late = {h: s for h, s in saes.items() if h.startswith("blocks.1.")}
    prefix = make_prefix(lm, batch, 1, batch_size=8)
    abl = feature_ablation(late, [("blocks.1.hook_mlp_out", 3), ("blocks.1.hook_resid_post", 5)])
    for splice in (None, abl):
        full = pooled_reps(lm, batch, 1, splice, batch_size=8)
        torch.testing.assert_close(pooled_reps(lm, batch, 1, splice, batch_size=8, prefix=prefix), full, atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
    a = attribute(lm, batch, probe, prof, 1, late, batch_size=8)
    b = attribute(lm, batch, probe, prof, 1, late, batch_size=8, prefix=prefix)
    for h in late:
        torch.testing.assert_close(a.features[h], b.features[h], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="prefix"):
        pooled_reps(lm, batch, 1, feature_ablation(saes, [("blocks.0.hook_mlp_out", 0)]), prefix=prefix)


def test_attribution_patching_matches_true_feature_ablation(tiny):
    lm, batch, prof, _, saes, probe = tiny
    attr = attribute(lm, batch, probe, prof, 1, saes, batch_size=16)
    base = _mean_metric(lm, batch, probe, prof)
    est, true = [], []
    for h in HOOKS:
        for i in attr.features[h].abs().argsort(descending=True)[:3].tolist():
            est.append(float(attr.features[h][i]))
            true.append(_mean_metric(lm, batch, probe, prof, feature_ablation(saes, [(h, i)])) - base)
    est_t, true_t = torch.tensor(est), torch.tensor(true)
    assert torch.corrcoef(torch.stack([est_t, true_t]))[0, 1] > 0.95
    assert ((est_t - true_t).abs() <= 0.25 * true_t.abs() + 1e-4).float().mean() >= 0.8
    assert (true_t.abs() > 1e-4).all()  # the effects compared are not all zero


@pytest.mark.slow
def test_integrated_gradients_add_up_to_zeroing_the_hook(tiny):
    """IG's completeness: the features' and error's IEs of a hook sum to the effect of zeroing it."""
    lm, batch, prof, _, saes, probe = tiny
    h = "blocks.0.hook_resid_post"
    sub = {h: saes[h]}
    base = _mean_metric(lm, batch, probe, prof)

    def zero(x):
        out = torch.zeros_like(x)
        out[:, 0] = x[:, 0]
        return out

    true = _mean_metric(lm, batch, probe, prof, {h: zero}) - base
    ig = attribute(lm, batch, probe, prof, 1, sub, ig_hooks=[h], ig_steps=10)
    atp = attribute(lm, batch, probe, prof, 1, sub)
    total_ig = float(ig.features[h].sum()) + ig.errors[h]
    total_atp = float(atp.features[h].sum()) + atp.errors[h]
    assert abs(total_ig - true) < 0.1 * abs(true)
    assert abs(total_ig - true) < abs(total_atp - true)


def test_mean_ablation_attribution_matches_true_neuron_ablation(tiny):
    lm, batch, prof, _, saes, probe = tiny
    h = "blocks.1.hook_mlp_out"
    means = hook_means(lm, batch, [h])
    attr = attribute(lm, batch, probe, prof, 1, means=means)
    base = _mean_metric(lm, batch, probe, prof)
    for i in attr.neurons[h].abs().argsort(descending=True)[:3].tolist():
        true = _mean_metric(lm, batch, probe, prof, neuron_ablation(means, [(h, i)])) - base
        assert float(attr.neurons[h][i]) == pytest.approx(true, rel=0.25, abs=1e-4)


def test_edge_effect_matches_the_measured_change_of_the_downstream_feature(tiny):
    """edge(u -> d) ~ sum_t dm/dd_t * (d_t(u ablated) - d_t), with d_t measured by really ablating u."""
    lm, batch, prof, _, saes, probe = tiny
    h1, h2 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    sub = {h1: saes[h1], h2: saes[h2]}
    attr = attribute(lm, batch, probe, prof, 1, sub)
    i = int(attr.features[h2].abs().argmax())
    edges = edge_effects(lm, batch, probe, prof, 1, sub, [(h2, i)])
    ups = sorted(((k, v) for k, v in edges.items() if k[0].startswith(h1 + "/") and not k[0].endswith("err")),
                 key=lambda kv: -abs(kv[1]))[:3]  # fmt: skip
    from ssae_ray.shift.attribution import hook_grads

    _, grads = hook_grads(lm, batch.input_ids, batch.attention_mask, probe, prof, 1, [h2])
    w = grads[h2] @ saes[h2].W_dec[i]  # dm/df_i per position
    pm = batch.attention_mask.float().clone()
    pm[:, 0] = 0

    def d_acts(splice):
        out = {}
        forward_to(lm, batch.input_ids, batch.attention_mask, 1, {**splice, h2: lambda x: x},
                   on_act=lambda n, a: out.__setitem__(n, a) if n == h2 else None)  # fmt: skip
        return saes[h2].encode(out[h2])[..., i].detach()

    d0 = d_acts({})
    for (u, _), v in ups:
        j = int(u.split("/")[1])
        delta = d_acts(feature_ablation(sub, [(h1, j)])) - d0
        measured = float((w * delta * pm).sum().detach()) / batch.input_ids.shape[0]
        assert v == pytest.approx(measured, rel=0.3, abs=1e-5)


def test_circuit_nodes_pass_the_threshold(tiny):
    lm, batch, prof, _, saes, probe = tiny
    circuit, attr = find_circuit(
        lm,
        batch,
        probe,
        prof,
        1,
        saes,
        node_threshold=1e-3,
        edge_threshold=1e-4,
        max_edge_nodes=2,
        ig_steps=2,
    )
    assert circuit.features and all(abs(v) > 1e-3 for _, _, v in circuit.features)
    assert [abs(v) for *_, v in circuit.features] == sorted(
        (abs(v) for *_, v in circuit.features), reverse=True
    )
    n_above = sum(int((v.abs() > 1e-3).sum()) for v in attr.features.values())
    assert len(circuit.features) == n_above
    assert all(abs(v) > 1e-4 for *_, v in circuit.edges)


# ------------------------------------------------------------------------------------------ SHIFT


def _planted(n: int, gen_scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced bios as [n, 2, d] 'activations' (position 0 unused): a strong gender direction e0
    and a weaker profession direction e1, plus noise."""
    g = torch.Generator().manual_seed(seed)
    prof = torch.arange(n) % 2
    gen = (torch.arange(n) // 2) % 2
    x = 0.3 * torch.randn(n, 2, 16, generator=g)
    x[:, 1, 0] += gen_scale * (2 * gen.float() - 1)
    x[:, 1, 1] += 1.0 * (2 * prof.float() - 1)
    return x, prof, gen


def test_ablating_a_planted_gender_feature_raises_worst_group_accuracy():
    sae = make_random_sae(16, 32, "blocks.0.hook_resid_post", seed=0)
    with torch.no_grad():  # feature 0 reads and writes the gender direction e0
        sae.W_dec[0] = torch.eye(16)[0]
        sae.W_enc[:, 0] = torch.eye(16)[0]
        sae.W_dec[1] = -torch.eye(16)[0]
        sae.W_enc[:, 1] = -torch.eye(16)[0]
    x_bal, prof, gen = _planted(400, 3.0, seed=1)
    amb = prof == gen
    probe = train_probe(x_bal[amb, 1], prof[amb], lr=0.01, epochs=5, batch_size=16)
    before = group_accuracies(predict(probe, x_bal[:, 1]), prof, gen)
    after_x = feature_ablation({"h": sae}, [("h", 0), ("h", 1)])["h"](x_bal)
    torch.testing.assert_close(after_x[:, 0], x_bal[:, 0])  # position 0 untouched
    after = group_accuracies(predict(probe, after_x[:, 1]), prof, gen)
    assert before.worst < 0.5 < after.worst
    assert after.gender < before.gender
    # the skyline picks the planted features when they rank first
    ranked = rank_nodes({"h": torch.tensor([5.0, 4.0] + [0.0] * 30)})
    assert ranked[:2] == [("h", 0), ("h", 1)]


def test_ablate_features_subtracts_exactly_their_decoder_contribution():
    sae = make_random_sae(8, 20, "h", seed=2)
    x = torch.randn(3, 5, 8)
    out = ablate_features(x, sae, [3, 7])
    f = sae.encode(x)
    torch.testing.assert_close(out, x - f[..., [3, 7]] @ sae.W_dec[[3, 7]])
    f_ablated = f.clone()
    f_ablated[..., [3, 7]] = 0
    torch.testing.assert_close(out, sae.decode(f_ablated) + (x - sae.decode(f)), atol=1e-5, rtol=1e-5)


def test_choose_k_keeps_the_best_dev_profession_accuracy():
    from ssae_ray.shift.probe import Accuracies

    scores = {1: 0.6, 2: 0.8, 5: 0.8, 10: 0.7}
    sky = choose_k([("h", i) for i in range(7)], (1, 2, 5, 10), 200,
                   lambda nodes: Accuracies(scores[len(nodes) if len(nodes) < 7 else 10], 0.5, 0.5, {}))  # fmt: skip
    assert sky.k == 2  # ties go to fewer ablations
    assert [c["k"] for c in sky.curve] == [1, 2, 5, 7]  # capped at the ranked nodes
    assert rank_nodes({"a": torch.tensor([0.1, 0.9]), "b": torch.tensor([0.5])}, {("a", 0), ("b", 0)}) == [
        ("b", 0), ("a", 0)]  # fmt: skip


@pytest.mark.slow
def test_run_shift_on_the_tiny_model_writes_table_one(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(
        shift={"n_train": 48, "n_dev": 24, "n_test": 48, "max_edge_nodes": 2, "skyline_grid": [1, 5]},
        sae={"hooks": ["blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]},  # layer 0 runs once (prefix)
    )
    lm = load_lm(cfg.model, cache_dir=tmp_path / "models")
    data = load_bios(cfg)
    g = {h: make_random_sae(lm.d_model, 64, h, seed=i) for i, h in enumerate(cfg.sae.hooks)}
    res = run_shift(cfg, lm, data, {"GSAE": g, "Comp. GSAE": {h: slice_sae(s, 16) for h, s in g.items()}})
    methods = [r.method for r in res.rows]
    assert methods == ["Original", "CBP", "Neuron skyline", "Neuron skyline+retrain", "GSAE SHIFT",
                       "GSAE SHIFT+retrain", "Comp. GSAE SHIFT", "Comp. GSAE SHIFT+retrain", "Oracle"]  # fmt: skip
    for r in res.rows:
        # the balanced set holds all four groups; profession accuracy is their (weighted) mean
        assert set(r.acc.groups) == {"prof0/m", "prof0/f", "prof1/m", "prof1/f"}, r
        assert 0 <= r.acc.worst <= r.acc.profession <= 1, r
        assert r.acc.worst == min(r.acc.groups.values())
    assert all(1 <= r.n_ablated <= 5 for r in res.rows if "SHIFT" in r.method)
    assert set(res.curves) == {"Neuron skyline", "GSAE SHIFT", "Comp. GSAE SHIFT"}
    assert res.circuits["GSAE"]["probe_layer"] == res.layer == 1
    paths = write_outputs(res, tmp_path / "out", {"notes": ["tiny"]})
    assert {p.name for p in paths} == {"table.csv", "table.md", "result.json", "skyline.png", "table.png"}
    assert (tmp_path / "out" / "table.csv").read_text().splitlines()[
        0
    ] == "method,profession,gender,worst,n_ablated"
    assert json.loads((tmp_path / "out" / "result.json").read_text())["rows"][0]["method"] == "Original"


def test_table_layout():
    from ssae_ray.shift.probe import Accuracies
    from ssae_ray.shift.shift import Row

    rows = [
        Row("Original", Accuracies(0.619, 0.874, 0.244, {}), None),
        Row("GSAE SHIFT", Accuracies(0.885, 0.54, 0.76, {}), 37),
    ]
    md = to_markdown(rows, ["small"])
    assert "| Original | 61.9 | 87.4 | 24.4 |  |" in md and "| GSAE SHIFT | 88.5 | 54.0 | 76.0 | 37 |" in md
    assert md.splitlines()[0].startswith("| Method | ↑Prof. | ↓Gen. | ↑Worst")
    assert to_csv(rows).splitlines()[2] == "GSAE SHIFT,88.5,54.0,76.0,37"


def test_probe_module_is_plain_linear(tiny):
    *_, probe = tiny
    assert isinstance(probe, nn.Linear) and not probe.weight.requires_grad


def test_bios_follow_the_gsaes_bos_convention(tiny):
    """With model.prepend_bos (the GSAEs' sae-lens `prepend_bos`) every bio context starts with BOS
    and keeps context_len tokens; without it, none does. Pooling skips position 0 either way."""
    lm = tiny[0]
    texts = ["she was a nurse in the city hospital for many years " * 4, "he"]
    plain = tokenize_bios(lm.tokenizer, texts, 16)
    bos = tokenize_bios(lm.tokenizer, texts, 16, prepend_bos=True)
    b = lm.tokenizer.bos_token_id
    assert b is not None and bos.input_ids.shape[1] == plain.input_ids.shape[1] == 16
    assert (bos.input_ids[:, 0] == b).all() and not (plain.input_ids[:, 0] == b).any()
    assert bos.input_ids[0, 1:].tolist() == plain.input_ids[0, :15].tolist()  # BOS + the first 15 text tokens
    assert bos.attention_mask[1].tolist()[:2] == [1, 1]  # a one-token bio: BOS + it
    x = pooled_reps(lm, bos, 1)
    assert x.shape == (2, lm.d_model) and torch.isfinite(x).all()
    no_bos = SimpleNamespace(bos_token_id=None)
    with pytest.raises(ValueError, match="prepend_bos"):
        tokenize_bios(no_bos, texts, 16, prepend_bos=True)
