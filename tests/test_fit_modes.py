"""fit modes: learned aliases (and known-novel mentions), persisted with the index; the
mode=None rule; bad labels; a tiny real fine-tune that reloads after a restart."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from nem_llm.errors import ConfigError
from nem_llm.matcher import Matcher
from nem_llm.testing import FakeEmbedder

ENTITIES: list[dict[str, Any]] = [
    {"id": f"E{i}", "name": name}
    for i, name in enumerate(
        ["Germany", "Greece", "France", "Austria", "Spain", "Italy", "Poland", "Norway"]
    )
]
LABELS: list[tuple[str, str | None]] = [
    ("Bundesrepublik", "E0"),
    ("Hellas", "E1"),
    ("Hexagone", "E2"),
    ("Atlantis", None),
]


async def test_aliases_mode_matches_a_repeated_mention_without_the_llm() -> None:
    async with Matcher(ENTITIES, embedder=FakeEmbedder(), llm=False) as m:
        await m.fit_async(LABELS, mode="aliases", holdout=0.0)
        hellas, atlantis = await m.match_async(["Hellas", "Atlantis"])
    assert (hellas.status, hellas.entity_id, hellas.decided_by) == ("matched", "E1", "embedding")
    assert "a labelled example says this mention is 'E1'" == hellas.reason
    assert (atlantis.status, atlantis.decided_by) == ("novel", "embedding")
    assert "not in the catalog" in atlantis.reason


async def test_learned_aliases_reload_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "idx"
    async with Matcher(ENTITIES, embedder=FakeEmbedder(), llm=False, index_dir=path) as m:
        await m.fit_async(LABELS, mode="aliases", holdout=0.0)
    assert (path / "learned.json").exists()
    async with Matcher(ENTITIES, embedder=FakeEmbedder(), llm=False, index_dir=path) as again:
        await again.fit_async()  # no labels: what was learned comes back from the index dir
        hellas = await again.match_async("Hellas")
        atlantis = await again.match_async("Atlantis")
    assert (hellas.status, hellas.entity_id) == ("matched", "E1")
    assert atlantis.status == "novel"


async def test_labels_naming_an_unknown_id_are_reported_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    labels = [*LABELS, ("Lusitania", "NOPE")]
    async with Matcher(ENTITIES, embedder=FakeEmbedder(), llm=False) as m:
        with caplog.at_level(logging.WARNING, logger="nem_llm"):
            await m.fit_async(labels, mode="aliases", holdout=0.0)
        assert any("unknown entity id 'NOPE'" in r.message for r in caplog.records)
        assert m.learned is not None and "NOPE" not in m.learned.aliases
        with pytest.raises(ConfigError, match=r"training_data\[4\]: unknown entity id"):
            await m.fit_async(labels, mode="aliases", holdout=0.0, strict=True)


async def test_fit_rejects_an_unknown_mode_or_option() -> None:
    async with Matcher(ENTITIES, embedder=FakeEmbedder(), llm=False) as m:
        with pytest.raises(ConfigError, match="mode must be one of"):
            await m.fit_async(LABELS, mode="head-only")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="unknown option"):
            await m.fit_async(LABELS, learning_rat=0.1)


async def test_mode_none_is_zero_shot_with_too_few_labels_to_measure() -> None:
    async with Matcher(ENTITIES, embedder=FakeEmbedder(), llm=False) as m:
        await m.fit_async([("Hellas", "E1")] * 19, show_progress=False)
        assert m.calibration is not None
        assert m.calibration.fit_mode.startswith("zero-shot: 19 labelled pairs")


async def test_mode_none_chooses_aliases_when_they_lift_held_out_recall() -> None:
    # mentions retrieval cannot place (other words altogether), repeated across the split:
    # learned as aliases they are found, zero-shot they are not
    words = ["Bundesrepublik", "Hellas", "Hexagone", "Alpenrepublik", "Iberia", "Stiefel"]
    labels = [(w, f"E{i}") for i, w in enumerate(words) for _ in range(8)]
    async with Matcher(ENTITIES, embedder=FakeEmbedder(), llm=False, top_k=1) as m:
        await m.fit_async(labels, show_progress=False)
        assert m.calibration is not None
        mode = m.calibration.fit_mode
    assert mode.startswith("aliases: recall@1 on")
    zero, aliases = (float(part.split()[-1]) for part in mode.split(": ", 2)[2].split(", "))
    assert aliases > zero


async def test_mode_none_keeps_the_cheaper_mode_on_a_tie() -> None:
    # the catalog's own names: zero-shot already finds every one; learning adds nothing
    labels = [(e["name"], e["id"]) for e in ENTITIES] * 4
    async with Matcher(ENTITIES, embedder=FakeEmbedder(), llm=False) as m:
        await m.fit_async(labels, show_progress=False)
        assert m.calibration is not None
        assert m.calibration.fit_mode.startswith("zero-shot: recall@5")
        assert m.learned is None


async def test_holdout_labels_calibrate_and_training_labels_teach() -> None:
    many = [(f"Hellas {i}", "E1") for i in range(40)] + [(f"Nowhere {i}", None) for i in range(40)]
    async with Matcher(ENTITIES, embedder=FakeEmbedder(), llm=False) as m:
        await m.fit_async(many, mode="aliases", holdout=0.5)
        assert m.learned is not None
        learned = len(m.learned.aliases.get("E1", ())) + len(m.learned.novel)
        assert learned == 40  # half trained...
        cal = m.calibration  # ...and the other half calibrated (probes fill what 40 cannot)
        assert cal is not None and cal.source.startswith("labels") and cal.examples >= 40


@pytest.mark.slow
async def test_full_mode_fine_tunes_and_the_tuned_model_reloads_offline(tmp_path: Path) -> None:
    path = tmp_path / "idx"
    labels = [("Hellas", "E1"), ("Ellada", "E1"), ("Deutschland", "E0"), ("Allemagne", "E0")]
    labels = labels * 6  # 24 pairs with an id
    async with Matcher(ENTITIES, llm=False, index_dir=path) as m:
        await m.fit_async(
            labels, mode="full", holdout=0.0, max_seconds=5, show_progress=False, batch_size=4
        )
        tuned_name = m.embedder.name
        assert "+ft-" in tuned_name and m.last_finetune is not None
    async with Matcher(ENTITIES, llm=False, index_dir=path) as again:
        await again.fit_async()
        assert again.embedder.name == tuned_name  # the tuned model, loaded from the index dir
        hellas = await again.match_async("Hellas")
    assert hellas.entity_id == "E1"
