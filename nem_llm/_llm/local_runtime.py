"""Run a small GGUF model on the CPU with transformers, choosing among given answers.

The runtime is transformers on the torch that sentence-transformers already brings: no
compiler, no extra engine (measured against onnxruntime-genai and llama.cpp in
``benchmarks/bench_local_models.py``). transformers reads GGUF files through the ``gguf``
package and dequantizes them to float32; that conversion is slow (about a minute for
SmolLM2), so it happens once and the result is kept under :func:`cache_dir`.

Decoding is constrained the cheapest way there is: one forward pass over the prompt, then
the next-token logits restricted to the allowed answers (the candidate numbers and
"none"). The answer is the most probable of them and its probability, renormalised over
the allowed answers, is the confidence: a measured number, not one the model wrote.

Example (needs the ``local`` extra and a model package)::

    scorer = ChoiceScorer.load(MODELS["smollm2-135m"])
    index, probs = scorer.choose(messages, ["1", "2", "3", "none"])
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .local_models import LocalLLMUnavailable, LocalModel

__all__ = [
    "ANSWER_INSTRUCTION",
    "FEW_SHOT",
    "ChoiceScorer",
    "build_prompt",
    "cache_dir",
    "checkpoint_dir",
    "missing_runtime_packages",
]

#: What the small model is told to answer (appended to the system instructions).
ANSWER_INSTRUCTION = "Answer with the candidate's number alone, or none."
# worked examples for models measured to gain from them; a domain of their own, so no
# example can be the answer to a real query by accident
FEW_SHOT: tuple[tuple[str, tuple[tuple[str, str], ...], str], ...] = (
    (
        "st petersburg florida",
        (("SPB", "Saint Petersburg"), ("STP", "St. Petersburg, Florida"), ("PBI", "Palm Beach")),
        "2",
    ),
    ("Minas Tirith", (("MIN", "Minsk"), ("MTR", "Mitre Peak"), ("TIR", "Tirana")), "none"),
    (
        "Frnakfurt am Main",
        (("FRA", "Frankfurt"), ("FRO", "Frankfurt (Oder)"), ("MZ", "Mainz")),
        "1",
    ),
)
# the packages transformers needs to read GGUF files
_RUNTIME_PACKAGES = {"torch": "torch", "transformers": "transformers", "gguf": "gguf",
                     "accelerate": "accelerate"}  # fmt: skip


def missing_runtime_packages() -> list[str]:
    """The PyPI packages of the runtime that are not installed (checked without importing)."""
    import importlib.util

    missing = []
    for module, package in _RUNTIME_PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$NEM_LLM_LOCAL_MODELS`` or
    ``~/.cache/nem_llm/local-models`` (one conversion serves every project and test run)."""
    root = os.environ.get("NEM_LLM_LOCAL_MODELS")
    return Path(root) if root else Path.home() / ".cache" / "nem_llm" / "local-models"


