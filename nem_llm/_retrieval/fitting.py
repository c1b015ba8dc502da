"""The fitting stage: build (or load) the index, learn from labels, calibrate routing.

:class:`Fitter` runs one ``fit``: it builds or loads the index through the
:class:`~nem_llm._retrieval.retriever.Retriever`, learns mentions (and, in "full" mode,
fine-tunes the encoder) from a training share of the labels, and calibrates the routing
thresholds on the held-out labels or, without labels, on probes of the catalog. It
returns a new :class:`~nem_llm._retrieval.policy.RoutePolicy`; files it writes (learned
mentions, a tuned model, a label-free calibration) live in the index directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import pickle
import random
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .._text import fold, validate_query
from ..config import Thresholds
from ..errors import ConfigError
from ..models import Calibration, Candidate, RouteEstimate, Usage
from ..settings import MatcherSettings
from .calibration import (
    PROBE_NOVEL_SHARE,
    PROBE_VERSION,
    combine,
    estimate,
    exact_rule_from_catalog,
    labelled_examples,
    make_probes,
    merge_routes,
    probe_examples,
    stratified_sample,
    teacher_check,
    with_route_model,
)
from .embedding import TUNED_MANIFEST, default_model_path
from .encoders import encoder_of, make_embedder
from .fields_route import MIN_RECORDS, FieldRoute
from .index import HybridIndex, catalog_fingerprint
from .learning import (
    FIT_MODES,
    MIN_PAIRS_FOR_ALIASES,
    MIN_PAIRS_FOR_FULL,
    FinetuneResult,
    FitMode,
    LearnedLabels,
    finetune,
    learn_labels,
    pairs_from_catalog,
    pairs_from_labels,
)
from .policy import RoutePolicy
from .retriever import Retriever
from .route_model import RouteModel
from .routing import features, route
from .workload import novel_ceiling, workload_check

__all__ = ["FIT_OPTIONS", "LEARNED_FILE", "Fitter", "Targets", "Taught", "Teacher", "check_labels"]

log = logging.getLogger("nem_llm")

#: learned aliases and known-novel mentions, kept in the index directory
LEARNED_FILE = "learned.json"
#: a labelled fit's routes (and its routing model), kept in the index directory
POLICY_FILE = "routes.json"
ROUTE_MODEL_FILE = "route_model.pkl"
#: the keyword options ``fit`` takes besides labels, mode and targets
FIT_OPTIONS = frozenset(
    {"holdout", "strict", "max_seconds", "epochs", "learning_rate", "seed", "batch_size"}
)
# the workload sample: drawn from at most this many distinct queries, with this seed
_WORKLOAD_POOL = 20_000
_WORKLOAD_SEED = 0
# workload queries the label-free novel route is checked on (retrieved once at fit)
_CHECK_POOL = 2_000
T = TypeVar("T")


def _drawn(items: list[T], cap: int) -> list[T]:
    """``items``, or a seeded sample of ``cap`` of them when there are more."""
    return random.Random(_WORKLOAD_SEED).sample(items, cap) if len(items) > cap else items


# extra candidates retrieved per probe: its own entity may be among them (see calibration)
_PROBE_EXTRA = 1

Labels = Sequence[tuple[str, str | None]]


@dataclass(frozen=True)
class Taught:
    """What the teacher said of each sampled query: known (a decision came back) and the
    entity id or ``None`` (not in the catalog); what all of it cost."""

    known: list[bool]
    golds: list[str | None]
    usage: Usage


#: The teacher: sampled queries and the candidates production would show -> its answers.
Teacher = Callable[[list[str], list[list[Candidate]]], Awaitable[Taught]]


@dataclass(frozen=True)
class Targets:
    """The precision each auto route must be expected to reach before it opens."""

    matched: float
    novel: float


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def check_labels(training_data: Labels, max_chars: int) -> list[tuple[str, str | None]]:
    """Validated, normalized labels (a clear ConfigError/QueryError naming the item)."""
    out: list[tuple[str, str | None]] = []
    for i, pair in enumerate(training_data):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ConfigError(f"training_data[{i}] must be a (query, gold_id) pair")
        query, gold = pair
        if gold is not None and not isinstance(gold, str):
            raise ConfigError(f"training_data[{i}]: gold id must be a str or None")
        out.append((validate_query(query, index=i, max_chars=max_chars), gold))
    return out


class Fitter:
    """Runs ``fit``: index, learning and calibration; keeps what must survive a restart.

    Args:
        settings: the matcher's settings (thresholds set there are kept as given).
        retriever: the retrieval stage (its embedder may be replaced by a tuned one).
        own_embedder: the embedder is the default model (so "full" may fine-tune it).
    """

    def __init__(self, settings: MatcherSettings, retriever: Retriever, *, own_embedder: bool):
        self.settings = settings
        self.retriever = retriever
        self.own_embedder = own_embedder
        self.index_dir = settings.index_dir
        self.learned: LearnedLabels | None = None
        self.last_finetune: FinetuneResult | None = None
        #: the fit mode the last fit used, and why (``fit(mode=None)`` measures)
        self.mode_choice = ""
        self._tmp_model_dir: Path | None = None

    def initial_thresholds(self) -> Thresholds:
        """The thresholds before any fit: the user's, else the defaults."""
        s, defaults = self.settings, Thresholds()
        thresholds = Thresholds(
            accept=defaults.accept if s.accept_threshold is None else s.accept_threshold,
            margin=defaults.margin if s.margin is None else s.margin,
            novel=defaults.novel if s.novel_threshold is None else s.novel_threshold,
        )
        if s.accept_threshold is not None and s.accept_threshold > 1:
            # an audit: every non-novel query goes to the LLM, exact hits included
            thresholds = dataclasses.replace(thresholds, exact=False)
        return thresholds

    def _user_set(self) -> set[str]:
        user = set(self.settings.thresholds_set)
        if self.settings.accept_threshold is not None and self.settings.accept_threshold > 1:
            user.add("exact")
        return user

    async def fit_async(
        self,
        labels: list[tuple[str, str | None]],
        mode: FitMode | None,
        targets: Targets,
        *,
        show_progress: bool,
        options: dict[str, Any],
        workload: Sequence[str] = (),
        records: Sequence[tuple[str, Mapping[str, Any]]] = (),
        label_budget: int = 0,
        teacher: Teacher | None = None,
    ) -> RoutePolicy:
        """One fit; returns the routing policy it leaves behind.

        ``workload`` (normalized queries of the job), ``label_budget`` and ``teacher`` (the
        production LLM call): a stratified sample of the workload is labelled by the LLM
        and calibrates the routes on the user's own mentions (see :meth:`_teach_async`).
        """
        unknown = set(options) - FIT_OPTIONS
        if unknown:
            raise ConfigError(f"fit: unknown option(s) {', '.join(sorted(unknown))}")
        if mode is not None and mode not in FIT_MODES:
            raise ConfigError(f"mode must be one of {', '.join(FIT_MODES)} or None, got {mode!r}")
        calibrate_on: Sequence[tuple[str, str | None]] = labels
        if mode is None and labels:
            chosen, trained, why = await self._measure_modes_async(labels, show_progress, options)
        else:
            chosen, trained = mode or "zero-shot", None
            why = "chosen by the caller" if mode else "no labels"
        if trained is not None:
            calibrate_on = trained
        elif chosen != "zero-shot" and labels:
            calibrate_on = await self._train(labels, chosen, show_progress, options)
        self.mode_choice = f"{chosen}: {why}"
        loop = asyncio.get_running_loop()
        if self.retriever.index is None:
            self.retriever.index = await loop.run_in_executor(self.retriever.executor, self._build)
        calibration = None
        model = None
        if calibrate_on:
            found = await self._calibrate_on_labels(calibrate_on, targets)
            if found is not None:
                calibration, model = found
        if calibration is None and {"accept", "margin", "novel"} <= self._user_set():
            calibration = self._user_calibration(targets)
        if calibration is None:
            calibration = await self._calibrate_on_probes(targets)
            if workload:
                calibration = await self._check_on_workload(calibration, workload)
        fields = await self._fit_fields_async(records, targets)
        taught = workload and label_budget > 0 and teacher is not None
        if taught and calibration.source != "user":
            assert teacher is not None
            calibration, model = await self._teach_async(
                calibration, calibrate_on, workload, label_budget, teacher, targets
            )
        elif not calibrate_on and (saved := self._saved_policy(targets)) is not None:
            # fit without labels or workload over an index a labelled fit saved (a Ray
            # actor, a restart): that fit's routes, not a label-free estimate
            calibration, model, saved_fields = saved
            fields = fields or saved_fields
        calibration = calibration.model_copy(update={"fit_mode": self.mode_choice})
        if calibrate_on or taught or fields is not None:
            self._save_policy(targets, calibration, model, fields)
        return dataclasses.replace(self._adopt(calibration, model, targets), fields=fields)

    async def _check_on_workload(
        self, calibration: Calibration, workload: Sequence[str]
    ) -> Calibration:
        """The probes' novel route against the workload's own queries (a seeded sample):
        closed when clearly more of them fall below its cut than the probes allow
        (:func:`~nem_llm._retrieval.workload.workload_check`)."""
        if novel_ceiling(calibration) is None:
            return calibration
        pool = _drawn(list(dict.fromkeys(workload)), _CHECK_POOL)
        found = await self.retriever.retrieve_many_async(pool, max(self.settings.top_k, 2))
        thresholds = Thresholds.from_calibration(calibration)
        below = sum(
            route(c, thresholds, query=q).kind == "novel"
            for q, c in zip(pool, found, strict=True)
            if c
        )
        return workload_check(calibration, below, len(pool))

    async def _fit_fields_async(
        self, records: Sequence[tuple[str, Mapping[str, Any]]], targets: Targets
    ) -> FieldRoute | None:
        """The field model of record queries, fit on their candidates (``None`` when there
        are too few, or no field the catalog shares)."""
        if len(records) < MIN_RECORDS:
            return None
        pool = _drawn(list(records), _WORKLOAD_POOL)
        k = max(self.settings.top_k, 2)
        found = await self.retriever.retrieve_many_async([q for q, _ in pool], k)
        loop = asyncio.get_running_loop()
        catalog = self.retriever.catalog
        return await loop.run_in_executor(
            self.retriever.executor,
            lambda: FieldRoute.fit(
                catalog,
                [a for _, a in pool],
                found,
                target=targets.matched,
                novel_target=targets.novel,
            ),
        )

    def _policy_key(self, targets: Targets) -> str:
        """What a labelled fit's routes depend on: the catalog, encoder and settings."""
        parts = [self._probe_key(targets), self.settings.fingerprint()]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def _save_policy(
        self,
        targets: Targets,
        calibration: Calibration,
        model: RouteModel | None,
        fields: FieldRoute | None = None,
    ) -> None:
        """Keep a labelled fit's routes (and routing model) beside the index."""
        if self.index_dir is None:
            return
        self.index_dir.mkdir(parents=True, exist_ok=True)
        payload = {"key": self._policy_key(targets), "calibration": calibration.model_dump()}
        _atomic_write(self.index_dir / POLICY_FILE, json.dumps(payload, indent=2).encode())
        model_file = self.index_dir / ROUTE_MODEL_FILE
        if model is None and fields is None:
            model_file.unlink(missing_ok=True)
        else:
            _atomic_write(model_file, pickle.dumps({"model": model, "fields": fields}))

    def _saved_policy(
        self, targets: Targets
    ) -> tuple[Calibration, RouteModel | None, FieldRoute | None] | None:
        """The routes a labelled fit saved for this catalog and these settings, if any."""
        if self.index_dir is None or not (self.index_dir / POLICY_FILE).exists():
            return None
        try:
            data = json.loads((self.index_dir / POLICY_FILE).read_text(encoding="utf-8"))
            if data.get("key") != self._policy_key(targets):
                return None
            calibration = Calibration.model_validate(data["calibration"])
            model_file = self.index_dir / ROUTE_MODEL_FILE
            saved = pickle.loads(model_file.read_bytes()) if model_file.exists() else {}
        except (OSError, ValueError, KeyError, pickle.UnpicklingError) as exc:
            log.warning("nem_llm: the saved routes in %s are unreadable (%s)", self.index_dir, exc)
            return None
        return calibration, saved.get("model"), saved.get("fields")

    async def _teach_async(
        self,
        base: Calibration,
        labels: Sequence[tuple[str, str | None]],
        workload: Sequence[str],
        budget: int,
        teacher: Teacher,
        targets: Targets,
    ) -> tuple[Calibration, RouteModel | None]:
        """Calibrate on the workload with the LLM as the teacher.

        A stratified sample of ``budget`` workload queries (:func:`stratified_sample`,
        drawn from at most ``_WORKLOAD_POOL`` of them) is adjudicated by ``teacher`` (the
        production call and prompt; its answers land in the decision cache, so the job
        never pays for them twice). The answers are labels: a route they prove at the
        Wilson bound opens on them; a route of ``base`` (probes, labels) stays open unless
        they show it worse than its target (:func:`teacher_check`); with enough of them,
        the routing model is fit on them (and any labels given). ``labelled`` and
        ``label_usage`` in the calibration say how many were labelled and what it cost.
        """
        pool = _drawn(list(dict.fromkeys(workload)), _WORKLOAD_POOL)
        k = max(self.settings.top_k, 2)
        found = await self.retriever.retrieve_many_async(pool, k)
        feats = [features(q, c, detail=False) for q, c in zip(pool, found, strict=True)]
        picked = stratified_sample(feats, budget, seed=_WORKLOAD_SEED)
        queries = [pool[i] for i, _ in picked]
        shown = [found[i][: self.settings.top_k] for i, _ in picked]
        taught = await teacher(queries, shown)
        kept = [j for j, known in enumerate(taught.known) if known]
        examples = labelled_examples(
            [found[picked[j][0]] for j in kept],
            [queries[j] for j in kept],
            [taught.golds[j] for j in kept],
            [picked[j][1] for j in kept],
        )
        info = {"labelled": len(examples), "label_usage": taught.usage}
        if not examples:
            return base.model_copy(update=info), None
        own = estimate(
            examples, matched_target=targets.matched, novel_target=targets.novel, source="workload"
        )
        cal = merge_routes(own, teacher_check(base, examples)).model_copy(update=info)
        if labels:  # labels given to fit count too (weight 1, as the sample's mean)
            given = await self.retriever.retrieve_many_async([q for q, _ in labels], k)
            examples += labelled_examples(given, [q for q, _ in labels], [g for _, g in labels])
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.retriever.executor, lambda: with_route_model(cal, examples)
        )

    def _adopt(
        self, calibration: Calibration, model: RouteModel | None, targets: Targets
    ) -> RoutePolicy:
        """A calibration's thresholds, keeping the ones the user set (unless labels)."""
        chosen = Thresholds.from_calibration(calibration)
        user = self._user_set()
        if calibration.source == "probes" and user:
            current = self.initial_thresholds()
            chosen = dataclasses.replace(chosen, **{k: getattr(current, k) for k in user})
            update: dict[str, Any] = {"thresholds": chosen.as_dict()}
            why = "set by the user (not estimated)"
            if "accept" in user:
                update["matched"] = RouteEstimate(
                    open=chosen.accept <= 1 or chosen.exact,
                    target=targets.matched,
                    reason=f"accept threshold {why}",
                )
            if "novel" in user:
                update["novel"] = RouteEstimate(
                    open=chosen.novel > 0, target=targets.novel, reason=f"novel threshold {why}"
                )
            calibration = calibration.model_copy(update=update)
        for name, est in (("auto-match", calibration.matched), ("auto-novel", calibration.novel)):
            if not est.open:
                log.info("nem_llm: the %s route is closed: %s", name, est.reason)
        s = self.settings
        user_closed = frozenset(
            name
            for name, closed in (
                ("matched", s.accept_threshold is not None and s.accept_threshold > 1),
                ("novel", s.novel_threshold is not None and s.novel_threshold <= 0),
            )
            if closed
        )
        policy = RoutePolicy(
            thresholds=chosen, calibration=calibration, model=model, user_closed=user_closed
        )
        return policy.with_learned(self.learned)

    def _user_calibration(self, targets: Targets) -> Calibration:
        t = self.initial_thresholds()
        why = "thresholds set by the user (not estimated)"
        return Calibration(
            source="user",
            thresholds=t.as_dict(),
            exact=t.exact,
            matched=RouteEstimate(
                open=t.accept <= 1 or t.exact, target=targets.matched, reason=why
            ),
            novel=RouteEstimate(open=t.novel > 0, target=targets.novel, reason=why),
        )

    # -- the index and what is saved beside it -------------------------------------------

    def _build(self) -> HybridIndex:
        self.restore_learned()
        if self.index_dir is not None and (self.index_dir / "manifest.json").exists():
            self._adopt_saved_encoder(self.index_dir)
        return self.retriever.build(self.index_dir)

    def _tuned_encoder(self) -> str:
        """The encoder a tuned model runs on: the one in use (static is re-distilled)."""
        if self.settings.encoder == "auto":
            return encoder_of(self.retriever.embedder.name)
        return self.settings.encoder

    def _adopt_saved_encoder(self, path: Path) -> None:
        """With ``encoder="auto"``, encode as the saved index's vectors were encoded.

        Vectors from two encoders must never be mixed; an index built (say) with
        ``"onnx-int8"`` is loaded with that encoder when it is installed, and refused by
        ``HybridIndex.load`` otherwise (an explicit ``encoder=`` is never overridden).
        """
        if not self.own_embedder or self.settings.encoder != "auto":
            return
        current = self.retriever.embedder.name
        saved = str(HybridIndex.read_manifest(path).get("embedder", ""))
        if not saved or saved == current:
            return
        base = current.rpartition("@")[0] or current
        if (saved.rpartition("@")[0] or saved) != base:
            return  # another model altogether: HybridIndex.load says so
        try:
            adopted = make_embedder(encoder_of(saved), self._tuned_model_ref())
        except ConfigError as exc:
            log.warning("nem_llm: the index at %s was built with %s: %s", path, saved, exc)
            return
        if adopted.name == saved:
            self.retriever.embedder = adopted

    def _tuned_model_ref(self) -> Path | None:
        tuned = self.index_dir / "model" if self.index_dir is not None else None
        return tuned if tuned is not None and (tuned / TUNED_MANIFEST).exists() else None

    def _model_dir(self) -> Path:
        if self.index_dir is not None:
            return self.index_dir / "model"
        if self._tmp_model_dir is None:
            self._tmp_model_dir = Path(tempfile.mkdtemp(prefix="nem-llm-model-"))
        return self._tmp_model_dir / "model"

    def learn(self, learned: LearnedLabels) -> None:
        """Adopt learned mentions: an exact lookup consulted before routing (saved).

        Learned mentions are not added to the index as surface forms: measured on
        languages, indexing them (labels of one half, 11,586) lowered R@10 on the other
        half from 0.742 to 0.654, because foreign-language mentions of many entities crowd
        each other's candidates. As a lookup they match repeats and touch nothing else.
        """
        self.learned = learned
        if self.index_dir is not None:
            self.index_dir.mkdir(parents=True, exist_ok=True)
            target = self.index_dir / LEARNED_FILE
            tmp = target.with_suffix(".tmp")
            tmp.write_text(learned.to_json(), encoding="utf-8")
            tmp.replace(target)

    def restore_learned(self) -> None:
        """Reload learned aliases and a tuned model saved with the index (a restart)."""
        if self.index_dir is None or self.learned is not None:
            return
        saved = self.index_dir / LEARNED_FILE
        if saved.exists():
            self.learn(LearnedLabels.from_json(saved.read_text(encoding="utf-8")))
        tuned = self.index_dir / "model"
        if self.own_embedder and (tuned / TUNED_MANIFEST).exists():
            self.retriever.embedder = make_embedder(self._tuned_encoder(), tuned)

    def close(self) -> None:
        """Remove a tuned model fit made without an index directory."""
        if self._tmp_model_dir is not None:
            shutil.rmtree(self._tmp_model_dir, ignore_errors=True)

    # -- learning ------------------------------------------------------------------------

    def _split(
        self, labels: list[tuple[str, str | None]], options: dict[str, Any]
    ) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
        """(held out, training) shares of the labels: seeded, as ``_train`` splits them."""
        holdout = float(options.get("holdout", 0.3))
        if not 0.0 <= holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
        order = list(range(len(labels)))
        random.Random(int(options.get("seed", 0))).shuffle(order)
        cut = int(len(order) * holdout)
        return [labels[i] for i in sorted(order[:cut])], [labels[i] for i in sorted(order[cut:])]

    async def _measure_modes_async(
        self, labels: list[tuple[str, str | None]], show_progress: bool, options: dict[str, Any]
    ) -> tuple[FitMode, list[tuple[str, str | None]] | None, str]:
        """``fit(mode=None)``: the mode whose recall@top_k on the held-out labels is highest.

        Zero-shot and aliases are always measured (one retrieval of the held-out queries);
        full too from ``MIN_PAIRS_FOR_FULL`` labelled pairs with the default model (it
        fine-tunes on the training share and encodes the catalog again: measured, it is
        kept only if it wins). Ties go to the cheaper mode. Returns (mode, the held-out
        labels when full was trained and kept, else ``None``, why).
        """
        with_id = sum(1 for _, g in labels if g is not None)
        if with_id < MIN_PAIRS_FOR_ALIASES:
            return "zero-shot", None, (
                f"{with_id} labelled pairs with an id: too few to measure "
                f"(need {MIN_PAIRS_FOR_ALIASES})"
            )  # fmt: skip
        held, train = self._split(labels, options)
        probe = [(q, g) for q, g in held if g is not None]
        if not probe:
            return "aliases", None, "no held-out label with an id: aliases by default"
        loop = asyncio.get_running_loop()
        if self.retriever.index is None:
            self.retriever.index = await loop.run_in_executor(self.retriever.executor, self._build)
        k = self.settings.top_k
        catalog = self.retriever.catalog
        learned, _ = learn_labels(train, catalog, strict=False)
        lookup = {fold(q): e for e, qs in learned.aliases.items() for q in qs}

        async def recall(known: Mapping[str, str]) -> float:
            found = await self.retriever.retrieve_many_async([q for q, _ in probe], k)
            hits = sum(
                known.get(fold(q)) == g or g in {c.entity_id for c in cands}
                for (q, g), cands in zip(probe, found, strict=True)
            )
            return hits / len(probe)

        scores: dict[FitMode, float] = {"zero-shot": await recall({}), "aliases": 0.0}
        scores["aliases"] = await recall(lookup)
        trained = None
        if with_id >= MIN_PAIRS_FOR_FULL and self.own_embedder:
            before = (self.retriever.embedder, self.retriever.index, self.learned)
            trained = await self._train(labels, "full", show_progress, options)
            tuned = await loop.run_in_executor(
                self.retriever.executor, lambda: self.retriever.build(None)
            )
            self.retriever.index = tuned
            scores["full"] = await recall(lookup)
            if scores["full"] > max(scores["zero-shot"], scores["aliases"]):
                if (index_dir := self.index_dir) is not None:
                    await loop.run_in_executor(
                        self.retriever.executor, lambda: tuned.save(index_dir)
                    )
            else:  # not worth it: back to the default model and its index
                self.retriever.embedder, self.retriever.index, self.learned = before
                self.last_finetune = None
                trained = None
        best = max(scores, key=lambda m: (scores[m], -FIT_MODES.index(m)))
        if best == "zero-shot" and self.index_dir is not None:
            (self.index_dir / LEARNED_FILE).unlink(missing_ok=True)
        measured = ", ".join(f"{m} {r:.3f}" for m, r in scores.items())
        why = f"recall@{k} on {len(probe)} held-out labels: {measured}"
        log.info("nem_llm: fit mode %s (%s)", best, why)
        return best, trained if best == "full" else None, why

    async def _train(
        self,
        labels: list[tuple[str, str | None]],
        mode: FitMode,
        show_progress: bool,
        options: dict[str, Any],
    ) -> list[tuple[str, str | None]]:
        """Learn from a training share of the labels; return the held-out share."""
        held, train = self._split(labels, options)
        catalog = self.retriever.catalog
        learned, problems = learn_labels(train, catalog, strict=bool(options.get("strict")))
        for problem in problems[:20]:
            log.warning("nem_llm: %s", problem)
        if len(problems) > 20:
            log.warning("nem_llm: ... and %d more label problems", len(problems) - 20)
        if mode == "full":
            if self.own_embedder:
                pairs = pairs_from_catalog(catalog) + pairs_from_labels(
                    train, catalog, strict=False
                )
                out = self._model_dir()
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(
                    self.retriever.executor,
                    lambda: finetune(
                        default_model_path(),
                        pairs,
                        out,
                        epochs=int(options.get("epochs", 1)),
                        max_seconds=options.get("max_seconds", 600),
                        learning_rate=float(options.get("learning_rate", 1e-4)),
                        batch_size=int(options.get("batch_size", 32)),
                        seed=int(options.get("seed", 0)),
                        show_progress=show_progress,
                    ),
                )
                self.retriever.embedder = make_embedder(self._tuned_encoder(), result.path)
                self.last_finetune = result
            else:
                log.warning("nem_llm: mode 'full' fine-tunes the default model only; "
                            "a custom embedder is kept (learning aliases)")  # fmt: skip
        self.learn(learned)
        return held

    # -- calibration ---------------------------------------------------------------------

    async def _calibrate_on_labels(
        self, labels: Sequence[tuple[str, str | None]], targets: Targets
    ) -> tuple[Calibration, RouteModel | None] | None:
        queries = [q for q, _ in labels]
        golds = [g for _, g in labels]
        found = await self.retriever.retrieve_many_async(queries, max(self.settings.top_k, 2))
        examples = labelled_examples(found, queries, golds)
        cal = estimate(
            examples, matched_target=targets.matched, novel_target=targets.novel, source="labels"
        )
        if cal.examples < 20:
            log.info("nem_llm: %d labels are too few to calibrate on; using probes", cal.examples)
            return None
        if not (cal.matched.open and cal.novel.open):
            # a route the labels cannot open: the probes' rule, unless the labels say no
            cal = combine(cal, await self._calibrate_on_probes(targets), examples)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.retriever.executor, lambda: with_route_model(cal, examples)
        )

    def _probe_key(self, targets: Targets) -> str:
        """What a label-free calibration depends on: reused from the index dir if equal."""
        parts = [
            catalog_fingerprint(self.retriever.catalog),
            self.retriever.embedder.name,
            self.settings.lexical_weight,
            self.settings.top_k,
            targets.matched,
            targets.novel,
            PROBE_VERSION,
        ]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    async def _calibrate_on_probes(self, targets: Targets) -> Calibration:
        saved = self.index_dir / "calibration.json" if self.index_dir is not None else None
        key = self._probe_key(targets)
        if saved is not None and saved.exists():
            try:
                data = json.loads(saved.read_text(encoding="utf-8"))
                if data.get("key") == key:
                    return Calibration.model_validate(data["calibration"])
            except (OSError, ValueError, KeyError):
                pass  # unreadable: estimate again and overwrite it
        cal = await self._probe(targets)
        if saved is not None:
            payload = {"key": key, "calibration": cal.model_dump()}
            tmp = saved.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
            tmp.replace(saved)
        return cal

    async def _probe(self, targets: Targets) -> Calibration:
        catalog = self.retriever.catalog
        probes = make_probes(catalog)
        found = await self.retriever.retrieve_many_async(
            [p.text for p in probes], max(self.settings.top_k, 2) + _PROBE_EXTRA
        )
        return estimate(
            probe_examples(probes, found, catalog),
            matched_target=targets.matched,
            novel_target=targets.novel,
            source="probes",
            novel_share=PROBE_NOVEL_SHARE,
            exact_rule=exact_rule_from_catalog(catalog),
        )
