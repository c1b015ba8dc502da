"""``nem-llm sim`` and ``nem-llm local-llm``: the simulator and the real local model.

Also what ``match --llm local`` and ``eval --llm local`` share: :func:`use_local_llm`
starts the local model for the command and stops it when the command ends.
"""

from __future__ import annotations

import contextlib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape

from ..errors import NemLLMError
from ..settings import MatcherSettings
from ._app import app, err, fail, out

__all__ = ["LLMChoice", "local_llm", "sim", "use_local_llm", "warn_small_model"]


class LLMChoice(StrEnum):
    """``--llm`` of ``match``: the OPENAI_* endpoint, none, or the bundled local model."""

    env = "env"
    off = "off"
    local = "local"


#: ``--llm`` help of ``match`` and ``eval``.
LOCAL_LLM_HELP = (
    "local: start the bundled small model for this command (one call at a time, "
    "answers guarded; see nem-llm local-llm)"
)


def warn_small_model(model: str) -> None:
    """Print the small-model warning when ``model`` is a bundled local model."""
    from .._llm.local_guard import LOCAL_MODEL_PREFIX
    from .._llm.local_llm import small_model_warning

    if model.startswith(LOCAL_MODEL_PREFIX):
        err.print(f"[yellow]warning:[/] {escape(small_model_warning(model))}", highlight=False)


def use_local_llm(settings: MatcherSettings, ctx: typer.Context) -> MatcherSettings:
    """Start the local model for the running command; settings that adjudicate with it.

    The model is stopped when the command ends (however it ends): the command's context
    ``ctx`` closes the server. Prints the small-model warning, and a note on the first start.
    """
    from .._llm import local_llm as local
    from .._llm.local_runtime import checkpoint_dir

    def on_start(spec: Any) -> None:
        warn_small_model(spec.served_name)
        first = not (checkpoint_dir(spec) / "config.json").is_file()
        note = " (first start: converting the model once, about a minute)" if first else ""
        err.print(f"starting the local model {spec.key}{note}...", highlight=False, markup=False)

    stack = contextlib.ExitStack()
    try:
        local_settings = stack.enter_context(local.local_settings(settings, on_start=on_start))
    except NemLLMError as exc:
        stack.close()
        raise fail(str(exc)) from None
    ctx.call_on_close(stack.close)
    return local_settings


