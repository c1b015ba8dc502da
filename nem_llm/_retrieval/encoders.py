"""Fast catalog encoders: the same MiniLM on ONNX Runtime (fp32 or int8), or a static model.

Encoding the catalog is the slow part of building an index (torch MiniLM: hours for
millions of forms on two cores). Every encoder here is an :class:`~.embedding.Embedder`
made from the same offline model directory, so it plugs in wherever torch's does:

========== ==================================================== ===========================
encoder    what                                                 needs
========== ==================================================== ===========================
torch      sentence-transformers on torch (the reference)       (always installed)
onnx       the model exported to ONNX once, fp32 (cosine to     ``[fast]``: onnxruntime,
           torch >= 0.9999)                                     onnx
onnx-int8  the export, int8 dynamic-quantised per channel       ``[fast]``
static     model2vec distilled from the model (token vectors,   ``[static]``: model2vec,
           no transformer at encode time)                       skeletoken
========== ==================================================== ===========================

Exports and distillations are made once, from the local weights (nothing is downloaded),
and cached under :func:`encoder_cache_dir` in a directory named for the weights'
fingerprint. An encoder's :attr:`name` says which encoder made the vectors
(``all-MiniLM-L6-v2@onnx-int8``; torch keeps the plain model name), so a saved index
records it and vectors from two encoders are never mixed.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from .embedding import (
    Embedder,
    SentenceTransformerEmbedder,
    Vectors,
    default_model_path,
    files_sha256,
    model_name_of,
)

__all__ = [
    "AUTO_ENCODERS",
    "ENCODERS",
    "EncoderName",
    "OnnxEmbedder",
    "StaticEmbedder",
    "encoder_cache_dir",
    "encoder_of",
    "make_embedder",
    "model_fingerprint",
]

log = logging.getLogger("nem_llm")

EncoderName = Literal["auto", "torch", "onnx", "onnx-int8", "static"]
#: The encoders :func:`make_embedder` builds (``"auto"`` picks one of them).
ENCODERS: tuple[str, ...] = tuple(a for a in get_args(EncoderName) if a != "auto")
#: What ``"auto"`` tries, in order: the first whose packages are installed. Chosen by
#: measurement (benchmarks/bench_encoders.py; results/encoders.md, encoders-loaded.md):
#: int8 encoded 5.1x (3.1x under heavier load) torch's forms/s with one thread each, and
#: 24x (5.6x) with each library's default threads, with R@10 equal or better on every
#: development set; fp32 ONNX 2.3x (1.9x) per core with identical R@10; static 200x+ but
#: languages R@10 -0.027.
AUTO_ENCODERS: tuple[str, ...] = ("onnx-int8", "torch")
#: Bump when the export recipe changes: cached exports of an older recipe are not reused.
EXPORT_VERSION = 1
_MODEL_FILES = (
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "1_Pooling/config.json",
    "model.safetensors",
    "pytorch_model.bin",
)
#: A call's texts are split into tasks of this many (sorted by length, so a pass's texts pad
#: alike) that ``threads`` workers take in turn; a call of at most ``threads`` tasks' texts
#: (the matcher's query micro-batches) is dealt pass by pass into one task per worker.
_TASK_TEXTS = 64
_EXTRAS = {"onnx": "fast", "onnx-int8": "fast", "static": "static"}
_PACKAGES = {"onnx": ("onnxruntime", "onnx"), "static": ("model2vec", "skeletoken")}


def encoder_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where exported and distilled encoders are kept.

    ``cache_dir`` if given, else ``$NEM_LLM_CACHE/encoders``, else
    ``$XDG_CACHE_HOME/nem_llm/encoders`` (``~/.cache/nem_llm/encoders``).
    """
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("NEM_LLM_CACHE"):
        return Path(os.environ["NEM_LLM_CACHE"]) / "encoders"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "nem_llm" / "encoders"


def encoder_of(name: str) -> str:
    """The encoder that made vectors recorded under embedder ``name`` (``"torch"`` if plain)."""
    _, sep, suffix = name.rpartition("@")
    return suffix if sep and suffix in ENCODERS else "torch"


def _installed(encoder: str) -> bool:
    """Whether the packages ``encoder`` needs import (a broken install counts as missing)."""
    for pkg in _PACKAGES.get("onnx" if encoder == "onnx-int8" else encoder, ()):
        try:
            importlib.import_module(pkg)
        except ImportError:
            return False
    return True


def _require(encoder: str) -> None:
    """Raise a ConfigError naming the extra to install when ``encoder``'s packages are missing."""
    if not _installed(encoder):
        pkgs = " and ".join(_PACKAGES["onnx" if encoder == "onnx-int8" else encoder])
        raise ConfigError(
            f"encoder {encoder!r} needs {pkgs}: pip install -c constraints.txt "
            f"'nem_llm[{_EXTRAS[encoder]}]' (or use encoder='torch')"
        )


