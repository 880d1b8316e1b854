"""The GSAE release shipped with the package (`ssae_ray/release.py`, `ssae_ray/releases/`): it
loads through the release path, reproduces its manifest's held-out metrics, and fails when the
shipped files or the recipe that built them drift apart; `ssae-ray pretrain --ship` writes a
release that loads the same way."""

from __future__ import annotations

import json

import pytest

from ssae_ray import release
from ssae_ray.config import load_config

SHIPPED = release.LOCAL_RELEASE in release.shipped_releases()
needs_release = pytest.mark.skipif(
    not SHIPPED,
    reason=f"release {release.LOCAL_RELEASE} is not shipped yet: build it with "
    "`ssae-ray pretrain --preset local-converged --ship`",
)


def _shipped() -> dict:
    assert SHIPPED, "the local GSAE release is not shipped"
    return release.read_release_manifest(release.LOCAL_RELEASE)


@needs_release
def test_shipped_release_matches_its_recipe_and_files():
    """The manifest's recipe hash is the one `local-converged` gives now (change a pretraining
    setting of the recipe and this fails until the release is re-shipped), every file has its
    sha256, and `local` loads exactly this release through `sae.source=release`."""
    m = _shipped()
    recipe = load_config(m["recipe"]["preset"])
    assert m["recipe"]["preset"] == "local-converged"
    assert m["recipe"]["config_hash"] == release.recipe_hash(recipe), (
        "ssae_ray/presets/local-converged.yaml changed a setting the shipped GSAE depends on: rebuild and "
        "re-ship it (ssae-ray pretrain --preset local-converged --ship)"
    )
    assert m["recipe"]["fields"] == json.loads(json.dumps(release.recipe_fields(recipe)))
    release.verify_release(release.LOCAL_RELEASE)
    local = load_config("local")
    assert local.sae.source == "release"
    assert [i.partition(":")[0] for i in local.sae.sae_ids] == [release.LOCAL_RELEASE]
    assert [i.partition(":")[2] for i in local.sae.sae_ids] == list(local.sae.hooks)
    # the recipe's model and hooks are the ones `local` runs
    assert local.model.source == recipe.model.source and list(local.sae.hooks) == list(recipe.sae.hooks)
    # training stopped by the convergence rule and the held-out metrics are those of a converged GSAE
    assert m["training"]["stop_reason"] == "converged"
    for h in local.sae.hooks:
        v = m["heldout"]["metrics"][h]
        assert v["fvu"] < 0.2 and 5 < v["l0"] < 25 and v["dead"] == 0
        assert m["saes"][h]["bytes"] < 6_000_000  # float16 storage


@needs_release
def test_a_changed_recipe_or_file_is_caught(tmp_path, monkeypatch):
    m = _shipped()
    recipe = load_config(m["recipe"]["preset"], overrides=["train.pretrain_lam=3.0"])
    assert release.recipe_hash(recipe) != m["recipe"]["config_hash"]
    # the finetune, sweep and eval settings are not part of the recipe
    same = load_config(m["recipe"]["preset"], overrides=["train.lr=1e-3", "sweep.lams=[2.0]"])
    assert release.recipe_hash(same) == m["recipe"]["config_hash"]
    # a copy of the release with one byte of its weights changed is refused at load
    import shutil

    src = release.RELEASES_DIR / release.LOCAL_RELEASE
    shutil.copytree(src, tmp_path / release.LOCAL_RELEASE)
    monkeypatch.setattr(release, "RELEASES_DIR", tmp_path)
    hook = next(iter(m["saes"]))
    w = tmp_path / release.LOCAL_RELEASE / hook / "sae_weights.safetensors"
    b = bytearray(w.read_bytes())
    b[-1] ^= 1
    w.write_bytes(bytes(b))
    with pytest.raises(release.ReleaseError, match="does not match its manifest"):
        release.load_shipped(release.LOCAL_RELEASE, hook)


@needs_release
def test_shipped_release_reproduces_its_heldout_metrics(tmp_path):
    """Load SmolLM2 and the shipped GSAE as `local` does (`load_gsaes`, `sae.source=release`) and
    re-score it on the release's held-out documents: FVU, L0 and spliced CE as the manifest says."""
    m = _shipped()
    check_heldout_metrics(m, tmp_path)


