"""Fine-tuning the embedding model (the "full" fit mode) and loading the tuned model offline."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nem_llm._retrieval.embedding import (
    DEFAULT_MODEL_NAME,
    TUNED_MANIFEST,
    SentenceTransformerEmbedder,
    default_model_path,
    model_name_of,
)
from nem_llm._retrieval.index import HybridIndex
from nem_llm._retrieval.learning import (
    FinetuneResult,
    finetune,
    no_duplicate_batches,
    pairs_from_catalog,
    pairs_from_labels,
    weights_fingerprint,
)
from nem_llm.catalog import load_catalog
from nem_llm.errors import ConfigError, InputError

# endonym -> English name; the base model ranks "Greece" 5th of these 8 names for "Hellas"
PAIRS = [
    ("Suomi", "Finland"),
    ("Magyarország", "Hungary"),
    ("Sverige", "Sweden"),
    ("Nihon", "Japan"),
    ("Hellas", "Greece"),
    ("Shqipëria", "Albania"),
    ("Hrvatska", "Croatia"),
    ("Eesti", "Estonia"),
]
KNOWN = 4  # ("Hellas", "Greece")


def _rank_of_known(embedder: SentenceTransformerEmbedder) -> int:
    """Rank (1 = best) of the known pair's positive among all positives for its anchor."""
    anchors = embedder.encode([a for a, _ in PAIRS])
    positives = embedder.encode([p for _, p in PAIRS])
    scores = anchors[KNOWN] @ positives.T
    return int((scores > scores[KNOWN]).sum()) + 1


def _stepping_clock(step: float = 1.0) -> Callable[[], float]:
    """A fake monotonic clock that advances ``step`` seconds each time it is read."""
    ticks = itertools.count()
    return lambda: next(ticks) * step


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> FinetuneResult:
    out = tmp_path_factory.mktemp("tuned") / "model"
    return finetune(
        default_model_path(),
        PAIRS,
        out,
        epochs=5,
        batch_size=8,
        learning_rate=1e-4,
        seed=0,
        show_progress=False,
        num_threads=1,  # a shared 2-core machine: two spinning threads are much slower
    )


# ---------------------------------------------------------------------- training


def test_tiny_finetune_raises_a_known_pairs_rank(tuned: FinetuneResult) -> None:
    before = _rank_of_known(SentenceTransformerEmbedder())
    after = _rank_of_known(SentenceTransformerEmbedder(tuned.path))
    assert before > 1
    assert after == 1


def test_result_counts_steps_and_pairs(tuned: FinetuneResult) -> None:
    assert tuned.stopped_by == "epochs"
    assert tuned.steps == 5  # 8 pairs in one batch of 8, five epochs
    assert tuned.pairs == len(PAIRS)
    assert tuned.pairs_per_second > 0


def test_manifest_records_the_run_and_the_weights_fingerprint(tuned: FinetuneResult) -> None:
    manifest = json.loads((tuned.path / TUNED_MANIFEST).read_text(encoding="utf-8"))
    assert manifest["base_model"] == DEFAULT_MODEL_NAME
    assert (manifest["pairs"], manifest["steps"], manifest["seed"]) == (8, 5, 0)
    assert manifest["fingerprint"] == tuned.fingerprint == weights_fingerprint(tuned.path)


@pytest.mark.timeout(300)  # a fresh interpreter imports torch: slow on a busy machine
def test_tuned_model_reloads_offline_in_a_fresh_process(tuned: FinetuneResult) -> None:
    here = SentenceTransformerEmbedder(tuned.path).encode(["Hellas"])
    code = (
        "import sys, numpy as np\n"
        "from nem_llm._retrieval.embedding import SentenceTransformerEmbedder\n"
        "e = SentenceTransformerEmbedder(sys.argv[1])\n"
        "print(e.name)\n"
        "np.save(sys.argv[2], e.encode(['Hellas']))\n"
    )
    out = tuned.path.parent / "vec.npy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tuned.path), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        proc.stdout.strip().splitlines()[-1] == f"{DEFAULT_MODEL_NAME}+ft-{tuned.fingerprint[:16]}"
    )
    np.testing.assert_allclose(np.load(out), here, atol=1e-5)


