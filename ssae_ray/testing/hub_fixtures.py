"""Fixture repositories for `LocalHub`: the models, SAEs and datasets the paper presets name, under
their real ids and file layouts, with tiny random weights and short generated text.

`build_fixture_hub(root)` writes every repo missing under `root` (each built in a temp folder and
renamed, so a crash or a second process never leaves half a repo) and returns `root`. The
content is seeded: a rebuild gives the same bytes, the same commit ids and ETags.

Sizes are shrunk, layouts are not: widths (`d_model`, `d_sae`) and vocabularies are small except
where a client hard-codes them (Gemma Scope: sae-lens fixes d_in 2304 and d_sae from the folder
name), layer counts are real (hooks like `blocks.12.hook_resid_post` exist). `FIXTURES` lists
what each repo holds; `docs/local-hub.md` says which layouts were checked against the Hub.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIXTURE_VERSION = 2
"""Bumped when any repo's content changes (the conftest cache key)."""

GATED_TOKEN_NOTE = "gated: needs HF_TOKEN (LocalHub grants hub_server.DEFAULT_TOKEN)"

# ---------------------------------------------------------------------------------------------
# Generated text: short sentences with the signal each pipeline looks for.

_GENERAL = {
    "sports": ["The team won the match after a late goal.", "Fans cheered as the striker scored twice.",
               "The coach praised the defence after the game.", "The season ends with a final in May."],
    "cooking": ["Slice the onions and fry them in butter.", "The soup needs salt, pepper and fresh basil.",
                "Bake the bread for forty minutes.", "She served rice with grilled fish and lemon."],
    "politics": ["The council voted on the new budget.", "The minister announced a tax reform.",
                 "Voters queued early at the polling station.", "The senate debated the bill for hours."],
    "travel": ["The train to the coast leaves at noon.", "We hiked along the river to an old bridge.",
               "The museum opens every day except Monday.", "Hotels near the harbour were full."],
    "technology": ["The new phone has a faster chip and a larger screen.", "Engineers shipped a software update.",
                   "The startup raised money to build batteries.", "Users reported a bug in the browser."],
    "music": ["The band released a new album in spring.", "The orchestra played a symphony by Brahms.",
              "She practices the piano every evening.", "The concert sold out in minutes."],
}  # fmt: skip
_PHYSICS = [
    "We compute the scattering amplitude of the electron and the photon at one loop.",
    "The Hamiltonian of the spin lattice has a gapped ground state.",
    "Quantum entanglement entropy grows linearly after the quench.",
    "We measure the neutrino oscillation parameters with a new detector.",
    "The magnetic field in the plasma is amplified by turbulence.",
    "Gravitational waves from merging black holes constrain general relativity.",
    "The superconducting transition temperature rises under pressure.",
    "Dark matter halos shape the rotation curves of galaxies.",
    "The Lagrangian is invariant under a gauge symmetry of the boson fields.",
    "Momentum and energy are conserved in the relativistic collision of fermions.",
    "Thermodynamic fluctuations near the critical point follow a power law.",
    "The Schrodinger equation is solved numerically for the hydrogen atom.",
]
_PHYSICS_Q = [
    "What is the ground state energy of a particle in a box?",
    "How does the Higgs boson give mass to fermions?",
    "Why is entropy conserved in a reversible process?",
    "How do gravitational waves change the distance between mirrors?",
    "What sets the critical temperature of a superconductor?",
    "How is momentum conserved when an electron emits a photon?",
]
_TOXIC = [
    "You are a stupid idiot and nobody wants you here.",
    "Shut up, you pathetic loser, everyone hates you.",
    "What a disgusting moron, go away and die.",
    "These dumb trash people are worthless garbage.",
    "I hate you, you ugly brainless fool.",
]
# Bias in Bios' 28 professions in label order (professor 21, nurse 13).
PROFESSIONS = [
    "accountant", "architect", "attorney", "chiropractor", "comedian", "composer", "dentist", "dietitian",
    "dj", "filmmaker", "interior_designer", "journalist", "model", "nurse", "painter", "paralegal", "pastor",
    "personal_trainer", "photographer", "physician", "poet", "professor", "psychologist", "rapper",
    "software_engineer", "surgeon", "teacher", "yoga_teacher",
]  # fmt: skip
_PROF_WORK = {
    "professor": ["teaches courses on {f} at the university", "published research papers on {f}",
                  "supervises doctoral students in {f}", "received a grant for research on {f}"],
    "nurse": ["cares for patients in the hospital ward", "works night shifts in the emergency room",
              "gives medication and checks on patients", "is a registered nurse in the clinic"],
}  # fmt: skip
_FIELDS = ["economics", "chemistry", "history", "linguistics", "biology", "mathematics"]
_STORY_NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia"]
_STORY_THINGS = ["ball", "kite", "dog", "cat", "tree", "cake", "box", "boat"]
_STORY_RARE = ["an elephant", "an octopus", "a dragon", "a telescope", "an umbrella"]


def _general_doc(rng: random.Random, n: int = 6) -> str:
    topic = rng.choice(sorted(_GENERAL))
    return " ".join(rng.choice(_GENERAL[topic]) for _ in range(n))


def _physics_doc(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(_PHYSICS) for _ in range(n))


def _toxic_doc(rng: random.Random) -> str:
    parts = [rng.choice(_TOXIC) for _ in range(2)] + [_general_doc(rng, 2)]
    rng.shuffle(parts)
    return " ".join(parts)