def check_heldout_metrics(m: dict, tmp_path) -> None:
    from ssae_ray.models import load_lm
    from ssae_ray.saes import load_gsaes

    hooks = list(m["saes"])
    ids = ",".join(f"'{release.LOCAL_RELEASE}:{h}'" for h in hooks)
    cfg = load_config("local", overrides=[f"workdir={tmp_path}", "model.precision=fp32", "sae.source=release",
                                          f"sae.sae_ids=[{ids}]", f"sae.hooks=[{','.join(hooks)}]"])  # fmt: skip
    lm = load_lm(cfg.model, tmp_path / "models")
    saes = load_gsaes(cfg, lm)
    texts = release.heldout_texts(release.LOCAL_RELEASE)
    assert len(texts) == m["heldout"]["docs"]
    for h, sae in saes.items():
        want = m["saes"][h]["check"]
        got = release.heldout_metrics(lm, sae, h, texts, release.CHECK_TOKENS, cfg.model.context_len,
                                      cfg.model.prepend_bos, cfg.eval.batch_size)  # fmt: skip
        assert got["tokens"] == want["tokens"]
        assert got["fvu"] == pytest.approx(want["fvu"], abs=2e-3)
        assert got["l0"] == pytest.approx(want["l0"], abs=0.1)
        assert got["ce_spliced"] == pytest.approx(want["ce_spliced"], abs=5e-3)
        assert got["ce_clean"] == pytest.approx(want["ce_clean"], abs=5e-3)
        # the check subset agrees with training's held-out validation (bf16 or fp32, 20k tokens)
        assert got["fvu"] == pytest.approx(m["heldout"]["metrics"][h]["fvu"], abs=0.05)


def test_ship_writes_a_release_that_loads_like_one(tiny_cfg, tmp_path, monkeypatch, capsys):
    """`ssae-ray pretrain --ship` on a tiny recipe: a release folder in sae-lens layout with a
    manifest; `sae.source=release` loads it; a rebuild is compared with it."""
    from ssae_ray import cli

    monkeypatch.setattr(release, "RELEASES_DIR", tmp_path / "releases")
    over = [f"workdir={tiny_cfg.root}", "sae.source=pretrain", "train.pretrain_val_tokens=300",
            "sae.hooks=[blocks.1.hook_resid_post]"]  # fmt: skip
    assert cli.main(["pretrain", "--preset", "tiny", "--ship", "tiny-gsae", *over]) == 0
    out = capsys.readouterr().out
    assert "no shipped release was built by this recipe" in out and "shipped:" in out
    d = tmp_path / "releases" / "tiny-gsae"
    hook = "blocks.1.hook_resid_post"
    assert (d / hook / "cfg.json").is_file() and (d / hook / "sae_weights.safetensors").is_file()
    m = release.read_release_manifest("tiny-gsae")
    cfg = load_config("tiny", overrides=over)
    assert m["recipe"]["config_hash"] == release.recipe_hash(cfg) and m["recipe"]["preset"] == "tiny"
    assert set(m["saes"][hook]["check"]) >= {"fvu", "l0", "ce_spliced"}
    assert release.heldout_texts("tiny-gsae")
    from safetensors.torch import load_file

    assert {str(v.dtype) for v in load_file(d / hook / "sae_weights.safetensors").values()} == {
        "torch.float16"
    }
    # loads through the release path as float32, the same function as the pretrained one (to fp16)
    from ssae_ray.models import load_lm
    from ssae_ray.saes import load_gsaes

    rcfg = load_config("tiny", overrides=[f"workdir={tiny_cfg.root}", "sae.source=release",
                                          f"sae.sae_ids=['tiny-gsae:{hook}']", f"sae.hooks=[{hook}]"])  # fmt: skip
    lm = load_lm(rcfg.model, rcfg.root / "models")
    sae = load_gsaes(rcfg, lm)[hook]
    assert sae.W_dec.dtype.is_floating_point and str(sae.W_dec.dtype) == "torch.float32"
    # a second pretrain of the same recipe finds the release and says how close it is
    assert cli.main(["pretrain", "--preset", "tiny", *over]) == 0
    out = capsys.readouterr().out
    assert "rebuild of release tiny-gsae" in out and "| shipped |" in out and "| rebuilt |" in out
    assert "median best-match cosine 1.000" in out  # same recipe, same cached stage: the same GSAE