def checkpoint_dir(model: LocalModel) -> Path:
    """The converted checkpoint of ``model`` (its package version is part of the path)."""
    try:
        version = importlib.metadata.version(model.package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return cache_dir() / f"{model.key}-{version}"


def _convert(model: LocalModel, target: Path) -> None:
    """GGUF -> a float32 transformers checkpoint in ``target`` (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model.gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.key}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        lm: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # the weights are dequantized now: save them as a plain float32 checkpoint
        lm.hf_quantizer = None
        with contextlib.suppress(AttributeError):
            del lm.config.quantization_config
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_prompt(
    model: LocalModel, messages: Sequence[dict[str, str]], template: Any = None
) -> str:
    """The text the model continues: nem_llm's prompt in the model's measured format.

    ``messages`` are the adjudication prompt (system instructions, then the query and
    numbered candidates). ``template``: the tokenizer, for ``chat`` models.
    """
    system = "\n".join(m["content"] for m in messages if m["role"] == "system").strip()
    users = [m["content"] for m in messages if m["role"] != "system"]
    system = f"{system}\n{ANSWER_INSTRUCTION}".strip()
    shots = FEW_SHOT if model.few_shot else ()
    if model.prompt_style == "chat":
        turns = [{"role": "system", "content": system}]
        for query, cands, answer in shots:
            turns.append({"role": "user", "content": _shot_text(query, cands)})
            turns.append({"role": "assistant", "content": answer})
        turns += [{"role": "user", "content": text} for text in users]
        text: str = template.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return text
    cue = "Answer (the candidate's number, or none): "
    parts = [system, ""]
    for query, cands, answer in shots:
        parts.append(_shot_text(query, cands) + cue + answer + "\n")
    parts += [text.rstrip("\n") + "\n" + cue for text in users]
    return "\n".join(parts)


def _shot_text(query: str, cands: tuple[tuple[str, str], ...]) -> str:
    lines = "\n".join(f"[{i}] id: {cid} | name: {name}" for i, (cid, name) in enumerate(cands, 1))
    return f"<query>\n{query}\n</query>\n\n<candidates>\n{lines}\n</candidates>\n"


class ChoiceScorer:
    """A causal language model that picks one of a few short answers by probability.

    Args:
        model: which local model this is (its prompt format).
        tokenizer, lm: the loaded transformers tokenizer and model.
    """

    def __init__(self, model: LocalModel, tokenizer: Any, lm: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.lm = lm

    @classmethod
    def load(cls, model: LocalModel, *, threads: int | None = None) -> ChoiceScorer:
        """Load ``model`` (converting its GGUF file once, into :func:`checkpoint_dir`).

        Raises:
            LocalLLMUnavailable: a runtime package or the model's package is missing.
        """
        missing = missing_runtime_packages()
        if missing:
            raise LocalLLMUnavailable(
                f"the local model needs {', '.join(missing)}: pip install 'nem_llm[local]'"
            )
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        target = checkpoint_dir(model)
        if not (target / "config.json").is_file():
            _convert(model, target)
        tokenizer = AutoTokenizer.from_pretrained(str(target))
        lm: Any = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
        lm.eval()
        return cls(model, tokenizer, lm)

    def prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The text this model continues for ``messages`` (see :func:`build_prompt`)."""
        return build_prompt(self.model, messages, self.tokenizer)

    def option_tokens(self, options: Sequence[str]) -> list[int]:
        """The first token of each answer; they must differ (else they cannot be told apart)."""
        first = []
        for option in options:
            ids = self.tokenizer.encode(option, add_special_tokens=False)
            if not ids:
                raise ValueError(f"answer {option!r} has no tokens")
            first.append(int(ids[0]))
        if len(set(first)) != len(first):
            raise ValueError(f"answers {list(options)} share a first token: cannot constrain")
        return first

    def choose(
        self, messages: Sequence[dict[str, str]], options: Sequence[str]
    ) -> tuple[int, list[float], int]:
        """(index of the most probable answer, each answer's probability, prompt tokens).

        Probabilities are the next-token distribution restricted to the answers' first
        tokens and renormalised (constrained decoding in one forward pass).
        """
        import torch

        wanted = self.option_tokens(options)
        ids = self.tokenizer(self.prompt(messages), return_tensors="pt", add_special_tokens=False)
        input_ids = ids.input_ids
        with torch.inference_mode():
            logits = self.lm(input_ids, logits_to_keep=1).logits[0, -1]
        probs = torch.softmax(logits.float()[wanted], dim=-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return best, [float(p) for p in probs], int(input_ids.shape[1])


def timed_load(model: LocalModel, threads: int | None = None) -> tuple[ChoiceScorer, float]:
    """:meth:`ChoiceScorer.load` and the seconds it took (benchmarks report it)."""
    started = time.perf_counter()
    scorer = ChoiceScorer.load(model, threads=threads)
    return scorer, time.perf_counter() - started
