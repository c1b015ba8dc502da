"""The retrieval stage's public pieces: saved indexes, the encoders, and fine-tuning the
encoder on labelled pairs.

The implementation lives in the internal ``nem_llm._retrieval`` package; import from here.
"""

from __future__ import annotations

from ._retrieval.embedding import SentenceTransformerEmbedder, default_model_path
from ._retrieval.index import HybridIndex
from ._retrieval.learning import finetune, pairs_from_catalog, pairs_from_labels

__all__ = [
    "HybridIndex",
    "SentenceTransformerEmbedder",
    "default_model_path",
    "finetune",
    "pairs_from_catalog",
    "pairs_from_labels",
]