def test_embedder_name_carries_the_fingerprint_and_survives_a_move(
    tuned: FinetuneResult, tmp_path: Path
) -> None:
    moved = tmp_path / "elsewhere"
    shutil.copytree(tuned.path, moved)
    name = SentenceTransformerEmbedder(tuned.path).name
    assert name == f"{DEFAULT_MODEL_NAME}+ft-{tuned.fingerprint[:16]}"
    assert SentenceTransformerEmbedder(moved).name == name


def test_an_index_built_with_the_base_model_is_refused_for_the_tuned_one(
    tuned: FinetuneResult, tmp_path: Path, countries: list[dict[str, Any]]
) -> None:
    catalog = load_catalog(countries)
    vectors = np.zeros((len(catalog.forms), 4), dtype=np.float32)
    HybridIndex(catalog, vectors, embedder_name=DEFAULT_MODEL_NAME).save(tmp_path / "index")
    with pytest.raises(ConfigError, match="built with embedder"):
        HybridIndex.load(
            tmp_path / "index", catalog, embedder_name=SentenceTransformerEmbedder(tuned.path).name
        )


def test_default_model_path_is_named_like_the_default() -> None:
    assert model_name_of(default_model_path()) == DEFAULT_MODEL_NAME
    assert SentenceTransformerEmbedder(default_model_path()).name == DEFAULT_MODEL_NAME


def test_a_broken_manifest_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / TUNED_MANIFEST).write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError, match="fine-tune manifest"):
        SentenceTransformerEmbedder(tmp_path)


def test_max_seconds_stops_training_and_still_saves(tmp_path: Path) -> None:
    pairs = [(f"query {i}", f"entity {i}") for i in range(40)]
    result = finetune(
        default_model_path(),
        pairs,
        tmp_path / "model",
        epochs=3,
        batch_size=4,  # 30 steps planned
        max_seconds=2.5,  # the clock below reads 0, 1, 2, 3: two steps fit
        show_progress=False,
        num_threads=1,
        clock=_stepping_clock(),
    )
    assert (result.stopped_by, result.steps) == ("time", 2)
    manifest = json.loads((tmp_path / "model" / TUNED_MANIFEST).read_text(encoding="utf-8"))
    assert (manifest["stopped_by"], manifest["steps"]) == ("time", 2)
    assert SentenceTransformerEmbedder(result.path).encode(["query 1"]).shape == (1, 384)


def test_same_seed_gives_the_same_weights(tmp_path: Path) -> None:
    def run(out: Path) -> str:
        return finetune(
            default_model_path(),
            PAIRS,
            out,
            batch_size=4,
            seed=7,
            show_progress=False,
            num_threads=1,
        ).fingerprint

    assert run(tmp_path / "a") == run(tmp_path / "b")


def test_an_earlier_output_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "model"
    kwargs: dict[str, Any] = {
        "batch_size": 4,
        "show_progress": False,
        "max_seconds": 1.5,
        "num_threads": 1,
    }
    finetune(default_model_path(), PAIRS, out, clock=_stepping_clock(), **kwargs)
    second = finetune(default_model_path(), PAIRS, out, seed=1, clock=_stepping_clock(), **kwargs)
    assert weights_fingerprint(out) == second.fingerprint
    assert not [p for p in tmp_path.iterdir() if p.name != "model"]  # no temp dir left


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize("pairs", [[], [("a", "b")], [("a", "b"), ("a", "b")]])
def test_fewer_than_two_distinct_pairs_is_a_config_error(
    tmp_path: Path, pairs: list[tuple[str, str]]
) -> None:
    with pytest.raises(ConfigError, match="at least 2 distinct pairs"):
        finetune(default_model_path(), pairs, tmp_path / "m", show_progress=False)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (("  ", "Greece"), r"pairs\[1\]: anchor must be a non-blank string"),
        (("Hellas", ""), r"pairs\[1\]: positive must be a non-blank string"),
        (("Hellas", None), r"pairs\[1\]: positive must be a non-blank string"),
        (("Hellas",), r"pairs\[1\]: expected an \(anchor, positive\) pair"),
    ],
)
def test_blank_or_malformed_pairs_name_the_pair(tmp_path: Path, bad: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        finetune(default_model_path(), [PAIRS[0], bad], tmp_path / "m", show_progress=False)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("epochs", 0),
        ("batch_size", 1),
        ("max_seconds", 0),
        ("max_seconds", float("nan")),
        ("learning_rate", 0.0),
        ("num_threads", 0),
    ],
)
def test_bad_options_are_config_errors(tmp_path: Path, option: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=option):
        finetune(default_model_path(), PAIRS, tmp_path / "m", **{option: value})


