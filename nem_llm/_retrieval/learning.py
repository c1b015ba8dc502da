"""Fine-tune the sentence-transformers model on (anchor, positive) pairs: the "full" fit mode.

The loop is a plain torch loop over sentence-transformers' own model and its
``MultipleNegativesRankingLoss`` (in-batch negatives), the same steps as the library's
legacy ``old_fit`` (AdamW, linear warmup then decay, gradient clipping at 1). Its
``SentenceTransformerTrainer`` (and ``fit``, which wraps it) needs ``datasets`` and
``accelerate``; this loop needs neither, stops cleanly at a time limit and saves anyway.

In-batch negatives are only negatives if they belong to another entity: batches are built
by :func:`no_duplicate_batches` so that no two pairs of one batch share a text, directly or
through a chain of pairs (``(q, alias)`` and ``(alias, name)`` are one entity).

Example:
    >>> pairs = pairs_from_catalog(catalog) + pairs_from_labels(labels, catalog)
    >>> result = finetune(default_model_path(), pairs, Path("tuned"), max_seconds=600)
    >>> embedder = SentenceTransformerEmbedder(result.path)   # offline; name has the fingerprint
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .._text import fold, normalize
from ..catalog import Catalog
from ..errors import ConfigError, InputError
from .embedding import TUNED_MANIFEST, files_sha256, model_name_of

__all__ = [
    "FIT_MODES",
    "FinetuneResult",
    "FitMode",
    "LearnedLabels",
    "finetune",
    "learn_labels",
    "no_duplicate_batches",
    "pairs_from_catalog",
    "pairs_from_labels",
    "weights_fingerprint",
]

Pair = tuple[str, str]
_WARMUP_SHARE = 0.1  # of the planned steps, as sentence-transformers' WarmupLinear
_MAX_GRAD_NORM = 1.0


@dataclass(frozen=True, slots=True)
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes:
        path: The directory holding the tuned model and its manifest.
        steps: Optimizer steps taken.
        pairs: Pairs trained on (after validation and de-duplication), per epoch.
        seconds: Wall time of the training loop (model loading and saving excluded).
        pairs_per_second: Pairs seen per second of training (``batch rows / seconds``).
        stopped_by: ``"epochs"`` (all epochs done) or ``"time"`` (``max_seconds`` reached).
        fingerprint: sha256 of the saved model files (what the embedder's name carries).
    """

    path: Path
    steps: int
    pairs: int
    seconds: float
    pairs_per_second: float
    stopped_by: Literal["epochs", "time"]
    fingerprint: str


# --------------------------------------------------------------------------- pairs


def pairs_from_catalog(catalog: Catalog) -> list[Pair]:
    """The catalog's own ``(alias, name)`` pairs: each alias of an entity -> its name."""
    pairs: list[Pair] = []
    for entity in catalog.entities:
        forms = entity.surface_forms()  # the name, then each distinct alias
        pairs.extend((alias, entity.name) for alias in forms[1:])
    return pairs


def pairs_from_labels(
    labels: Iterable[tuple[str, str | None]],
    catalog: Catalog,
    *,
    aliases: bool = True,
    strict: bool = True,
) -> list[Pair]:
    """Turn labelled ``(query, entity_id)`` examples into training pairs.

    Each query (normalized as the matcher normalizes queries) gives ``(query, name)`` and,
    with ``aliases``, ``(query, alias)`` for each alias of its entity. Labels with id
    ``None`` (not in the catalog) teach nothing contrastive and are skipped, as are pairs
    whose two sides are the same text; repeated pairs are kept once.

    Raises:
        InputError: a query is not a non-blank string, or (with ``strict``) an id is not in
            the catalog; the message names ``labels[i]``. Without ``strict`` unknown ids
            are skipped.
    """
    seen: set[Pair] = set()
    pairs: list[Pair] = []
    for i, label in enumerate(labels):
        where = f"labels[{i}]"
        if not isinstance(label, tuple | list) or len(label) != 2:
            raise InputError("expected a (query, entity_id) pair", source=where)
        query, entity_id = label
        if not isinstance(query, str) or not normalize(query):
            raise InputError(f"query must be a non-blank string, got {query!r}", source=where)
        if entity_id is None:
            continue
        position = catalog.by_id.get(str(entity_id))
        if position is None:
            if strict:
                raise InputError(f"unknown entity id {entity_id!r}", source=where)
            continue
        entity = catalog.entities[position]
        text = normalize(query)
        targets = [entity.name, *entity.aliases] if aliases else [entity.name]
        for target in targets:
            pair = (text, target)
            if text != target and pair not in seen:
                seen.add(pair)
                pairs.append(pair)
    return pairs