@app.command()
def sim(
    port: Annotated[int, typer.Option(help="Port to listen on (0 = a free one).")] = 8089,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    rpm: Annotated[
        float | None, typer.Option(help="Requests per minute accepted (else 429; none: no cap).")
    ] = None,
    tpm: Annotated[
        float | None, typer.Option(help="Tokens per minute accepted (else 429; none: no cap).")
    ] = None,
    latency: Annotated[
        str,
        typer.Option(
            help="fixed (--latency-p50), uniform (--latency-min..--latency-max) or lognormal "
            "(--latency-p50, --latency-p99)."
        ),
    ] = "fixed",
    latency_p50: Annotated[
        float, typer.Option(help="Seconds: the fixed latency, or the lognormal median.")
    ] = 0.0,
    latency_p99: Annotated[
        float | None, typer.Option(help="Seconds: the lognormal 99th percentile.")
    ] = None,
    latency_min: Annotated[
        float, typer.Option(help="Seconds: the lower bound of the uniform latency.")
    ] = 0.0,
    latency_max: Annotated[
        float, typer.Option(help="Seconds: the upper bound of the uniform latency.")
    ] = 0.0,
    seed: Annotated[
        int, typer.Option(help="Seed of the faults, latencies and oracle errors drawn.")
    ] = 0,
    rate_429: Annotated[
        float, typer.Option(help="Probability of an injected 429 (see --retry-after).")
    ] = 0.0,
    rate_500: Annotated[float, typer.Option(help="Probability of an injected HTTP 500.")] = 0.0,
    rate_503: Annotated[float, typer.Option(help="Probability of an injected HTTP 503.")] = 0.0,
    rate_hang: Annotated[
        float, typer.Option(help="Probability that a request hangs (an hour, then 503).")
    ] = 0.0,
    rate_malformed: Annotated[
        float, typer.Option(help="Probability of a 200 whose arguments are not JSON.")
    ] = 0.0,
    rate_invalid: Annotated[
        float, typer.Option(help="Probability of a 200 naming an id not among the allowed.")
    ] = 0.0,
    retry_after: Annotated[
        float, typer.Option(help="Seconds sent as Retry-After on injected 429s.")
    ] = 1.0,
    policy: Annotated[
        str,
        typer.Option(help="top (the first candidate) or oracle (the --gold answer)."),
    ] = "top",
    gold: Annotated[Path | None, typer.Option(help="Labelled JSONL for the oracle.")] = None,
    oracle_error_rate: Annotated[
        float, typer.Option(help="Probability that the oracle answers a wrong allowed value.")
    ] = 0.0,
    error_profile: Annotated[
        Literal["uniform", "difficulty"],
        typer.Option(help="Oracle errors: uniform, or concentrated on ambiguous requests."),
    ] = "uniform",
    model: Annotated[
        str, typer.Option(help="Model id reported by /v1/models and in completions.")
    ] = "nem-llm-sim",
    catalog: Annotated[
        Path | None, typer.Option(help="Catalog the oracle names entities from (rewrite call).")
    ] = None,
) -> None:
    """Serve the OpenAI-compatible SIMULATOR (answers come from a policy, not a model)."""
    from ..sim import SimConfig, serve_forever

    try:
        config = SimConfig(
            seed=seed,
            model=model,
            latency=latency,  # type: ignore[arg-type]  # SimConfig validates it
            latency_p50=latency_p50,
            latency_p99=latency_p99,
            latency_min=latency_min,
            latency_max=latency_max,
            rpm=rpm,
            tpm=tpm,
            rate_429=rate_429,
            rate_500=rate_500,
            rate_503=rate_503,
            rate_hang=rate_hang,
            rate_malformed=rate_malformed,
            rate_invalid=rate_invalid,
            retry_after=retry_after,
            policy=policy,  # type: ignore[arg-type]
            gold_path=str(gold) if gold else None,
            oracle_error_rate=oracle_error_rate,
            error_profile=error_profile,
            catalog_path=str(catalog) if catalog else None,
        )
    except (NemLLMError, ValueError) as exc:
        raise fail(str(exc)) from None

    def ready(server: Any) -> None:
        out.print(
            f"simulator listening: OPENAI_BASE_URL={server.base_url}", highlight=False, markup=False
        )
        out.print("(a simulator: its answers are not a model's; Ctrl-C to stop)", style="dim")

    serve_forever(config, host, port, on_ready=ready)


@app.command("local-llm")
def local_llm(
    port: Annotated[int, typer.Option(help="Port (0 = a free one).")] = 8090,
    model: Annotated[
        str, typer.Option(help="smollm2-135m (default, Apache-2.0) or gemma3-270m.")
    ] = "smollm2-135m",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all).")] = None,
) -> None:
    """Serve the bundled small local model (transformers on CPU) on 127.0.0.1."""
    from .._llm import local_llm as local

    ok, reason = local.local_llm_available(model)
    if not ok:
        raise fail(reason)
    warn_small_model(f"local/{model}")
    try:
        local.serve_forever(
            port or None,
            model=model,
            threads=threads,
            on_ready=lambda srv: out.print(
                f"local LLM ready: OPENAI_BASE_URL={srv.base_url} model={srv.model}\n"
                f"  nem-llm match ... --model {srv.model} --concurrency 1 --timeout 120",
                highlight=False,
                markup=False,
            ),
        )
    except NemLLMError as exc:
        raise fail(str(exc)) from None