def test_a_foreign_non_empty_out_dir_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        finetune(default_model_path(), PAIRS, tmp_path, show_progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_base_model_that_cannot_load_offline_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load base model"):
        finetune(tmp_path / "no-such-model", PAIRS, tmp_path / "m", show_progress=False)


# ---------------------------------------------------------------------- pairs


def test_catalog_pairs_map_each_alias_to_its_name(countries: list[dict[str, Any]]) -> None:
    pairs = pairs_from_catalog(load_catalog(countries))
    assert ("Deutschland", "Germany") in pairs
    assert ("USA", "United States") in pairs
    assert len(pairs) == sum(len(c["aliases"]) for c in countries)


def test_label_pairs_give_the_name_and_every_alias(countries: list[dict[str, Any]]) -> None:
    catalog = load_catalog(countries)
    pairs = pairs_from_labels([("  Allemagne ", "DE"), ("Atlantis", None)], catalog)
    assert pairs == [("Allemagne", "Germany"), ("Allemagne", "Deutschland")]


def test_label_pairs_skip_identities_and_repeats(countries: list[dict[str, Any]]) -> None:
    catalog = load_catalog(countries)
    pairs = pairs_from_labels([("Germany", "DE"), ("Germany", "DE")], catalog, aliases=True)
    assert pairs == [("Germany", "Deutschland")]


def test_unknown_label_id_is_an_error_naming_the_label(countries: list[dict[str, Any]]) -> None:
    catalog = load_catalog(countries)
    with pytest.raises(InputError, match=r"labels\[1\]: unknown entity id 'XX'"):
        pairs_from_labels([("Allemagne", "DE"), ("Nowhere", "XX")], catalog)
    assert pairs_from_labels([("Nowhere", "XX")], catalog, strict=False) == []


def test_blank_label_query_is_an_error(countries: list[dict[str, Any]]) -> None:
    with pytest.raises(InputError, match=r"labels\[0\]: query must be a non-blank string"):
        pairs_from_labels([(" ", "DE")], load_catalog(countries))


def test_batches_never_hold_two_pairs_of_one_entity() -> None:
    pairs = [
        ("q1", "Germany"),
        ("q2", "Germany"),
        ("Deutschland", "Germany"),
        ("q3", "Deutschland"),
    ]
    pairs += [(f"x{i}", f"y{i}") for i in range(10)]
    batches = no_duplicate_batches(pairs, 4, random.Random(0))
    linked = {0, 1, 2, 3}  # one entity through shared texts
    assert sorted(i for b in batches for i in b) == list(range(len(pairs)))
    assert all(len(linked.intersection(b)) <= 1 for b in batches)
    assert all(len(b) <= 4 for b in batches)


def test_batches_are_reproducible_with_a_seed() -> None:
    pairs = [(f"x{i}", f"y{i}") for i in range(20)]
    first = no_duplicate_batches(pairs, 8, random.Random(3))
    assert first == no_duplicate_batches(pairs, 8, random.Random(3))
    assert first != no_duplicate_batches(pairs, 8, random.Random(4))


def test_training_with_the_progress_bar_on_completes(tmp_path: Path) -> None:
    result = finetune(
        default_model_path(),
        PAIRS,
        tmp_path / "model",
        batch_size=4,
        max_seconds=1.5,
        show_progress=True,
        num_threads=1,
        clock=_stepping_clock(),
    )
    assert (result.steps, result.stopped_by) == (1, "time")