def make_embedder(
    encoder: str = "auto",
    model: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Embedder:
    """Build the embedder for ``encoder`` over ``model`` (default: the offline MiniLM).

    ``"auto"`` takes the first of :data:`AUTO_ENCODERS` whose packages are installed and
    falls back to torch; any other name is taken as asked, or fails with a ConfigError
    that names the extra to install.

    Example:
        >>> embedder = make_embedder("onnx-int8")          # doctest: +SKIP
        >>> embedder.name                                   # doctest: +SKIP
        'all-MiniLM-L6-v2@onnx-int8'

    Raises:
        ConfigError: an unknown encoder, or one whose packages are not installed.
    """
    if encoder == "auto":
        encoder = next((e for e in AUTO_ENCODERS if e == "torch" or _installed(e)), "torch")
    if encoder not in ENCODERS:
        raise ConfigError(
            f"encoder must be one of {', '.join(map(repr, ('auto', *ENCODERS)))}, got {encoder!r}"
        )
    if encoder == "torch":
        return SentenceTransformerEmbedder(model)
    _require(encoder)
    if encoder == "static":
        return StaticEmbedder(model, cache_dir=cache_dir)
    return OnnxEmbedder(model, quantize=encoder == "onnx-int8", cache_dir=cache_dir)


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """sha256 over a sentence-transformers directory's weights, configs and tokenizer."""
    root = Path(model_dir)
    present = [rel for rel in _MODEL_FILES if (root / rel).is_file()]
    if not any(rel.endswith((".safetensors", ".bin")) for rel in present):
        raise ConfigError(
            f"{root}: not a sentence-transformers model directory "
            "(no model.safetensors or pytorch_model.bin)"
        )
    return files_sha256(root, present)


def _model_dir(model: str | os.PathLike[str] | None) -> Path:
    path = Path(os.fspath(model)) if model is not None else Path(default_model_path())
    if not path.is_dir():
        raise ConfigError(f"{path}: the model must be a local directory for a fast encoder")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from exc
    return data


def _check_mean_pooling(model_dir: Path) -> None:
    """The ONNX graph pools by the attention mask's mean, as all-MiniLM-L6-v2 does."""
    pooling = model_dir / "1_Pooling" / "config.json"
    if not pooling.is_file():
        return
    cfg = _read_json(pooling)
    if "pooling_mode" in cfg:  # sentence-transformers >= 6 saves one mode by name
        mean = cfg["pooling_mode"] == "mean"
    else:  # older releases save one flag per mode
        mean = bool(cfg.get("pooling_mode_mean_tokens")) and not any(
            cfg.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens")
        )
    if not mean:
        raise ConfigError(f"{pooling}: the onnx encoder supports mean pooling only; use 'torch'")


class _Cached:
    """A lazily built artefact in ``cache_dir/<key>/``, built once into a temp dir, renamed."""

    def __init__(self, root: Path, key: str) -> None:
        self.path = root / key
        self._lock = threading.Lock()

    def get(self, build: Any) -> Path:
        """Return the artefact's directory, calling ``build(tmp_dir)`` if it is missing."""
        with self._lock:
            if (self.path / "done.json").is_file():
                return self.path
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}-", dir=self.path.parent))
            try:
                meta = build(tmp)
                (tmp / "done.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
                try:
                    tmp.rename(self.path)
                except OSError:  # another process finished first: use its copy
                    if not (self.path / "done.json").is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return self.path


def export_onnx(model_dir: Path, out: Path, *, quantize: bool) -> dict[str, Any]:
    """Export a sentence-transformers BERT model to ``out/model.onnx`` (pooled, normalised).

    The graph takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` and returns
    ``sentence_embedding``: the attention-masked mean of the last hidden states, L2
    normalised, as sentence-transformers computes it. ``quantize``: int8 dynamic
    quantisation of the weights, per output channel (per tensor lost ~4x more cosine).
    """
    import torch
    from transformers import AutoModel

    _check_mean_pooling(model_dir)
    # eager attention traces into plain ops that ONNX Runtime fuses at load time
    bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    fp32 = out / ("model.fp32.onnx" if quantize else "model.onnx")
    dims = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is deprecated in torch 2.9+ but traces this model
        # exactly without onnxscript; its tracer warnings concern shapes that are fixed here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pooled(bert),
            (ids, (ids > 0).long(), torch.zeros_like(ids)),
            str(fp32),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": dims,
                "attention_mask": dims,
                "token_type_ids": dims,
                "sentence_embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        was = root.disabled
        root.disabled = True  # quantize_dynamic logs advice on the root logger
        try:
            quantize_dynamic(
                str(fp32), str(out / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True
            )
        finally:
            root.disabled = was
        fp32.unlink()
    return {"torch": torch.__version__, "quantize": quantize, "export_version": EXPORT_VERSION}


class OnnxEmbedder:
    """A sentence-transformers model on ONNX Runtime: the same vectors, faster.

    The model (default: the offline all-MiniLM-L6-v2) is exported to ONNX once, on first
    use, from its local weights, and cached (see :func:`encoder_cache_dir`); later
    processes reuse the export. Tokenisation is the model's own fast tokenizer
    (``tokenizer.json``), truncated at its ``max_seq_length``; pooling and normalisation
    run inside the graph. fp32 vectors match torch's to a cosine of >= 0.9999;
    ``quantize=True`` (int8 weights) trades ~1% of cosine for ~2x more speed.

    int8 quantises activations dynamically with one scale per tensor, so a text's vector
    would depend on the other texts in its batch (measured: cosine down to 0.97 between a
    text encoded alone and in a batch of 64). The int8 encoder therefore runs one text per
    forward pass by default: its vectors depend on the text alone (the same in a query
    micro-batch, a catalog chunk or an incremental update), at 0-40% less speed than
    batches of 16 (two runs of benchmarks/bench_encoders.py).

    Args:
        model: a local sentence-transformers directory (mean pooling), e.g. one written
            by ``retrieval.learning.finetune``.
        quantize: int8 dynamic quantisation (name suffix ``@onnx-int8``, else ``@onnx``).
        cache_dir: where exports are kept (default :func:`encoder_cache_dir`).
        batch_size: texts per forward pass (sorted by length, as sentence-transformers
            does); ``None``: 16 for fp32 (faster here than 64: less padding), 1 for int8.
        threads: forward passes run in parallel on this many worker threads, each pass
            on one core (``None``: one per CPU), for every call: the catalog's and the
            matcher's query micro-batches alike (a flush of 100 queries is two tasks of 50
            on two cores). Every pass is single-threaded: splitting the work by texts
            rather than inside each (small) pass measured faster here, and idle workers
            block on a queue, never spinning on a core the event loop needs.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        quantize: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int | None = None,
        threads: int | None = None,
    ) -> None:
        _require("onnx-int8" if quantize else "onnx")
        self._model_dir = _model_dir(model)
        self.quantize = quantize
        self.encoder = "onnx-int8" if quantize else "onnx"
        base = model_name_of(None if model is None else os.fspath(model))
        self._name = f"{base}@{self.encoder}"
        self.cache_root = encoder_cache_dir(cache_dir)
        self.batch_size = batch_size or (1 if quantize else 16)
        self.threads = max(1, threads or os.cpu_count() or 1)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._onnx: Any = None
        self._tokenizer: Any = None
        self._inputs: list[str] = []
        self.export_dir: Path | None = None
        self.exported = False  # this object ran the export (not a cached one)

    @property
    def name(self) -> str:
        return self._name

    def _ensure_export(self) -> Path:
        if self.export_dir is None:
            fingerprint = model_fingerprint(self._model_dir)
            key = f"onnx-v{EXPORT_VERSION}-{self.encoder}-{fingerprint[:16]}"

            def build(tmp: Path) -> dict[str, Any]:
                self.exported = True
                log.info("nem_llm: exporting %s to ONNX (once) in %s", self._model_dir, tmp)
                meta = export_onnx(self._model_dir, tmp, quantize=self.quantize)
                return {**meta, "model": str(self._model_dir), "fingerprint": fingerprint}

            self.export_dir = _Cached(self.cache_root, key).get(build)
        return self.export_dir

    def _session(self) -> Any:
        with self._lock:
            if self._onnx is None:
                import onnxruntime as ort
                from tokenizers import Tokenizer

                path = self._ensure_export() / "model.onnx"
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                opts.inter_op_num_threads = 1
                opts.log_severity_level = 3
                try:
                    session = ort.InferenceSession(
                        str(path), opts, providers=["CPUExecutionProvider"]
                    )
                except Exception as exc:  # onnxruntime raises its own classes
                    raise ConfigError(
                        f"cannot load the ONNX export {path}: {exc} "
                        "(delete that directory to export again)"
                    ) from exc
                if self._tokenizer is None:
                    self._tokenizer = self._load_tokenizer(Tokenizer)
                    self._inputs = [i.name for i in session.get_inputs()]
                self._onnx = session
            return self._onnx

    def _load_tokenizer(self, tokenizer_cls: Any) -> Any:
        path = self._model_dir / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{path}: missing; the onnx encoder needs a fast tokenizer")
        tok = tokenizer_cls.from_file(str(path))
        st_cfg = self._model_dir / "sentence_bert_config.json"
        max_len = int(_read_json(st_cfg).get("max_seq_length", 512)) if st_cfg.is_file() else 512
        tok.enable_truncation(max_length=max_len)
        pad_id = tok.token_to_id("[PAD]")
        tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
        return tok

    def encode(self, texts: Sequence[str]) -> Vectors:
        session = self._session()
        dim = int(session.get_outputs()[0].shape[-1])
        out: Vectors = np.empty((len(texts), dim), dtype=np.float32)
        # sentence-transformers strips texts and sorts them by length (less padding)
        stripped = [str(t).strip() for t in texts]
        order = np.argsort([-len(t) for t in stripped], kind="stable")
        bs = self.batch_size
        if len(order) <= self.threads * _TASK_TEXTS:  # a small call: one task per worker,
            passes = [order[lo : lo + bs] for lo in range(0, len(order), bs)]  # dealt in turn
            n = min(self.threads, len(passes))
            tasks = [np.concatenate(passes[i::n]) for i in range(n)]
        else:
            step = max(bs, _TASK_TEXTS)
            tasks = [order[lo : lo + step] for lo in range(0, len(order), step)]
        if len(tasks) <= 1:
            for rows in tasks:
                self._encode_rows(session, stripped, rows, out)
        else:
            # onnxruntime and tokenizers release the GIL: passes run in parallel
            list(
                self._workers().map(
                    lambda rows: self._encode_rows(session, stripped, rows, out), tasks
                )
            )
        return out

    def _workers(self) -> ThreadPoolExecutor:
        """The encoder's worker threads (made once; idle ones block, they do not spin)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="nem-llm-onnx")
            return self._pool

    def _encode_rows(
        self, session: Any, texts: list[str], rows: npt.NDArray[np.intp], out: Vectors
    ) -> None:
        """Encode ``texts[rows]`` in passes of ``batch_size`` into ``out[rows]``."""
        for lo in range(0, len(rows), self.batch_size):
            part = rows[lo : lo + self.batch_size]
            enc = self._tokenizer.encode_batch([texts[i] for i in part])
            feed = {
                "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
            }
            out[part] = session.run(None, {k: v for k, v in feed.items() if k in self._inputs})[0]


class StaticEmbedder:
    """A static (model2vec) embedder distilled locally from a sentence-transformers model.

    Distillation encodes the model's vocabulary once through the transformer (~1-2
    minutes here) and keeps one vector per token (PCA to ``pca_dims``); encoding is then a
    mean of token vectors, orders of magnitude faster than the transformer and context-free.

    Args:
        model: a local sentence-transformers directory (default: the offline MiniLM).
        pca_dims: dimensions kept (name suffix ``@static``; the cache key records them).
        cache_dir: where distilled models are kept (default :func:`encoder_cache_dir`).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        pca_dims: int = 256,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        _require("static")
        self._model_dir = _model_dir(model)
        self.pca_dims = pca_dims
        base = model_name_of(None if model is None else os.fspath(model))
        suffix = "" if pca_dims == 256 else f"-pca{pca_dims}"
        self._name = f"{base}@static{suffix}" if suffix else f"{base}@static"
        self.cache_root = encoder_cache_dir(cache_dir)
        self._lock = threading.Lock()
        self._model: Any = None

    @property
    def name(self) -> str:
        return self._name

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                from model2vec import StaticModel

                fingerprint = model_fingerprint(self._model_dir)
                key = f"static-v{EXPORT_VERSION}-pca{self.pca_dims}-{fingerprint[:16]}"

                def build(tmp: Path) -> dict[str, Any]:
                    from model2vec.distill import distill

                    log.info("nem_llm: distilling %s (once) into %s", self._model_dir, tmp)
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    distill(
                        model_name=str(self._model_dir), pca_dims=self.pca_dims
                    ).save_pretrained(str(tmp))
                    return {"model": str(self._model_dir), "fingerprint": fingerprint}

                path = _Cached(self.cache_root, key).get(build)
                self._model = StaticModel.from_pretrained(str(path))
            return self._model

    def encode(self, texts: Sequence[str]) -> Vectors:
        model = self._load()
        if not texts:
            return np.zeros((0, int(model.dim)), dtype=np.float32)
        vecs = np.asarray(
            model.encode([str(t) for t in texts], show_progress_bar=False), dtype=np.float32
        )
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return np.ascontiguousarray(vecs / np.maximum(norms, 1e-12), dtype=np.float32)