def _validate_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """Check every pair holds two non-blank strings; drop exact repeats (order kept)."""
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Sequence):
        raise ConfigError(f"pairs must be a sequence of (anchor, positive), got {pairs!r:.80}")
    out: list[Pair] = []
    seen: set[Pair] = set()
    for i, pair in enumerate(pairs):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise InputError(
                f"expected an (anchor, positive) pair, got {pair!r:.80}", source=f"pairs[{i}]"
            )
        for side, text in zip(("anchor", "positive"), pair, strict=True):
            if not isinstance(text, str) or not text.strip():
                raise InputError(
                    f"{side} must be a non-blank string, got {text!r:.80}", source=f"pairs[{i}]"
                )
        key = (pair[0], pair[1])
        if key not in seen:
            seen.add(key)
            out.append(key)
    if len(out) < 2:
        raise ConfigError(
            f"fine-tuning needs at least 2 distinct pairs (in-batch negatives), got {len(out)}"
        )
    return out


def _components(pairs: Sequence[Pair]) -> list[int]:
    """Component id of each pair: pairs linked through shared texts share a component."""
    parent: dict[str, str] = {}

    def find(text: str) -> str:
        root = parent.setdefault(text, text)
        while root != parent[root]:
            root = parent[root]
        while parent[text] != root:  # path compression
            parent[text], text = root, parent[text]
        return root

    for anchor, positive in pairs:
        a, b = find(anchor), find(positive)
        if a != b:
            parent[b] = a
    roots: dict[str, int] = {}
    return [roots.setdefault(find(anchor), len(roots)) for anchor, _ in pairs]


