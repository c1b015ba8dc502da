"""Fast encoders: ONNX output equals torch's, exports are cached, vectors are never mixed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_index_build import _cli  # the CLI in a subprocess, OPENAI_* unset

from nem_llm import Matcher
from nem_llm._jobs.index_build import build_index
from nem_llm._retrieval import encoders
from nem_llm._retrieval.embedding import SentenceTransformerEmbedder
from nem_llm._retrieval.encoders import (
    OnnxEmbedder,
    encoder_of,
    export_onnx,
    make_embedder,
    model_fingerprint,
)
from nem_llm._retrieval.index import HybridIndex
from nem_llm.catalog import load_catalog
from nem_llm.errors import ConfigError
from nem_llm.testing import FakeEmbedder

pytest.importorskip("onnxruntime", reason="the [fast] extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
RESTAURANTS = ROOT / "tests" / "data" / "restaurants_catalog.jsonl"
CLI_CATALOG = ROOT / "tests" / "data" / "cli" / "catalog.jsonl"  # 25 countries
QUERIES = ROOT / "tests" / "data" / "restaurants_queries.jsonl"
MENTIONS = ROOT / "tests" / "data" / "cli" / "mentions.csv"  # 17 rows


def _strings() -> list[str]:
    """A few hundred texts: names and their variants, long records, queries, other scripts,
    padding, an empty one and one beyond the model's 256 tokens."""
    texts: list[str] = []
    for path, key in ((RESTAURANTS, "name"), (CLI_CATALOG, "name"), (QUERIES, "query")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                name = str(row[key])
                texts += [name, name.lower(), name.upper(), name[:-1] + name[-1:] * 2]
                texts += [str(a) for a in row.get("aliases") or []]
                if row.get("description"):
                    texts.append(f"{name}, {row['description']}")
    texts += ["Ελλάδα", "Москва", "日本", "  padded with spaces  ", "", "tall " * 600]
    return texts


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the module (NEM_LLM_CACHE layout: <root>/encoders)."""
    return tmp_path_factory.mktemp("nem-cache")


@pytest.fixture
def use_cache(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NEM_LLM_CACHE", str(cache_root))
    return cache_root / "encoders"


@pytest.fixture(scope="module")
def torch_vectors() -> np.ndarray:
    return SentenceTransformerEmbedder().encode(_strings())


def test_onnx_vectors_match_torch(cache_root: Path, torch_vectors: np.ndarray) -> None:
    onnx = OnnxEmbedder(cache_dir=cache_root / "encoders").encode(_strings())
    cosine = (onnx * torch_vectors).sum(axis=1)
    assert onnx.shape == torch_vectors.shape
    assert cosine.min() >= 0.999


def test_onnx_int8_vectors_stay_close_to_torch(cache_root: Path, torch_vectors: np.ndarray) -> None:
    int8 = OnnxEmbedder(quantize=True, cache_dir=cache_root / "encoders").encode(_strings())
    cosine = (int8 * torch_vectors).sum(axis=1)
    assert cosine.mean() >= 0.98
    assert np.allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-4)


def test_onnx_encodes_an_empty_batch_as_zero_rows(cache_root: Path) -> None:
    assert OnnxEmbedder(cache_dir=cache_root / "encoders").encode([]).shape == (0, 384)


def test_export_is_cached_and_reused(tmp_path: Path) -> None:
    first = OnnxEmbedder(cache_dir=tmp_path)
    first.encode(["warm"])
    second = OnnxEmbedder(cache_dir=tmp_path)
    second.encode(["warm"])
    assert first.exported and not second.exported
    assert first.export_dir == second.export_dir
    assert [p.name for p in tmp_path.iterdir()] == [first.export_dir.name]  # type: ignore[union-attr]


def test_fp32_and_int8_exports_are_kept_apart(use_cache: Path) -> None:
    fp32 = OnnxEmbedder()
    int8 = OnnxEmbedder(quantize=True)
    fp32.encode(["a"])
    int8.encode(["a"])
    assert fp32.export_dir != int8.export_dir
    assert (fp32.name, int8.name) == ("all-MiniLM-L6-v2@onnx", "all-MiniLM-L6-v2@onnx-int8")


def test_encoder_names_record_which_encoder_made_the_vectors() -> None:
    assert encoder_of("all-MiniLM-L6-v2") == "torch"
    assert encoder_of("all-MiniLM-L6-v2+ft-0123456789abcdef@onnx-int8") == "onnx-int8"
    assert encoder_of("all-MiniLM-L6-v2@static") == "static"


def test_model_fingerprint_changes_with_the_weights(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights v1")
    before = model_fingerprint(model)
    (model / "model.safetensors").write_bytes(b"weights v2")
    assert model_fingerprint(model) != before


def test_a_directory_without_weights_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a sentence-transformers model directory"):
        model_fingerprint(tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True},  # before ST 6
        {"embedding_dimension": 384, "pooling_mode": "cls"},  # sentence-transformers 6
    ],
)
def test_export_refuses_a_model_that_does_not_mean_pool(
    tmp_path: Path, config: dict[str, object]
) -> None:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="mean pooling only"):
        export_onnx(tmp_path, tmp_path / "out", quantize=False)


def test_a_missing_model_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere.*local directory"):
        OnnxEmbedder(tmp_path / "nowhere")


def test_auto_falls_back_to_torch_when_onnxruntime_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(encoders, "AUTO_ENCODERS", ("onnx-int8", "torch"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    assert isinstance(make_embedder("auto"), SentenceTransformerEmbedder)


def test_auto_takes_the_fast_encoder_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoders, "AUTO_ENCODERS", ("onnx-int8", "torch"))
    assert make_embedder("auto").name == "all-MiniLM-L6-v2@onnx-int8"


def test_asking_for_onnx_without_onnxruntime_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"needs onnxruntime.*nem_llm\[fast\].*encoder='torch'"):
        make_embedder("onnx")


def test_an_unknown_encoder_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"'torch', 'onnx', 'onnx-int8', 'static'.*'gpu'"):
        make_embedder("gpu")


def test_matcher_takes_embedder_or_encoder_not_both(countries: list[dict[str, Any]]) -> None:
    with pytest.raises(ConfigError, match="embedder= or encoder="):
        Matcher(countries, llm=False, embedder=FakeEmbedder(), encoder="onnx")


def test_matcher_encodes_catalog_and_queries_with_its_encoder(
    countries: list[dict[str, Any]], use_cache: Path
) -> None:
    with Matcher(countries, llm=False, encoder="onnx") as matcher:
        matcher.fit()
        assert matcher.index is not None
        assert matcher.index.embedder_name == matcher.embedder.name == "all-MiniLM-L6-v2@onnx"
        assert matcher.match("Deutschland").candidates[0].entity_id == "DE"


def test_an_index_saved_with_one_encoder_is_refused_by_another(
    countries: list[dict[str, Any]], tmp_path: Path
) -> None:
    catalog = load_catalog(countries)
    vectors = FakeEmbedder(384).encode(list(catalog.forms))
    HybridIndex(catalog, vectors, embedder_name="all-MiniLM-L6-v2@onnx-int8").save(tmp_path)
    with Matcher(countries, llm=False, encoder="torch", index_dir=tmp_path) as matcher:
        with pytest.raises(ConfigError, match=r"built with.*@onnx-int8.*encoder='onnx-int8'"):
            matcher.fit()


def test_auto_loads_a_saved_index_with_the_encoder_that_built_it(
    countries: list[dict[str, Any]], tmp_path: Path, use_cache: Path
) -> None:
    build_index(load_catalog(countries), OnnxEmbedder(quantize=True), tmp_path / "idx")
    with Matcher(countries, llm=False, index_dir=tmp_path / "idx") as matcher:
        matcher.fit()
        assert matcher.embedder.name == "all-MiniLM-L6-v2@onnx-int8"
        assert matcher.match("Österreich").candidates[0].entity_id == "AT"


def test_auto_refuses_an_index_whose_encoder_is_not_installed(
    countries: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = load_catalog(countries)
    vectors = FakeEmbedder(384).encode(list(catalog.forms))
    HybridIndex(catalog, vectors, embedder_name="all-MiniLM-L6-v2@onnx").save(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with Matcher(countries, llm=False, index_dir=tmp_path) as matcher:
        with pytest.raises(ConfigError, match="vectors of two embedders cannot be mixed"):
            matcher.fit()


def test_static_distillation_is_cached_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("model2vec", reason="the [static] extra is not installed")
    import model2vec.distill
    from tokenizers import Tokenizer

    from nem_llm._retrieval.embedding import default_model_path
    from nem_llm._retrieval.encoders import StaticEmbedder

    calls: list[str] = []

    def fake_distill(model_name: str, pca_dims: int) -> Any:  # the real one takes minutes
        calls.append(model_name)
        tok = Tokenizer.from_file(str(Path(default_model_path()) / "tokenizer.json"))
        vectors = np.random.default_rng(0).normal(size=(tok.get_vocab_size(), 8))
        return model2vec.StaticModel(vectors.astype(np.float32), tok)

    monkeypatch.setattr(model2vec.distill, "distill", fake_distill)
    first = StaticEmbedder(cache_dir=tmp_path).encode(["Germany", "Deutschland"])
    second = StaticEmbedder(cache_dir=tmp_path).encode(["Germany", "Deutschland"])
    assert len(calls) == 1
    assert np.allclose(first, second)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert StaticEmbedder(cache_dir=tmp_path).name == "all-MiniLM-L6-v2@static"


@pytest.mark.timeout(300)
def test_cli_index_build_records_the_encoder(tmp_path: Path, use_cache: Path) -> None:
    built = _cli(
        "index", "build", "--catalog", str(CLI_CATALOG), "--out", "idx", "--encoder", "onnx",
        "-q", cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "encoder all-MiniLM-L6-v2@onnx" in built.stderr
    assert HybridIndex.read_manifest(tmp_path / "idx")["embedder"] == "all-MiniLM-L6-v2@onnx"


def test_cli_rejects_an_unknown_encoder(tmp_path: Path) -> None:
    built = _cli(
        "index", "build", "--catalog", str(CLI_CATALOG), "--out", "idx", "--encoder", "gpu",
        cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 2
    assert "'gpu' is not one of" in built.stderr


@pytest.mark.timeout(300)
def test_cli_match_encodes_with_the_chosen_encoder(tmp_path: Path, use_cache: Path) -> None:
    matched = _cli(
        "match", "--catalog", str(CLI_CATALOG), "--queries", str(MENTIONS), "--out", "out.jsonl",
        "--encoder", "onnx", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert matched.returncode == 0, matched.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 17
    state_index = tmp_path / "out.jsonl.state" / "index"
    assert HybridIndex.read_manifest(state_index)["embedder"] == "all-MiniLM-L6-v2@onnx"