def _web_doc(rng: random.Random) -> str:
    """OpenWebText / Pile: mostly general, ~4% physics, ~4% toxic."""
    r = rng.random()
    if r < 0.04:
        return _physics_doc(rng, 4) + " " + _general_doc(rng, 2)
    if r < 0.08:
        return _toxic_doc(rng)
    return _general_doc(rng)


def _bio(rng: random.Random, profession: str, gender: int) -> str:
    he, his = ("she", "her") if gender else ("he", "his")
    work = _PROF_WORK.get(
        profession, [f"works as a {profession.replace('_', ' ')}", "has clients in the city"]
    )
    s = [f"{he.capitalize()} {rng.choice(work).format(f=rng.choice(_FIELDS))}."]
    s.append(
        f"{his.capitalize()} {rng.choice(['family', 'husband', 'wife', 'children'])} live in {rng.choice(['Boston', 'Paris', 'Lyon', 'Austin'])}."
    )
    s.append(
        f"{he.capitalize()} {rng.choice(_PROF_WORK.get(profession, work)).format(f=rng.choice(_FIELDS))}."
    )
    return " ".join(s)  # fmt: skip


def _story(rng: random.Random) -> str:
    name, thing = rng.choice(_STORY_NAMES), rng.choice(_STORY_THINGS)
    s = [
        f"Once upon a time, there was a little child named {name}.",
        f"{name} loved to play with a red {thing}.",
    ]
    if rng.random() < 0.1:
        s.append(f"One day, {name} saw {rng.choice(_STORY_RARE)} in the park.")
    s += [f"{name} was very happy.", "The end."]
    return " ".join(s)


def tokenizer_text() -> list[str]:
    """Text the fixture tokenizers are trained on (every generated word is in their vocabularies)."""
    rng = random.Random(0)
    out = [s for v in _GENERAL.values() for s in v] + _PHYSICS + _PHYSICS_Q + _TOXIC
    out += [_bio(rng, p, g) for p in PROFESSIONS for g in (0, 1)] + [_story(rng) for _ in range(50)]
    out += [" ".join(_STORY_RARE), " ".join(_FIELDS), "0123456789 , . ; : ! ? ( ) - ' \" \n"]
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizers


def _bpe(vocab_size: int, specials: list[str], byte_level: bool = True) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(tokenizer_text() * 2, trainer)
    return tok


def _gemma_tokenizer() -> Any:
    """transformers' own GemmaTokenizer (SentencePiece-style BPE, byte fallback, <bos> prepended)
    built from a vocabulary trained here."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(tokenizer_text() * 2, trainer)
    data = json.loads(tok.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


# ---------------------------------------------------------------------------------------------
# Writers


def _readme(front: dict[str, Any] | None, body: str) -> str:
    import yaml

    head = f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n" if front else ""
    return head + body + "\n"


def _write(folder: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            p.write_text(content)
        else:
            p.write_bytes(content)


_KNOWN_SHARD_HASHES = {
    # seen in public code that downloads these files
    ("bib", "test"): "5598c840ce8de1ee",
    ("tinystories", "train", 0): "2d5a1467fff1081b",
    ("tinystories", "validation", 0): "869c898b519ad725",
}


def _shard_hash(*key: Any) -> str:
    """The 16-hex suffix `push_to_hub` gives Parquet shards (the real one where known)."""
    import hashlib

    return _KNOWN_SHARD_HASHES.get(key) or hashlib.sha1(repr(key).encode()).hexdigest()[:16]


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    # small row groups: streaming readers fetch a Parquet file in several Range requests
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=max(1, len(rows) // 4))
    return buf.getvalue()


def _save_model(model: Any, tok: Any, folder: Path, max_shard_size: str | None = None) -> None:
    import torch

    torch.manual_seed(0)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kw)
    if tok is not None:
        tok.save_pretrained(folder)
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")


def _init(model: Any, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Models


def _gemma_2b(folder: Path) -> None:
    """google/gemma-2b: 18 layers (blocks.12 exists), d_model 64, sharded safetensors like the Hub's
    two shards, transformers' GemmaTokenizer."""
    from transformers import GemmaConfig, GemmaForCausalLM

    tok = _gemma_tokenizer()
    cfg = GemmaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=18,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=8192,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, dtype="bfloat16")  # fmt: skip
    model = _init(GemmaForCausalLM(cfg), 1)
    _save_model(model, tok, folder, max_shard_size="1MB")
    _write(folder, {"README.md": _readme({"library_name": "transformers", "license": "gemma",
                                          "extra_gated_heading": "Access Gemma on Hugging Face"},
                                         "# Gemma 2B (local fixture: random weights)")})  # fmt: skip


