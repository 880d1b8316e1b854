"""The local Hugging Face Hub (ssae_ray/testing/hub_server.py) against the real clients:
huggingface_hub, transformers, datasets (streaming), sentence-transformers and sae-lens, and the
product's errors for a gated model, a missing repo, a missing split and a loading-script dataset."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from ssae_ray.testing.hub_server import DEFAULT_TOKEN, go_online

# -- the protocol ---------------------------------------------------------------------------------


def test_resolve_head_get_range_and_errors(hub_online):
    url = hub_online.url
    hub_online.ensure("EleutherAI/pythia-70m-deduped", "google/gemma-2b")  # built before the timed requests
    f = f"{url}/EleutherAI/pythia-70m-deduped/resolve/main/model.safetensors"
    head = httpx.head(f)
    assert head.status_code == 200
    commit = head.headers["x-repo-commit"]
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    size = int(head.headers["content-length"])
    full = httpx.get(f).content
    assert len(full) == size
    import hashlib

    assert head.headers["etag"] == f'"{hashlib.sha256(full).hexdigest()}"'  # LFS file: its sha256
    part = httpx.get(f, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == full[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{size}"
    assert httpx.get(f, headers={"Range": "bytes=-8"}).content == full[-8:]
    assert httpx.get(f, headers={"Range": f"bytes={size}-"}).status_code == 416
    # the same file at the commit id; a small file's ETag is its git blob sha1
    assert httpx.head(f.replace("/main/", f"/{commit}/")).headers["x-repo-commit"] == commit
    cfg = httpx.get(f"{url}/EleutherAI/pythia-70m-deduped/resolve/main/config.json")
    blob = hashlib.sha1(f"blob {len(cfg.content)}\0".encode() + cfg.content).hexdigest()
    assert cfg.headers["etag"] == f'"{blob}"'

    def err(path, **kw):
        r = httpx.get(url + path, **kw)
        return r.status_code, r.headers.get("x-error-code")

    assert err("/nobody/nothing/resolve/main/config.json") == (401, "RepoNotFound")
    auth = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
    assert err("/nobody/nothing/resolve/main/config.json", headers=auth) == (404, "RepoNotFound")
    assert err("/EleutherAI/pythia-70m-deduped/resolve/main/nope.json") == (404, "EntryNotFound")
    assert err("/EleutherAI/pythia-70m-deduped/resolve/v9/config.json") == (404, "RevisionNotFound")
    assert err("/google/gemma-2b/resolve/main/config.json") == (401, "GatedRepo")
    assert err("/google/gemma-2b/resolve/main/config.json", headers={"Authorization": "Bearer hf_other"}) == (
        403,
        "GatedRepo",
    )
    assert err("/google/gemma-2b/resolve/main/config.json", headers=auth) == (200, None)
    assert err("/api/datasets/nobody/nothing") == (401, "RepoNotFound")


def test_hf_api_info_tree_paths_info_refs(hub_online):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    api = HfApi()
    info = api.model_info("google/gemma-2b")  # a gated repo's info is public
    assert info.gated == "manual" and re.fullmatch(r"[0-9a-f]{40}", info.sha)
    names = {s.rfilename for s in info.siblings}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= names
    assert sum(n.startswith("model-0000") for n in names) >= 2  # sharded like the Hub's
    ds = api.dataset_info("Skylion007/openwebtext", revision="refs/convert/parquet")
    assert {s.rfilename for s in ds.siblings} == {  # a script dataset's conversion: partial, as on the Hub
        "plain_text/partial-train/0000.parquet",
        "plain_text/partial-train/0001.parquet",
    }
    assert ds.sha != api.dataset_info("Skylion007/openwebtext").sha
    tree = list(api.list_repo_tree("ctigges/pythia-70m-deduped__res-sm_processed"))
    assert {t.path for t in tree} >= {"e-res-sm", "0-res-sm", "5-res-sm", "README.md"}
    deep = [
        t.path for t in api.list_repo_tree("ctigges/pythia-70m-deduped__res-sm_processed", recursive=True)
    ]
    assert "e-res-sm/sae_weights.safetensors" in deep
    files = api.list_repo_files("LabHC/bias_in_bios", repo_type="dataset")
    assert [re.sub(r"-[0-9a-f]{16}\.", ".", f) for f in sorted(files)] == [
        "README.md", "data/dev-00000-of-00001.parquet", "data/test-00000-of-00001.parquet",
        "data/train-00000-of-00001.parquet"]  # fmt: skip
    assert "data/test-00000-of-00001-5598c840ce8de1ee.parquet" in files  # the Hub's file name
    got = api.get_paths_info(
        "monology/pile-uncopyrighted", ["train", "val.jsonl.zst", "missing"], repo_type="dataset"
    )
    assert [type(p).__name__ for p in got] == ["RepoFolder", "RepoFile"]
    refs = api.list_repo_refs("Skylion007/openwebtext", repo_type="dataset")
    assert [b.name for b in refs.branches] == ["main"] and [c.name for c in refs.converts] == ["parquet"]
    assert api.file_exists("facebook/contriever", "pytorch_model.bin")
    assert not api.file_exists("facebook/contriever", "model.safetensors")  # .bin only, as on the Hub
    with pytest.raises(GatedRepoError):
        api.file_exists("google/gemma-2b", "config.json")
    assert not api.repo_exists("nobody/nothing")


def test_hf_hub_download_and_snapshot(hub_online, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    p = hf_hub_download("EleutherAI/pythia-70m-deduped", "config.json")
    assert json.loads(open(p).read())["model_type"] == "gpt_neox"
    assert "/snapshots/" in p  # cached under the commit id the server sent
    n_get = len(hub_online.fetched("pythia-70m-deduped/resolve"))
    assert hf_hub_download("EleutherAI/pythia-70m-deduped", "config.json") == p  # ETag: no new GET
    assert len(hub_online.fetched("pythia-70m-deduped/resolve")) == n_get
    snap = snapshot_download("ctigges/pythia-70m-deduped__att-sm_processed", allow_patterns=["0-att-sm/*"])
    assert sorted(x.name for x in (tmp_path / "hf").rglob("*") if x.parent.name == "0-att-sm") == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    assert snap.endswith(
        hub_online.repos[("model", "ctigges/pythia-70m-deduped__att-sm_processed")].branches["main"]
    )


# -- transformers, sentence-transformers --------------------------------------------------------


@pytest.mark.parametrize(
    ("repo", "model_type", "layers"),
    [("EleutherAI/pythia-70m-deduped", "gpt_neox", 6), ("roneneldan/TinyStories-1M", "gpt_neo", 8)],
)
def test_causal_lms_load(hub_online, repo, model_type, layers):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(repo)
    model = AutoModelForCausalLM.from_pretrained(repo)
    assert model.config.model_type == model_type and model.config.num_hidden_layers == layers
    ids = tok("Once upon a time the photon", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_gated_gemma_with_token(local_hub, monkeypatch, tmp_path):
    """With a granted HF_TOKEN the product's loader reads google/gemma-2b: sharded safetensors,
    Gemma's tokenizer (<bos> first), the hook registry's gemma layout."""
    import torch

    from ssae_ray.models import load_lm

    go_online(monkeypatch, local_hub.url, tmp_path / "hf", token=DEFAULT_TOKEN)
    lm = load_lm(_model_cfg("google/gemma-2b"), cache_dir=tmp_path)
    assert (lm.arch, lm.n_layers, lm.d_model) == ("gemma", 18, 64)
    assert type(lm.model).__name__ == "GemmaForCausalLM"
    ids = lm.tokenizer("the photon energy", return_tensors="pt").input_ids
    assert ids[0, 0].item() == lm.tokenizer.bos_token_id == 2  # Gemma prepends <bos>
    with torch.no_grad():
        assert torch.isfinite(lm.model(ids).logits).all()
    shards = local_hub.fetched("google/gemma-2b/resolve")
    assert sum("model-0000" in p for p in shards) >= 2


def test_contriever_bin_only_sentence_transformers_and_the_retriever(hub_online, tmp_path):
    """facebook/contriever has only `pytorch_model.bin` and no sentence-transformers files:
    `AutoModel` reads the .bin (no background safetensors conversion), sentence-transformers falls
    back to mean pooling, and the product's retriever loader builds the same mean pooling."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from ssae_ray.config import RetrievalConfig
    from ssae_ray.retrieval.embed import load_encoder, resolve_model

    model = AutoModel.from_pretrained("facebook/contriever")
    tok = AutoTokenizer.from_pretrained("facebook/contriever")
    assert type(model).__name__ == "BertModel"
    assert any(p.endswith("pytorch_model.bin") for p in hub_online.fetched("facebook/contriever/resolve"))
    texts = ["the photon energy", "the team won the match"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch.attention_mask.unsqueeze(-1).float()
    mean = (h * m).sum(1) / m.sum(1)
    st = SentenceTransformer("facebook/contriever", device="cpu")
    assert torch.allclose(st.encode(texts, convert_to_tensor=True), mean, atol=1e-5)
    em = resolve_model(RetrievalConfig(embed_model="facebook/contriever"), tmp_path)
    assert (em.path, em.pooling) == ("facebook/contriever", "mean")
    product = load_encoder(em, max_tokens=64).encode(texts, convert_to_tensor=True)
    assert torch.allclose(product, mean, atol=1e-5)


# -- datasets (streaming) -------------------------------------------------------------------------


def test_datasets_streaming(hub_online):
    import datasets

    from ssae_ray.testing.hub_fixtures import OWT_PARTIAL_DOCS

    bib = datasets.load_dataset("LabHC/bias_in_bios", split="dev", streaming=True)
    row = next(iter(bib))
    assert set(row) == {"hard_text", "profession", "gender"}
    assert set(datasets.get_dataset_split_names("LabHC/bias_in_bios")) == {"train", "dev", "test"}
    tox = list(datasets.load_dataset("tomekkorbak/pile-toxicity-balanced", split="test", streaming=True))
    assert len(tox) == 100 and {"text", "score"} <= set(tox[0])
    q = next(iter(datasets.load_dataset("AlgorithmicResearchGroup/arxiv-physics-instruct-tune-30k", split="train",
                                        streaming=True)))  # fmt: skip
    assert set(q) == {"question", "answer"}  # from the root arxiv_physics_instruct_30k.jsonl
    owt = datasets.load_dataset("Skylion007/openwebtext", revision="refs/convert/parquet", split="train",
                                streaming=True)  # fmt: skip
    assert sum(1 for _ in owt) == OWT_PARTIAL_DOCS  # datasets reads `partial-train` as "train", silently
    assert datasets.get_dataset_split_names("Skylion007/openwebtext", revision="refs/convert/parquet") == [
        "train"
    ]
    pile = datasets.load_dataset("monology/pile-uncopyrighted", split="train", streaming=True)
    assert set(next(iter(pile))) == {"text", "meta"}  # jsonl.zst, decompressed by zstandard
    # train/ is a folder, so split names are taken from folders only: val.jsonl.zst needs data_files
    assert datasets.get_dataset_split_names("monology/pile-uncopyrighted") == ["train"]
    val = datasets.load_dataset("monology/pile-uncopyrighted", data_files={"validation": "val.jsonl.zst"},
                                split="validation", streaming=True)  # fmt: skip
    assert sum(1 for _ in val) == 200
    ts = datasets.load_dataset("roneneldan/TinyStories", split="validation", streaming=True)
    assert next(iter(ts))["text"].startswith("Once upon a time")
    # Parquet is read with ranged requests
    assert any(m == "GET" and s == 206 for m, _, s in hub_online.requests)


def test_dataset_errors(hub_online):
    import datasets
    from huggingface_hub import HfApi

    with pytest.raises(ValueError, match=r"(?i)split.*nope|nope.*split"):
        next(iter(datasets.load_dataset("LabHC/bias_in_bios", split="nope", streaming=True)))
    with pytest.raises(RuntimeError, match="Dataset scripts are no longer supported.*openwebtext.py"):
        datasets.load_dataset("Skylion007/openwebtext", split="train", streaming=True)
    with pytest.raises(datasets.exceptions.DatasetNotFoundError):
        datasets.load_dataset("nobody/nothing", split="train", streaming=True)
    with pytest.raises(RuntimeError, match="Dataset scripts are no longer supported"):
        datasets.load_dataset("local-hub/script-dataset-without-parquet", split="train", streaming=True)
    refs = HfApi().list_repo_refs("local-hub/script-dataset-without-parquet", repo_type="dataset")
    assert refs.converts == []  # nothing to fall back to
    with pytest.raises(
        datasets.exceptions.DatasetNotFoundError, match="Revision 'refs/convert/parquet' doesn't"
    ):
        datasets.load_dataset("local-hub/script-dataset-without-parquet", revision="refs/convert/parquet",
                              split="train", streaming=True)  # fmt: skip
    with pytest.raises(datasets.exceptions.DatasetNotFoundError, match="gated dataset.*authenticated"):
        datasets.load_dataset("local-hub/gated-dataset", split="train", streaming=True)


def test_gated_dataset_with_token(local_hub, monkeypatch, tmp_path):
    import datasets

    go_online(monkeypatch, local_hub.url, tmp_path / "hf", token=DEFAULT_TOKEN)
    rows = list(datasets.load_dataset("local-hub/gated-dataset", split="train", streaming=True))
    assert len(rows) == 20


# -- sae-lens -------------------------------------------------------------------------------------


def _fixture_acts(hub, model_repo, hook):
    from ssae_ray.testing.hub_fixtures import fixture_activations

    return fixture_activations(hub.root, model_repo, [hook])[hook]


def test_sae_lens_releases(hub_online):
    """The fixture SAEs are trained on the fixture LMs' activations: through sae-lens they explain
    well below all of the variance, with a non-zero b_dec; gemma-2b-res-jb blocks.12 reads
    activations scaled by the registry's norm factor, which `from_pretrained` folds in. Unfolded
    (the raw weights on raw activations) it explains less than nothing, as the registry's
    `variance_explained: -0.65` for that entry records; blocks.17, whose entry lists no factor, loads
    unfolded, and the fit check says so and what the factor would give."""
    import torch
    from sae_lens import SAE
    from safetensors.torch import load_file

    from ssae_ray.saes import SAEMismatchError, check_sae_fits, explained_variance
    from ssae_ray.testing.hub_fixtures import GEMMA_2B_D_MODEL, JB_NORM_SCALING_FACTOR

    sae = SAE.from_pretrained("gemma-2b-res-jb", "blocks.12.hook_resid_post", device="cpu")
    assert sae.cfg.d_in == GEMMA_2B_D_MODEL and sae.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    assert sae.cfg.normalize_activations == "none"  # the norm scaling factor is folded into the weights
    assert hub_online.fetched("gemma_2b_blocks.12.hook_resid_post_16384/sparsity.safetensors")
    x = _fixture_acts(hub_online, "google/gemma-2b", "blocks.12.hook_resid_post")
    with torch.no_grad():
        ev = explained_variance(x, sae.decode(sae.encode(x)))
        l0 = float((sae.encode(x) > 0).float().sum(-1).mean())
    assert 0.6 < ev < 0.95 and 2 < l0 < 64, (ev, l0)
    assert sae.b_dec.abs().max() > 0.05
    raw = load_file(
        next(
            p for p in _snapshot_files(hub_online, "gemma_2b_blocks.12") if p.endswith("weights.safetensors")
        )
    )
    torch.testing.assert_close(sae.W_enc, raw["W_enc"] * JB_NORM_SCALING_FACTOR)
    torch.testing.assert_close(sae.b_dec, raw["b_dec"] / JB_NORM_SCALING_FACTOR)
    with torch.no_grad():  # unfolded, the raw weights read raw activations at the wrong scale
        f = torch.relu(x @ raw["W_enc"] + raw["b_enc"])
        unfolded = explained_variance(x, f @ raw["W_dec"] + raw["b_dec"])
    assert unfolded < ev - 0.3, (unfolded, ev)
    assert check_sae_fits(sae, x, "blocks.12.hook_resid_post", min_ev=0.5) == pytest.approx(ev, abs=1e-4)
    s17 = SAE.from_pretrained("gemma-2b-res-jb", "blocks.17.hook_resid_post", device="cpu")
    assert s17.cfg.normalize_activations == "expected_average_only_in"  # no factor in the registry
    x17 = _fixture_acts(hub_online, "google/gemma-2b", "blocks.17.hook_resid_post")
    with pytest.raises(
        SAEMismatchError,
        match=r"no norm scaling factor .*\(its sae-lens release lists none\).* would explain 0\.[6-9]",
    ):
        check_sae_fits(s17, x17, "blocks.17.hook_resid_post", min_ev=0.99)
    # sparsity.safetensors is optional: the pythia folders have none, a 404 EntryNotFound sae-lens skips
    pythia = SAE.from_pretrained("pythia-70m-deduped-att-sm", "blocks.5.hook_attn_out", device="cpu")
    assert sae.cfg.metadata.prepend_bos is True and pythia.cfg.metadata.prepend_bos is True  # legacy default
    assert pythia.cfg.apply_b_dec_to_input is True and pythia.b_dec.abs().max() > 0
    assert ("HEAD", "/ctigges/pythia-70m-deduped__att-sm_processed/resolve/main/5-att-sm/sparsity.safetensors",
            404) in hub_online.requests  # fmt: skip
    xa = _fixture_acts(hub_online, "EleutherAI/pythia-70m-deduped", "blocks.5.hook_attn_out")
    with torch.no_grad():
        assert 0.5 < explained_variance(xa, pythia.decode(pythia.encode(xa))) < 0.97


def _snapshot_files(hub, folder_part):
    from pathlib import Path

    import huggingface_hub

    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    return [str(p) for p in cache.rglob("*") if folder_part in str(p) and p.is_file()]


@pytest.mark.parametrize(
    ("preset", "token"), [("pythia-70m-bib", None), ("paper-physics", DEFAULT_TOKEN)], ids=["pythia", "gemma"]
)
def test_presets_models_and_gsaes_through_the_product(local_hub, monkeypatch, tmp_path, preset, token):
    """The presets' real ids through the product's loaders: the model, then every GSAE of
    `sae.sae_ids` from its sae-lens release (19 for pythia-70m-bib), each fitting its hook."""
    from ssae_ray.config import load_config
    from ssae_ray.models import capture, load_lm
    from ssae_ray.saes import check_sae_fits, load_gsaes

    go_online(monkeypatch, local_hub.url, tmp_path / "hf", token=token)
    cfg = load_config(
        preset, overrides=[f"workdir={tmp_path / 'w'}", "model.device=cpu", "model.dtype=float32"]
    )
    lm = load_lm(cfg.model, cache_dir=tmp_path)
    saes = load_gsaes(cfg, lm)
    assert list(saes) == list(cfg.sae.hooks) and len(saes) == (19 if preset == "pythia-70m-bib" else 1)
    from ssae_ray.models import tokenize_docs
    from ssae_ray.testing.hub_fixtures import fixture_texts

    tb = tokenize_docs(lm.tokenizer, fixture_texts(16, seed=7), 64, prepend_bos=True)  # unseen documents
    acts = capture(lm, tb.input_ids, tb.attention_mask, list(saes))
    keep = tb.attention_mask[:, 1:].bool()
    evs = {h: check_sae_fits(sae, acts[h][:, 1:][keep], h, min_ev=0.5) for h, sae in saes.items()}
    print("explained variance", {h: round(v, 3) for h, v in evs.items()})
    assert all(0.5 < v < 0.97 for v in evs.values()), evs  # trained fixture SAEs: realistic, well below 1


# -- the product's errors -------------------------------------------------------------------------


def _model_cfg(source):
    from ssae_ray.config import ModelConfig

    return ModelConfig(source=source, device="cpu")


def test_gated_model_without_token_is_one_clear_error(hub_online, tmp_path):
    from ssae_ray.models import ModelLoadError, load_lm

    with pytest.raises(ModelLoadError) as err:
        load_lm(_model_cfg("google/gemma-2b"), cache_dir=tmp_path)
    msg = str(err.value)
    assert "HF_TOKEN" in msg and f"{hub_online.url}/google/gemma-2b" in msg and "licence" in msg
    assert "\n" not in msg
    assert hub_online.fetched("google/gemma-2b/resolve") == []  # nothing downloaded


def test_gated_model_with_a_token_without_access(local_hub, monkeypatch, tmp_path):
    from ssae_ray.models import ModelLoadError, load_lm

    go_online(monkeypatch, local_hub.url, tmp_path / "hf", token="hf_not_granted")
    with pytest.raises(
        ModelLoadError, match="has not been granted access: accept the licence at .*google/gemma-2b"
    ):
        load_lm(_model_cfg("google/gemma-2b"), cache_dir=tmp_path)


def test_missing_model_repo_is_one_clear_error(hub_online, tmp_path):
    from ssae_ray.models import ModelLoadError, load_lm

    with pytest.raises(ModelLoadError, match=r"'EleutherAI/pythia-7b-nope' is not on the Hugging Face hub"):
        load_lm(_model_cfg("EleutherAI/pythia-7b-nope"), cache_dir=tmp_path)


def test_hf_file_system_glob_and_parquet_ranges(hub_online):
    """`HfFileSystem` (what `datasets` and `ray.data.read_parquet(filesystem=...)` read through):
    glob on a revision with a slash, then a Parquet file's metadata and a row group read in ranges."""
    import pyarrow.parquet as pq
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()
    root = "datasets/Skylion007/openwebtext@refs%2Fconvert%2Fparquet"
    files = fs.glob(f"{root}/plain_text/partial-train/*.parquet")
    assert [f.rsplit("/", 1)[1] for f in files] == ["0000.parquet", "0001.parquet"]
    with fs.open(files[1], "rb", block_size=4096) as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_rows == 1000 and pf.metadata.num_row_groups == 4
        assert pf.read_row_group(2, columns=["text"]).num_rows == 250
    gets = [s for m, p, s in hub_online.requests if m == "GET" and "0001.parquet" in p]
    assert gets and set(gets) == {206}  # read in ranges, never as a whole-file GET
    assert fs.info(f"{root}/plain_text/partial-train/0000.parquet")["size"] > 0
    assert not fs.exists(f"{root}/plain_text/train/0000.parquet")


def test_gemma_2_2b_and_gemma_scope_fit(local_hub, monkeypatch, tmp_path):
    """Gemma Scope through sae-lens' gemma_2 loader (params.npz; d_in 2304 and d_sae 16384 fixed by
    the loader) and the gated model it reads: 26 layers, d_model 2304; the JumpReLU SAE, trained on
    the fixture model's layer-12 residual, explains most but not all of it, with a non-zero b_dec
    and thresholds."""
    import torch
    from sae_lens import SAE

    from ssae_ray.config import ModelConfig
    from ssae_ray.models import capture, load_lm

    go_online(monkeypatch, local_hub.url, tmp_path / "hf", token=DEFAULT_TOKEN)
    lm = load_lm(ModelConfig(source="google/gemma-2-2b", device="cpu", dtype="float32"), cache_dir=tmp_path)
    assert (lm.arch, lm.n_layers, lm.d_model) == ("gemma", 26, 2304)
    sae = SAE.from_pretrained("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82", device="cpu")
    assert type(sae).__name__ == "JumpReLUSAE" and (sae.cfg.d_in, sae.cfg.d_sae) == (2304, 16384)
    assert sae.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    from ssae_ray.models import tokenize_docs
    from ssae_ray.testing.hub_fixtures import fixture_texts

    tb = tokenize_docs(lm.tokenizer, fixture_texts(8, seed=7), 64, prepend_bos=True)  # unseen documents
    acts = capture(lm, tb.input_ids, tb.attention_mask, ["blocks.12.hook_resid_post"])
    x = acts["blocks.12.hook_resid_post"][:, 1:][
        tb.attention_mask[:, 1:].bool()
    ]  # BOS dropped, as the fit check
    from ssae_ray.saes import explained_variance

    with torch.no_grad():
        ev = explained_variance(x, sae.decode(sae.encode(x)))
    assert 0.5 < ev < 0.97, ev
    assert sae.b_dec.abs().max() > 0 and (sae.threshold[:512] > 0).all()


def test_server_runs_standalone(tmp_path):
    """`python -m ssae_ray.testing.hub_server ROOT` (benchmarks, manual runs) prints its URL and
    builds a repo on its first request."""
    import os
    import subprocess
    import sys

    from ssae_ray.testing.hub_fixtures import default_root

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "ssae_ray.testing.hub_server", str(default_root())],
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        info = httpx.get(f"{url}/api/models/facebook/contriever", timeout=120).json()
        assert info["id"] == "facebook/contriever" and "pytorch_model.bin" in {
            s["rfilename"] for s in info["siblings"]
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
