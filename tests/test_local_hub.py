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
    assert {s.rfilename for s in ds.siblings} == {
        "plain_text/train/0000.parquet",
        "plain_text/train/0001.parquet",
    }
    assert ds.sha != api.dataset_info("Skylion007/openwebtext").sha
    tree = list(api.list_repo_tree("ctigges/pythia-70m-deduped__res-sm_processed"))
    assert {t.path for t in tree} >= {"e-res-sm", "0-res-sm", "5-res-sm", "README.md"}
    deep = [
        t.path for t in api.list_repo_tree("ctigges/pythia-70m-deduped__res-sm_processed", recursive=True)
    ]
    assert "e-res-sm/sae_weights.safetensors" in deep
    files = api.list_repo_files("LabHC/bias_in_bios", repo_type="dataset")
    assert sorted(files) == ["README.md", "data/dev-00000-of-00001.parquet", "data/test-00000-of-00001.parquet",
                             "data/train-00000-of-00001.parquet"]  # fmt: skip
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    go_online(monkeypatch, local_hub.url, tmp_path / "hf", token=DEFAULT_TOKEN)
    tok = AutoTokenizer.from_pretrained("google/gemma-2b")
    model = AutoModelForCausalLM.from_pretrained("google/gemma-2b")
    ids = tok("the photon energy", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id == 2  # Gemma prepends <bos>
    assert model.config.num_hidden_layers == 18 and type(model).__name__ == "GemmaForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    shards = local_hub.fetched("google/gemma-2b/resolve")
    assert sum("model-0000" in p for p in shards) >= 2


def test_contriever_bin_only_and_sentence_transformers(hub_online):
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained("facebook/contriever")
    tok = AutoTokenizer.from_pretrained("facebook/contriever")
    assert type(model).__name__ == "BertModel"
    assert any(p.endswith("pytorch_model.bin") for p in hub_online.fetched("facebook/contriever/resolve"))
    st = SentenceTransformer("facebook/contriever", device="cpu")
    texts = ["the photon energy", "the team won the match"]
    emb = st.encode(texts, convert_to_tensor=True)
    assert emb.shape == (2, model.config.hidden_size)
    # no modules.json: sentence-transformers mean-pools the last hidden state, as for Contriever
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch.attention_mask.unsqueeze(-1).float()
    assert torch.allclose(emb, (h * m).sum(1) / m.sum(1), atol=1e-5)


# -- datasets (streaming) -------------------------------------------------------------------------


def test_datasets_streaming(hub_online):
    import datasets

    bib = datasets.load_dataset("LabHC/bias_in_bios", split="dev", streaming=True)
    row = next(iter(bib))
    assert set(row) == {"hard_text", "profession", "gender"}
    assert set(datasets.get_dataset_split_names("LabHC/bias_in_bios")) == {"train", "dev", "test"}
    tox = list(datasets.load_dataset("tomekkorbak/pile-toxicity-balanced", split="test", streaming=True))
    assert len(tox) == 100 and {"text", "score"} <= set(tox[0])
    q = next(iter(datasets.load_dataset("AlgorithmicResearchGroup/arxiv-physics-instruct-tune-30k", split="train",
                                        streaming=True)))  # fmt: skip
    assert set(q) == {"question", "answer"}
    owt = datasets.load_dataset("Skylion007/openwebtext", revision="refs/convert/parquet", split="train",
                                streaming=True)  # fmt: skip
    assert sum(1 for _ in owt) == 2000
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

    with pytest.raises(ValueError, match=r"(?i)split.*nope|nope.*split"):
        next(iter(datasets.load_dataset("LabHC/bias_in_bios", split="nope", streaming=True)))
    with pytest.raises(RuntimeError, match="Dataset scripts are no longer supported.*openwebtext.py"):
        datasets.load_dataset("Skylion007/openwebtext", split="train", streaming=True)
    with pytest.raises(datasets.exceptions.DatasetNotFoundError):
        datasets.load_dataset("nobody/nothing", split="train", streaming=True)


# -- sae-lens -------------------------------------------------------------------------------------


def test_sae_lens_releases(hub_online):
    import torch
    from sae_lens import SAE

    from ssae_ray.testing.hub_fixtures import GEMMA_2B_D_MODEL, JB_NORM_SCALING_FACTOR, PYTHIA_D_MODEL

    sae = SAE.from_pretrained("gemma-2b-res-jb", "blocks.12.hook_resid_post", device="cpu")
    assert sae.cfg.d_in == GEMMA_2B_D_MODEL and sae.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    # the norm scaling factor is folded into the weights: the SAE reconstructs raw activations
    assert sae.cfg.normalize_activations == "none"
    x = torch.randn(5, GEMMA_2B_D_MODEL)
    assert torch.allclose(sae.decode(sae.encode(x)), x, atol=1e-2)
    assert torch.allclose(sae.W_enc[0, 0], torch.tensor(JB_NORM_SCALING_FACTOR))
    for release, sae_id in [("pythia-70m-deduped-res-sm", "blocks.0.hook_resid_pre"),
                            ("pythia-70m-deduped-mlp-sm", "blocks.3.hook_mlp_out"),
                            ("pythia-70m-deduped-att-sm", "blocks.5.hook_attn_out")]:  # fmt: skip
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
        assert sae.cfg.d_in == PYTHIA_D_MODEL and sae.cfg.metadata.hook_name == sae_id
    # sparsity.safetensors is optional: a 404 EntryNotFound that sae-lens skips
    assert any("sparsity.safetensors" in p and s == 404 for _, p, s in hub_online.requests)


def test_gemma_scope(hub_online):
    import torch
    from sae_lens import SAE

    sae = SAE.from_pretrained("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82", device="cpu")
    assert type(sae).__name__ == "JumpReLUSAE"
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (2304, 16384)
    x = torch.randn(3, 2304)
    assert torch.allclose(sae.decode(sae.encode(x)), x, atol=2e-2)


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


def test_gated_model_with_token_loads_through_the_product(local_hub, monkeypatch, tmp_path):
    from ssae_ray.models import load_lm

    go_online(monkeypatch, local_hub.url, tmp_path / "hf", token=DEFAULT_TOKEN)
    lm = load_lm(_model_cfg("google/gemma-2b"), cache_dir=tmp_path)
    assert (lm.arch, lm.n_layers, lm.d_model) == ("gemma", 18, 64)


def test_missing_model_repo_is_one_clear_error(hub_online, tmp_path):
    from ssae_ray.models import ModelLoadError, load_lm

    with pytest.raises(ModelLoadError, match=r"'EleutherAI/pythia-7b-nope' is not on the Hugging Face hub"):
        load_lm(_model_cfg("EleutherAI/pythia-7b-nope"), cache_dir=tmp_path)