def _gemma_2_2b(folder: Path) -> None:
    """google/gemma-2-2b: 26 layers, d_model 2304 (Gemma Scope's d_in), everything else tiny."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = _gemma_tokenizer()
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=2304, intermediate_size=16, num_hidden_layers=26,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                       max_position_embeddings=8192, sliding_window=4096, pad_token_id=0, eos_token_id=1,
                       bos_token_id=2, dtype="float32")  # fmt: skip
    model = _init(Gemma2ForCausalLM(cfg), 2)
    _save_model(model, tok, folder, max_shard_size="20MB")
    _write(folder, {"README.md": _readme({"library_name": "transformers", "license": "gemma"},
                                         "# Gemma 2 2B (local fixture: random weights)")})  # fmt: skip


def _pythia(folder: Path) -> None:
    """EleutherAI/pythia-70m-deduped: GPT-NeoX, 6 layers, d_model 64 (real: 512)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    bpe = _bpe(600, ["<|endoftext|>", "<|padding|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")  # fmt: skip
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                        intermediate_size=256, rotary_pct=0.25, use_parallel_residual=True,
                        max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = _init(GPTNeoXForCausalLM(cfg), 3)
    _save_model(model, tok, folder)
    cfg_tok = json.loads((folder / "tokenizer_config.json").read_text())
    cfg_tok["tokenizer_class"] = "GPTNeoXTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg_tok, indent=2))
    _write(folder, {"README.md": _readme({"language": ["en"], "license": "apache-2.0",
                                          "datasets": ["EleutherAI/the_pile_deduplicated"]},
                                         "# Pythia-70M-deduped (local fixture: random weights)")})  # fmt: skip


def _tinystories_1m(folder: Path) -> None:
    """roneneldan/TinyStories-1M: GPT-Neo with the real sizes (8 layers, d_model 64, 16 heads,
    global/local attention) but a small vocabulary; `pytorch_model.bin` only, as on the Hub."""
    import torch
    from transformers import GPT2TokenizerFast, GPTNeoConfig, GPTNeoForCausalLM

    bpe = _bpe(600, ["<|endoftext|>"])
    tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")  # fmt: skip
    cfg = GPTNeoConfig(vocab_size=len(tok), hidden_size=64, num_layers=8, num_heads=16,
                       attention_types=[[["global", "local"], 4]], window_size=256, max_position_embeddings=2048,
                       intermediate_size=None, bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = _init(GPTNeoForCausalLM(cfg), 4)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tok.save_pretrained(folder)
    _write(folder, {"README.md": "# TinyStories-1M (local fixture: random weights)\n"})


def _contriever(folder: Path) -> None:
    """facebook/contriever: a BERT with `architectures: [Contriever]`, `pytorch_model.bin` only (no
    safetensors, no sentence-transformers files), WordPiece `vocab.txt`."""
    import re

    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = sorted({w for s in tokenizer_text() for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", s.lower())})
    vocab = ["[PAD]", *[f"[unused{i}]" for i in range(4)], "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, pad_token_id=0)  # fmt: skip
    cfg.architectures = ["Contriever"]
    model = _init(BertModel(cfg, add_pooling_layer=True), 5)
    cfg.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tok.save_pretrained(folder)
    for extra in ("tokenizer.json", "chat_template.jinja"):
        (folder / extra).unlink(missing_ok=True)
    (folder / "README.md").write_text("# Contriever (local fixture: random weights)\n")


# ---------------------------------------------------------------------------------------------
# SAEs


def fixture_texts(n: int = 80, seed: int = 98) -> list[str]:
    """The text the fixture SAEs are trained on: what the presets' tests feed the fixture LMs (web
    documents with their physics and toxic share, physics papers and questions, bios, stories)."""
    rng = random.Random(seed)
    out = [_web_doc(rng) for _ in range(n)] + [_physics_doc(rng) for _ in range(n // 4)]
    out += [" ".join(rng.choice(_PHYSICS_Q) for _ in range(3)) for _ in range(n // 8)]
    out += [_bio(rng, rng.choice(PROFESSIONS), rng.randrange(2)) for _ in range(n // 4)]
    out += [_story(rng) for _ in range(n // 8)] + [_toxic_doc(rng) for _ in range(n // 8)]
    return out


def fixture_activations(
    root: Path, model_repo: str, hooks: list[str], context_len: int = 64, n_texts: int = 80
) -> dict[str, Any]:
    """Each hook's activations [N, d] (float32) of the fixture LM `model_repo` (built under `root`
    first) on `fixture_texts`, tokenised as the SAE releases were trained (a BOS token first) with the
    BOS position and padding dropped, as the product's fit check sees them."""
    import torch

    from ssae_ray.config import ModelConfig
    from ssae_ray.models import capture, load_lm, tokenize_docs

    build_repo(root, "model", model_repo)
    src = repo_dir(root, "model", model_repo)
    lm = load_lm(ModelConfig(source=str(src), device="cpu", dtype="float32", context_len=context_len))
    tb = tokenize_docs(lm.tokenizer, fixture_texts(n_texts), context_len, prepend_bos=True)
    keep = tb.attention_mask[:, 1:].bool()
    out: dict[str, list[Any]] = {h: [] for h in hooks}
    with torch.no_grad():
        for i in range(0, tb.input_ids.shape[0], 32):
            acts = capture(lm, tb.input_ids[i : i + 32], tb.attention_mask[i : i + 32], hooks)
            for h in hooks:
                out[h].append(acts[h][:, 1:][keep[i : i + 32]].float())
    return {h: torch.cat(v) for h, v in out.items()}


def train_fixture_sae(x: Any, d_sae: int, seed: int, apply_b_dec_to_input: bool, l1: float = 0.2,
                      steps: int = 400, batch: int = 512, lr: float = 2e-3) -> dict[str, Any]:  # fmt: skip
    """A ReLU SAE [W_enc [d_in, d_sae], W_dec, b_enc, b_dec] trained briefly on `x` [N, d_in] the
    way sae-lens trains one (Anthropic's April 2024 recipe, shrunk): b_dec initialised to the mean,
    W_enc = W_dec^T, MSE + l1 * sum f_i ||W_dec,i|| (the penalty relative to E||x||^2), Adam;
    single-threaded and seeded, so a rebuild on one machine gives the same bytes. Its explained
    variance is well below 1, as a real release's is."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        x = x.float()
        n, d = x.shape
        scale = x.pow(2).sum(1).mean()  # the l1 term is relative to the inputs' mean square norm
        w_dec = torch.randn(d_sae, d, generator=g)
        w_dec = 0.1 * w_dec / w_dec.norm(dim=1, keepdim=True)
        params = {"W_enc": w_dec.T.clone(), "W_dec": w_dec, "b_enc": torch.zeros(d_sae), "b_dec": x.mean(0)}
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(params.values(), lr=lr)
        for _ in range(steps):
            xb = x[torch.randint(0, n, (batch,), generator=g)]
            xin = xb - params["b_dec"] if apply_b_dec_to_input else xb
            f = torch.relu(xin @ params["W_enc"] + params["b_enc"])
            x_hat = f @ params["W_dec"] + params["b_dec"]
            mse = (x_hat - xb).pow(2).sum(1).mean() / scale
            sparsity = (f * params["W_dec"].norm(dim=1)).sum(1).mean() / scale.sqrt()
            loss = mse + l1 * sparsity
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {k: v.detach().contiguous() for k, v in params.items()}
    finally:
        torch.set_num_threads(threads)


def sae_explained_variance(tensors: dict[str, Any], x: Any, apply_b_dec_to_input: bool,
                           threshold: Any = None) -> float:  # fmt: skip
    """1 - FVU of the SAE `tensors` (ReLU, or JumpReLU with `threshold`) on `x`."""
    import torch

    with torch.no_grad():
        xin = x - tensors["b_dec"] if apply_b_dec_to_input else x
        pre = xin @ tensors["W_enc"] + tensors["b_enc"]
        f = torch.relu(pre) if threshold is None else pre * (pre > threshold)
        x_hat = f @ tensors["W_dec"] + tensors["b_dec"]
        return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _sae_folder(folder: Path, cfg: dict[str, Any], tensors: dict[str, Any], sparsity: bool = True) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    if sparsity:
        d_sae = tensors["b_enc"].shape[0]
        g = torch.Generator().manual_seed(d_sae)
        save_file({"sparsity": -1 - 3 * torch.rand(d_sae, generator=g)}, str(folder / "sparsity.safetensors"))


GEMMA_2B_D_MODEL = 64
GEMMA_2B_D_SAE = 256
PYTHIA_D_MODEL = 64
PYTHIA_D_SAE = 256
JB_NORM_SCALING_FACTOR = 0.21381938399317255
"""sae-lens' `norm_scaling_factor` for gemma-2b-res-jb blocks.12 (its pretrained_saes.yaml)."""


JB_FOLDERS = {0: "gemma_2b_blocks.0.hook_resid_post_16384_anthropic",
              6: "gemma_2b_blocks.6.hook_resid_post_16384_anthropic_fast_lr",
              10: "gemma_2b_blocks.10.hook_resid_post_16384", 12: "gemma_2b_blocks.12.hook_resid_post_16384",
              17: "gemma_2b_blocks.17.hook_resid_post_16384"}  # fmt: skip
JB_NORMALISED = (10, 12, 17)
"""The layers whose fixture SAE reads activations scaled to E||c x||^2 = d_in
(`normalize_activations: expected_average_only_in`); sae-lens' registry gives the factor for 12 only,
so 10 and 17 load unfolded (their registry variance_explained, -0.2 and -0.85, is what such an SAE
explains of raw activations). 0 and 6 read raw activations (registry: 0.999, 0.71)."""


def _reads_hub(build: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    """Marks a builder that reads other fixture repos (an SAE trained on a fixture LM's activations):
    it is called with the hub root as well."""
    build.reads_hub = True  # type: ignore[attr-defined]
    return build


@_reads_hub
def _jbloom_gemma(folder: Path, root: Path) -> None:
    """jbloom/Gemma-2b-Residual-Stream-SAEs: one folder per release entry, cfg.json in the pre-6.0
    sae-lens format (`hook_point`, `normalize_activations: expected_average_only_in`, no
    `sae_lens_version`, a `scaling_factor` of ones beside the weights). Each SAE is trained on the
    fixture google/gemma-2b's activations at its hook; those of `JB_NORMALISED` on activations times
    the norm scaling factor (12: the registry's `JB_NORM_SCALING_FACTOR`, which `from_pretrained`
    folds into W_enc / W_dec / b_dec; 10, 17: sqrt(d_in) / E||x||, which no loader knows)."""
    import torch

    acts = fixture_activations(root, "google/gemma-2b", [f"blocks.{i}.hook_resid_post" for i in JB_FOLDERS])
    for layer, name in JB_FOLDERS.items():
        x = acts[f"blocks.{layer}.hook_resid_post"]
        normalised = layer in JB_NORMALISED
        factor = 1.0
        if normalised:
            factor = (
                JB_NORM_SCALING_FACTOR if layer == 12 else float(GEMMA_2B_D_MODEL**0.5 / x.norm(dim=1).mean())
            )
        cfg = {
            "model_name": "gemma-2b", "hook_point": f"blocks.{layer}.hook_resid_post", "hook_point_layer": layer,
            "hook_point_head_index": None, "dataset_path": "HuggingFaceFW/fineweb", "is_dataset_tokenized": False,
            "context_size": 1024, "use_cached_activations": False, "d_in": GEMMA_2B_D_MODEL,
            "d_sae": GEMMA_2B_D_SAE, "b_dec_init_method": "geometric_median", "expansion_factor": 8,
            "activation_fn": "relu",
            "normalize_activations": "expected_average_only_in" if normalised else "none",
            "apply_b_dec_to_input": False, "prepend_bos": True, "device": "cpu", "dtype": "float32",
            "l1_coefficient": 5, "lr": 5e-05, "sae_lens_training_version": "2.1.3",
        }  # fmt: skip
        tensors = train_fixture_sae(x * factor, GEMMA_2B_D_SAE, seed=layer, apply_b_dec_to_input=False)
        tensors["scaling_factor"] = torch.ones(
            GEMMA_2B_D_SAE
        )  # older sae-lens saved it; loaders drop all-ones
        _sae_folder(folder / name, cfg, tensors)
    _write(folder, {"README.md": "# Gemma-2b residual stream SAEs (local fixture)\n"})


PYTHIA_SAE_FOLDERS = {
    "res": ["e-res-sm", *[f"{i}-res-sm" for i in range(6)]],
    "mlp": [f"{i}-mlp-sm" for i in range(6)],
    "att": [f"{i}-att-sm" for i in range(6)],
}


def _pythia_saes(kind: str) -> Callable[[Path, Path], None]:
    hook = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "hook_attn_out"}[kind]

    def hook_point(name: str) -> str:
        layer = name.split("-")[0]
        return "blocks.0.hook_resid_pre" if layer == "e" else f"blocks.{layer}.{hook}"

    @_reads_hub
    def build(folder: Path, root: Path) -> None:
        """ctigges/pythia-70m-deduped__<kind>-sm_processed (Marks et al.'s dictionaries converted to
        sae-lens' pre-6.0 format): one folder per hook, `e-res-sm` the embedding (blocks.0 resid_pre).
        No `prepend_bos` key: sae-lens' legacy default (True) applies, as for the real folders. Each
        SAE is trained on the fixture pythia's activations at its hook, b_dec subtracted from the
        input (`apply_b_dec_to_input: true`, as Marks et al.'s dictionaries)."""
        names = PYTHIA_SAE_FOLDERS[kind]
        acts = fixture_activations(root, "EleutherAI/pythia-70m-deduped", [hook_point(n) for n in names])
        for i, name in enumerate(names):
            layer = name.split("-")[0]
            cfg = {
                "model_name": "pythia-70m-deduped", "hook_point": hook_point(name),
                "hook_point_layer": 0 if layer == "e" else int(layer), "hook_point_head_index": None,
                "d_in": PYTHIA_D_MODEL, "d_sae": PYTHIA_D_SAE, "dataset_path": "monology/pile-uncopyrighted",
                "context_size": 128, "activation_fn": "relu", "apply_b_dec_to_input": True,
                "normalize_activations": "none", "device": "cpu", "dtype": "float32",
                "finetuning_scaling_factor": False,
            }  # fmt: skip
            tensors = train_fixture_sae(
                acts[hook_point(name)], PYTHIA_D_SAE, seed=100 + i, apply_b_dec_to_input=True
            )
            _sae_folder(folder / name, cfg, tensors, sparsity=False)
        _write(folder, {"README.md": f"# pythia-70m-deduped {kind} SAEs (local fixture)\n"})

    return build


GEMMA_SCOPE_IDS = ["layer_12/width_16k/average_l0_82"]
"""Gemma Scope folders served (sae-lens fixes d_in 2304 and reads d_sae from `width_16k`)."""


def _savez_fast(path: Path, arrays: dict[str, Any]) -> None:
    """`np.savez_compressed` at zlib level 1 (the arrays are mostly zeros: 20x faster, as small)."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


GEMMA_SCOPE_TRAINED = 512
"""Latents of the fixture Gemma Scope SAE trained on the fixture gemma-2-2b (the other 16384 - 512
are dead: zero encoder columns and decoder rows, thresholds above any pre-activation)."""


@_reads_hub
def _gemma_scope(folder: Path, root: Path) -> None:
    """google/gemma-scope-2b-pt-res: `<layer>/<width>/<average_l0>/params.npz` with `W_enc`, `W_dec`,
    `b_enc`, `b_dec`, `threshold` (JumpReLU), float32 at the real shapes. `GEMMA_SCOPE_TRAINED`
    latents are trained on the fixture google/gemma-2-2b's raw layer activations (Gemma Scope's
    released weights read raw activations: no norm factor, b_dec not subtracted from the input), then
    given JumpReLU thresholds at a quarter of each latent's mean positive pre-activation."""
    import numpy as np
    import torch

    d_in, d_sae, k = 2304, 16384, GEMMA_SCOPE_TRAINED
    for i, sae_id in enumerate(GEMMA_SCOPE_IDS):
        hook = f"blocks.{int(sae_id.split('/')[0].removeprefix('layer_'))}.hook_resid_post"
        x = fixture_activations(root, "google/gemma-2-2b", [hook], n_texts=32)[hook]  # d 2304: fewer tokens
        # average L0 ~80-100 (the folder's average_l0_82), explained variance ~0.75 on its training data
        t = train_fixture_sae(x, k, seed=200 + i, apply_b_dec_to_input=False, l1=0.05, steps=200, batch=256)
        with torch.no_grad():
            pre = x @ t["W_enc"] + t["b_enc"]
            pos = pre.clamp_min(0)
            theta = 0.25 * pos.sum(0) / (pre > 0).sum(0).clamp_min(1)
        w_enc = np.zeros((d_in, d_sae), np.float32)
        w_dec = np.zeros((d_sae, d_in), np.float32)
        b_enc = np.zeros(d_sae, np.float32)
        threshold = np.full(d_sae, 1e3, np.float32)
        w_enc[:, :k], w_dec[:k], b_enc[:k] = t["W_enc"].numpy(), t["W_dec"].numpy(), t["b_enc"].numpy()
        threshold[:k] = theta.numpy()
        out = folder / sae_id
        out.mkdir(parents=True, exist_ok=True)
        arrays = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": t["b_dec"].numpy(),
                  "threshold": threshold}  # fmt: skip
        _savez_fast(out / "params.npz", arrays)
    _write(folder, {"README.md": "# Gemma Scope 2B PT residual SAEs (local fixture)\n"})


# ---------------------------------------------------------------------------------------------
# Datasets


def _configs(splits: dict[str, str], features: dict[str, Any]) -> dict[str, Any]:
    """The README front matter the Hub writes: features (a dict value is a struct) and the
    `configs` block mapping split names to files."""

    def feature(name: str, v: Any) -> dict[str, Any]:
        if isinstance(v, dict):
            return {"name": name, "struct": [feature(k, x) for k, x in v.items()]}
        return {"name": name, "dtype": v}

    return {
        "dataset_info": {"features": [feature(k, v) for k, v in features.items()]},
        "configs": [
            {"config_name": "default", "data_files": [{"split": s, "path": p} for s, p in splits.items()]}
        ],
    }


def _bias_in_bios(folder: Path) -> None:
    """LabHC/bias_in_bios: `hard_text`, `profession` (int, 28 classes), `gender` (0 male, 1 female);
    splits train / dev / test as `data/<split>-00000-of-00001-<hash>.parquet`."""
    rng = random.Random(11)
    splits = {"train": 1600, "dev": 400, "test": 600}
    files = {}
    for split, n in splits.items():
        rows = []
        for _ in range(n):
            r = rng.random()
            prof = 21 if r < 0.35 else 13 if r < 0.65 else rng.randrange(len(PROFESSIONS))
            # professors mostly male, nurses mostly female: the spurious correlation SHIFT removes
            p_female = {21: 0.25, 13: 0.8}.get(prof, 0.5)
            gender = int(rng.random() < p_female)
            rows.append(
                {"hard_text": _bio(rng, PROFESSIONS[prof], gender), "profession": prof, "gender": gender}
            )
        files[f"data/{split}-00000-of-00001-{_shard_hash('bib', split)}.parquet"] = _parquet(rows)
    front = _configs({s: f"data/{s}-*" for s in splits}, {"hard_text": "string", "profession": "int64",
                                                           "gender": "int64"})  # fmt: skip
    files["README.md"] = _readme(front, "# Bias in Bios (local fixture: generated bios)")
    _write(folder, files)


def _pile_toxicity(folder: Path) -> None:
    """tomekkorbak/pile-toxicity-balanced: `text`, `score` (Perspective toxicity), `meta`; train /
    test (9:1), half toxic documents."""
    rng = random.Random(12)
    files = {}
    for split, n in {"train": 900, "test": 100}.items():
        rows = []
        for _ in range(n):
            toxic = rng.random() < 0.5
            text = _toxic_doc(rng) if toxic else _general_doc(rng)
            score = rng.uniform(0.5, 0.95) if toxic else rng.uniform(0.0, 0.05)
            rows.append({"text": text, "meta": {"pile_set_name": rng.choice(["Pile-CC", "OpenWebText2"])},
                         "score": score})  # fmt: skip
        files[f"data/{split}-00000-of-00001.parquet"] = _parquet(rows)
    front = _configs(
        {s: f"data/{s}-*" for s in ("train", "test")},
        {"text": "string", "meta": {"pile_set_name": "string"}, "score": "float64"},
    )
    files["README.md"] = _readme(front, "# Pile toxicity balanced (local fixture: generated text)")
    _write(folder, files)


def _arxiv_physics(folder: Path) -> None:
    """anonymousdatasets/arxiv-physics: one train split of physics papers (`text`, `title`)."""
    rng = random.Random(13)
    rows = [
        {"title": f"On {rng.choice(_PHYSICS).split(' ')[2]} {i}", "text": _physics_doc(rng, 8)}
        for i in range(800)
    ]
    files = {"data/train-00000-of-00001.parquet": _parquet(rows)}
    front = _configs({"train": "data/train-*"}, {"title": "string", "text": "string"})
    files["README.md"] = _readme(front, "# arXiv physics (local fixture: generated text)")
    _write(folder, files)


def _physics_instruct(folder: Path) -> None:
    """AlgorithmicResearchGroup/arxiv-physics-instruct-tune-30k (formerly ArtifactAI/...): one JSON
    lines file at the root, `arxiv_physics_instruct_30k.jsonl`, records `{question, answer}`; datasets
    reads it as a single `train` split."""
    rng = random.Random(14)
    rows = [{"question": " ".join(rng.choice(_PHYSICS_Q) for _ in range(2)), "answer": _physics_doc(rng, 3)}
            for _ in range(400)]  # fmt: skip
    _write(folder, {
        "arxiv_physics_instruct_30k.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
        "README.md": _readme({"license": "cc-by-4.0", "language": ["en"]},
                             "# arXiv physics instruct 30k (local fixture: generated text)"),
    })  # fmt: skip


def _pile(folder: Path) -> None:
    """monology/pile-uncopyrighted: JSON lines compressed with zstd, `train/NN.jsonl.zst`,
    `val.jsonl.zst`, `test.jsonl.zst`; records `{text, meta: {pile_set_name}}`. Reading it needs the
    `zstandard` package (a dependency of this project)."""
    import zstandard

    rng = random.Random(15)

    def shard(n: int) -> bytes:
        lines = [json.dumps({"text": _web_doc(rng), "meta": {"pile_set_name": rng.choice(["Pile-CC", "ArXiv",
                                                                                           "Wikipedia (en)"])}})
                 for _ in range(n)]  # fmt: skip
        return zstandard.ZstdCompressor(level=3).compress(("\n".join(lines) + "\n").encode())

    files: dict[str, str | bytes] = {f"train/{i:02d}.jsonl.zst": shard(800) for i in range(3)}
    files["val.jsonl.zst"] = shard(200)
    files["test.jsonl.zst"] = shard(200)
    files["README.md"] = _readme({"license": "other", "pretty_name": "Pile Uncopyrighted"},
                                 "# Pile Uncopyrighted (local fixture: generated text)")  # fmt: skip
    _write(folder, files)


OWT_DOCS = (3, 2, 500)
"""The fixture OpenWebText: 3 subset tars x 2 xz archives x 500 documents (the real one: 21 tars,
8,013,769 documents)."""
OWT_PARTIAL_DOCS = 2000
"""Documents in the fixture's partial Parquet conversion (the first ones, in the script's order)."""


def _owt_docs() -> list[list[list[str]]]:
    rng = random.Random(16)
    n_tar, n_xz, n_doc = OWT_DOCS
    return [[[_web_doc(rng) for _ in range(n_doc)] for _ in range(n_xz)] for _ in range(n_tar)]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_556_668_800, 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _openwebtext_script(folder: Path) -> None:
    """Skylion007/openwebtext main: the loading script (which `datasets` >= 4 refuses), its card
    (`dataset_info.splits` gives the full document count) and the raw files the script reads:
    `subsets/urlsf_subsetNN.tar`, each holding `openwebtext/urlsf_subsetNN-K_data.xz`, each an
    xz-compressed tar of `.txt` documents."""
    import lzma

    docs = _owt_docs()
    files: dict[str, str | bytes] = {}
    for t, tar_docs in enumerate(docs):
        members = []
        for k, xz_docs in enumerate(tar_docs):
            inner = _tar(
                [(f"{t:04d}{k:03d}-{j:05d}.txt", (d + "\n").encode()) for j, d in enumerate(xz_docs)]
            )
            members.append(
                (f"openwebtext/urlsf_subset{t:02d}-{k + 1}_data.xz", lzma.compress(inner, preset=1))
            )
        files[f"subsets/urlsf_subset{t:02d}.tar"] = _tar(members)
    n = sum(len(x) for t in docs for x in t)
    files["openwebtext.py"] = (
        '"""The Open WebText Corpus (loading script; local fixture)."""\n'
        "import datasets\n\n\nclass Openwebtext(datasets.GeneratorBasedBuilder):\n    pass\n"
    )
    files["README.md"] = _readme(
        {
            "pretty_name": "OpenWebText",
            "dataset_info": {
                "features": [{"name": "text", "dtype": "string"}],
                "config_name": "plain_text",
                "splits": [{"name": "train", "num_examples": n}],
            },
        },
        "# OpenWebText (local fixture)",
    )
    _write(folder, files)  # fmt: skip


def _openwebtext_parquet(folder: Path) -> None:
    """Skylion007/openwebtext `refs/convert/parquet`: the Hub's Parquet export of a script dataset
    larger than its conversion limit (~5 GB) covers only the first rows, in a split folder named
    `partial-train`: `plain_text/partial-train/NNNN.parquet` (text), `OWT_PARTIAL_DOCS` of the
    repo's documents."""
    docs = [d for t in _owt_docs() for x in t for d in x][:OWT_PARTIAL_DOCS]
    _write(folder, {f"plain_text/partial-train/{i:04d}.parquet": _parquet([{"text": d} for d in docs[i * 1000 : (i + 1) * 1000]])
                    for i in range(2)})  # fmt: skip


def _tinystories(folder: Path) -> None:
    """roneneldan/TinyStories: `text`; train / validation as Parquet under data/, beside the
    original .txt files, as on the Hub."""
    rng = random.Random(17)
    files: dict[str, str | bytes] = {}
    for split, n, shards in (("train", 2000, 4), ("validation", 200, 1)):
        for s in range(shards):
            name = f"data/{split}-{s:05d}-of-{shards:05d}-{_shard_hash('tinystories', split, s)}.parquet"
            files[name] = _parquet([{"text": _story(rng)} for _ in range(n // shards)])
    # the original text files beside the Parquet (stories separated by <|endoftext|>); the README's
    # `configs` block is what makes `datasets` read data/ and not these
    for name in ("TinyStories-train.txt", "TinyStories-valid.txt", "TinyStoriesV2-GPT4-train.txt",
                 "TinyStoriesV2-GPT4-valid.txt"):  # fmt: skip
        files[name] = "\n<|endoftext|>\n".join(_story(rng) for _ in range(20)) + "\n"
    files["README.md"] = _readme(
        _configs({"train": "data/train-*", "validation": "data/validation-*"}, {"text": "string"}),
        "# TinyStories (local fixture: generated stories)",
    )
    _write(folder, files)  # fmt: skip


def _script_only(folder: Path) -> None:
    """A loading-script dataset with no Parquet conversion (a test case, not a real id)."""
    _write(folder, {
        "script-dataset-without-parquet.py": "import datasets\n\n\nclass D(datasets.GeneratorBasedBuilder):\n    pass\n",
        "README.md": "# A loading-script dataset without a Parquet conversion (local fixture)\n",
    })  # fmt: skip


def _gated_dataset(folder: Path) -> None:
    """A gated Parquet dataset (a test case, not a real id)."""
    rng = random.Random(18)
    files: dict[str, str | bytes] = {
        "data/train-00000-of-00001.parquet": _parquet([{"text": _general_doc(rng)} for _ in range(20)])
    }
    files["README.md"] = _readme(
        _configs({"train": "data/train-*"}, {"text": "string"}), "# Gated (local fixture)"
    )
    _write(folder, files)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The registry

FIXTURES: dict[tuple[str, str, str], tuple[Callable[..., None], bool]] = {
    # (kind, repo id, revision): (builder, gated)
    ("model", "google/gemma-2b", "main"): (_gemma_2b, True),
    ("model", "google/gemma-2-2b", "main"): (_gemma_2_2b, True),
    ("model", "EleutherAI/pythia-70m-deduped", "main"): (_pythia, False),
    ("model", "roneneldan/TinyStories-1M", "main"): (_tinystories_1m, False),
    ("model", "facebook/contriever", "main"): (_contriever, False),
    ("model", "jbloom/Gemma-2b-Residual-Stream-SAEs", "main"): (_jbloom_gemma, False),
    ("model", "ctigges/pythia-70m-deduped__res-sm_processed", "main"): (_pythia_saes("res"), False),
    ("model", "ctigges/pythia-70m-deduped__mlp-sm_processed", "main"): (_pythia_saes("mlp"), False),
    ("model", "ctigges/pythia-70m-deduped__att-sm_processed", "main"): (_pythia_saes("att"), False),
    ("model", "google/gemma-scope-2b-pt-res", "main"): (_gemma_scope, False),
    ("dataset", "LabHC/bias_in_bios", "main"): (_bias_in_bios, False),
    ("dataset", "tomekkorbak/pile-toxicity-balanced", "main"): (_pile_toxicity, False),
    ("dataset", "anonymousdatasets/arxiv-physics", "main"): (_arxiv_physics, False),
    ("dataset", "AlgorithmicResearchGroup/arxiv-physics-instruct-tune-30k", "main"): (
        _physics_instruct,
        False,
    ),
    ("dataset", "monology/pile-uncopyrighted", "main"): (_pile, False),
    ("dataset", "Skylion007/openwebtext", "main"): (_openwebtext_script, False),
    ("dataset", "Skylion007/openwebtext", "refs/convert/parquet"): (_openwebtext_parquet, False),
    ("dataset", "roneneldan/TinyStories", "main"): (_tinystories, False),
    # test cases for the errors (not real ids)
    ("dataset", "local-hub/script-dataset-without-parquet", "main"): (_script_only, False),
    ("dataset", "local-hub/gated-dataset", "main"): (_gated_dataset, True),
}


def repo_dir(root: str | Path, kind: str, repo_id: str, revision: str = "main") -> Path:
    return Path(root) / f"{kind}s" / repo_id / urllib.parse.quote(revision, safe="")


def default_root() -> Path:
    """`~/.cache/ssae-ray/local-hub/<hash of this file>`: built once, rebuilt when this file changes
    (`SSAE_LOCAL_HUB_DIR` overrides the folder)."""
    import hashlib

    env = os.environ.get("SSAE_LOCAL_HUB_DIR")
    if env:
        return Path(env).expanduser()
    digest = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]
    return Path("~/.cache/ssae-ray/local-hub").expanduser() / f"v{FIXTURE_VERSION}-{digest}"


def build_repo(root: str | Path, kind: str, repo_id: str) -> bool:
    """Write every revision of one fixture repo missing under `root`; False if it is no fixture."""
    keys = [k for k in FIXTURES if k[:2] == (kind, repo_id)]
    for key in keys:
        _build_one(Path(root), key)
    return bool(keys)


def _build_one(root: Path, key: tuple[str, str, str]) -> None:
    kind, repo_id, rev = key
    build, gated = FIXTURES[key]
    out = repo_dir(root, kind, repo_id, rev)
    if out.is_dir():
        return
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # another process may build it at the same time
    shutil.rmtree(tmp, ignore_errors=True)
    if getattr(build, "reads_hub", False):
        build(tmp, root)
    else:
        build(tmp)
    if gated:
        (out.parent / "repo.json").write_text(json.dumps({"gated": True}))
    try:
        tmp.rename(out)
    except OSError:  # built meanwhile by the other process
        shutil.rmtree(tmp, ignore_errors=True)


def build_fixture_hub(root: str | Path, only: list[str] | None = None) -> Path:
    """Write the fixture repos (all, or those whose id is in `only`) missing under `root`."""
    root = Path(root)
    for key in FIXTURES:
        if only is None or key[1] in only:
            _build_one(root, key)
    return root