def no_duplicate_batches(
    pairs: Sequence[Pair], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Shuffle pair indices into batches where no two pairs are of one component.

    A component is a set of pairs linked through shared texts (most often one entity:
    its aliases, its name and the queries labelled with it); two of them in one batch
    would make a true match an in-batch "negative". Like sentence-transformers'
    ``NoDuplicatesBatchSampler``, a pair that does not fit waits for the next batch; the
    last batches can be smaller. Every index appears exactly once.
    """
    if batch_size < 2:
        raise ConfigError(f"batch_size must be >= 2 (in-batch negatives), got {batch_size}")
    component = _components(pairs)
    remaining = list(range(len(pairs)))
    rng.shuffle(remaining)
    batches: list[list[int]] = []
    while remaining:
        batch: list[int] = []
        used: set[int] = set()
        waiting: list[int] = []
        for pos, index in enumerate(remaining):
            if len(batch) == batch_size:
                waiting.extend(remaining[pos:])
                break
            if component[index] in used:
                waiting.append(index)
            else:
                used.add(component[index])
                batch.append(index)
        batches.append(batch)
        remaining = waiting
    return batches


# --------------------------------------------------------------------------- saving


def weights_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """sha256 over a saved model directory's files (names and bytes), manifest excluded."""
    root = Path(model_dir)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return files_sha256(root, [rel for rel in files if rel != TUNED_MANIFEST])


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse to overwrite a non-empty directory that is not an earlier fine-tune output."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigError(f"out_dir {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / TUNED_MANIFEST).is_file():
            raise ConfigError(
                f"out_dir {out_dir} is not empty and holds no fine-tuned model: "
                "refusing to overwrite it"
            )


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` directory to ``out_dir`` (replacing an earlier output)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


# --------------------------------------------------------------------------- training


def _nothing() -> None:
    return None


def _lr_factor(step: int, total: int) -> float:
    """Linear warmup over the first 10% of ``total`` steps, then linear decay to 0."""
    warmup = max(1, math.ceil(total * _WARMUP_SHARE))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _train(
    model: Any,
    pairs: list[Pair],
    *,
    epochs: int,
    max_seconds: float | None,
    batch_size: int,
    learning_rate: float,
    seed: int,
    show_progress: bool,
    clock: Callable[[], float],
) -> tuple[int, int, float, Literal["epochs", "time"]]:
    """Run the loop; return (steps, rows seen, seconds, stopped_by)."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rng = random.Random(seed)
    plan = [no_duplicate_batches(pairs, batch_size, rng) for _ in range(epochs)]
    total = sum(len(batches) for batches in plan)
    loss_fn = MultipleNegativesRankingLoss(model)
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {
                "params": [p for n, p in named if not any(t in n for t in no_decay)],
                "weight_decay": 0.01,
            },
            {"params": [p for n, p in named if any(t in n for t in no_decay)], "weight_decay": 0.0},
        ],
        lr=learning_rate,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total))
    steps = rows = 0
    stopped: Literal["epochs", "time"] = "epochs"
    start = clock()
    progress: Any = None
    advance: Callable[[], None] = _nothing
    if show_progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("fine-tune"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TimeElapsedColumn(),
            transient=True,
        )
        task = progress.add_task("fine-tune", total=total)
        progress.start()
        advance = functools.partial(progress.update, task, advance=1)
    model.train()
    try:
        for batches in plan:
            for batch in batches:
                if max_seconds is not None and clock() - start >= max_seconds:
                    stopped = "time"
                    break
                if len(batch) < 2:  # a lone pair has no in-batch negative to learn from
                    continue
                anchors = [pairs[i][0] for i in batch]
                positives = [pairs[i][1] for i in batch]
                features = [model.preprocess(anchors), model.preprocess(positives)]
                loss = loss_fn(features, None)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), _MAX_GRAD_NORM)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                steps += 1
                rows += len(batch)
                advance()
            if stopped == "time":
                break
    finally:
        model.eval()
        if progress is not None:
            progress.stop()
    return steps, rows, clock() - start, stopped


def finetune(
    base_model_path: str | os.PathLike[str],
    pairs: Sequence[Pair],
    out_dir: str | os.PathLike[str],
    *,
    epochs: int = 1,
    max_seconds: float | None = 600,
    batch_size: int = 32,
    learning_rate: float = 2e-5,
    seed: int = 0,
    show_progress: bool = True,
    num_threads: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FinetuneResult:
    """Fine-tune a sentence-transformers model on (anchor, positive) pairs, on CPU, offline.

    MultipleNegativesRankingLoss with in-batch negatives (batches never hold two pairs of
    one entity, see :func:`no_duplicate_batches`), AdamW, 10% linear warmup then linear
    decay, seeded (the torch RNG is forked, the caller's state is left as it was).
    Training stops after ``epochs`` or once ``max_seconds`` have passed (checked before
    every step), whichever comes first, and the model is saved either way.

    A pair needs pairs of other entities beside it to learn from: a batch left with a
    single pair (the tail of an epoch where one entity has more pairs than the others can
    accompany) is skipped, so on a handful of entities use a small ``batch_size`` and a
    few ``epochs``.

    Args:
        base_model_path: A local sentence-transformers model directory (e.g.
            ``default_model_path()``, or an earlier fine-tune's output).
        pairs: ``(anchor, positive)`` texts, e.g. ``(query, entity name)``; see
            :func:`pairs_from_catalog` and :func:`pairs_from_labels`.
        out_dir: Where the tuned model and its manifest (``nem_llm_finetune.json``) go; an
            earlier fine-tune output there is replaced, any other non-empty directory is
            refused.
        epochs: Passes over the pairs (>= 1).
        max_seconds: Training time limit (None: no limit).
        batch_size: Pairs per step (>= 2); more in-batch negatives per step.
        learning_rate: AdamW peak learning rate.
        seed: Seeds batching, dropout and the loss.
        show_progress: Show a rich progress bar of the steps.
        num_threads: torch intra-op threads while training (None: leave torch's setting).
            On a shared, busy machine 1 thread can be several times faster than 2.
        clock: Monotonic seconds (injectable for tests).

    Returns:
        A :class:`FinetuneResult`; load the model with
        ``SentenceTransformerEmbedder(result.path)``.

    Raises:
        ConfigError: bad options, fewer than 2 distinct pairs, an ``out_dir`` that is not
            ours to overwrite, or a base model that cannot be loaded offline.
        InputError: a pair is not two non-blank strings (names ``pairs[i]``).
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ConfigError(f"epochs must be an int >= 1, got {epochs!r}")
    if max_seconds is not None and not (
        isinstance(max_seconds, int | float) and math.isfinite(max_seconds) and max_seconds > 0
    ):
        raise ConfigError(f"max_seconds must be a number > 0 or None, got {max_seconds!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 2:
        raise ConfigError(
            f"batch_size must be an int >= 2 (in-batch negatives), got {batch_size!r}"
        )
    if not (isinstance(learning_rate, int | float) and 0 < learning_rate < 1):
        raise ConfigError(f"learning_rate must be in (0, 1), got {learning_rate!r}")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ConfigError(f"num_threads must be an int >= 1 or None, got {num_threads!r}")
    clean = _validate_pairs(pairs)
    out = Path(out_dir)
    _prepare_out_dir(out)
    base = os.fspath(base_model_path)
    base_name = model_name_of(base)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = SentenceTransformer(base, device="cpu")
        except OSError as exc:
            raise ConfigError(f"cannot load base model {base!r} offline: {exc}") from exc
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            steps, rows, seconds, stopped = _train(
                model,
                clean,
                epochs=epochs,
                max_seconds=max_seconds,
                batch_size=batch_size,
                learning_rate=learning_rate,
                seed=seed,
                show_progress=show_progress,
                clock=clock,
            )
        finally:
            torch.set_num_threads(previous_threads)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save(str(tmp), create_model_card=False)
        fingerprint = weights_fingerprint(tmp)
        manifest = {
            "format": 1,
            "base_model": base_name,
            "pairs": len(clean),
            "epochs": epochs,
            "steps": steps,
            "seconds": round(seconds, 3),
            "stopped_by": stopped,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
            "fingerprint": fingerprint,
        }
        (tmp / TUNED_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return FinetuneResult(
        path=out,
        steps=steps,
        pairs=len(clean),
        seconds=seconds,
        pairs_per_second=rows / seconds if seconds > 0 else 0.0,
        stopped_by=stopped,
        fingerprint=fingerprint,
    )


# -- learned aliases (fit mode "aliases") ----------------------------------------------

FitMode = Literal["zero-shot", "aliases", "full"]
FIT_MODES: tuple[str, ...] = ("zero-shot", "aliases", "full")
#: mode=None: below this many labelled pairs with an id, "zero-shot"; from it, "aliases".
MIN_PAIRS_FOR_ALIASES = 20
#: mode=None: from this many labelled pairs with an id, "full" (minutes of CPU).
MIN_PAIRS_FOR_FULL = 5000


@dataclass(frozen=True)
class LearnedLabels:
    """What training learned from labels: surface forms per entity, mentions known novel."""

    aliases: Mapping[str, tuple[str, ...]]  # entity id -> learned mention texts
    novel: frozenset[str]  # folded mentions labelled "not in the catalog"

    def to_json(self) -> str:
        return json.dumps(
            {"aliases": {k: list(v) for k, v in sorted(self.aliases.items())},
             "novel": sorted(self.novel)},
            ensure_ascii=False,
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> LearnedLabels:
        data = json.loads(text)
        return cls(
            aliases={str(k): tuple(v) for k, v in data.get("aliases", {}).items()},
            novel=frozenset(data.get("novel", [])),
        )


def learn_labels(
    labels: Sequence[tuple[str, str | None]], catalog: Catalog, *, strict: bool = False
) -> tuple[LearnedLabels, list[str]]:
    """Learned surface forms from labelled ``(normalized query, id or None)`` pairs.

    Returns the learned labels and one problem line per skipped label (unknown id, a
    query labelled two ways); ``strict`` raises ``ConfigError`` on the first instead.
    """
    problems: list[str] = []
    aliases: dict[str, list[str]] = {}
    novel: set[str] = set()
    seen: dict[str, str | None] = {}
    for i, (query, gold) in enumerate(labels):
        key = fold(query)
        if key in seen and seen[key] != gold:
            msg = f"training_data[{i}]: {query!r} is labelled both {seen[key]!r} and {gold!r}"
            if strict:
                raise ConfigError(msg)
            problems.append(msg)
            continue
        seen[key] = gold
        if gold is None:
            novel.add(key)
            continue
        if gold not in catalog.by_id:
            msg = f"training_data[{i}]: unknown entity id {gold!r}"
            if strict:
                raise ConfigError(msg)
            problems.append(f"{msg} (skipped)")
            continue
        own = {fold(f) for f in catalog.entities[catalog.by_id[gold]].surface_forms()}
        forms = aliases.setdefault(gold, [])
        if key not in own and query not in forms:
            forms.append(query)
    # a mention labelled with an id somewhere and novel elsewhere is not "known novel"
    conflicted = {k for k, g in seen.items() if g is not None}
    return (
        LearnedLabels(
            {k: tuple(v) for k, v in aliases.items() if v}, frozenset(novel - conflicted)
        ),
        problems,
    )
