"""``nem-llm sim`` and ``nem-llm local-llm``: the simulator and the real local model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from ..errors import NemLLMError
from ._app import app, fail, out


@app.command()
def sim(
    port: int = 8089,
    host: str = "127.0.0.1",
    rpm: float | None = None,
    tpm: float | None = None,
    latency: Annotated[str, typer.Option(help="fixed | uniform | lognormal")] = "fixed",
    latency_p50: float = 0.0,
    latency_p99: float | None = None,
    latency_min: float = 0.0,
    latency_max: float = 0.0,
    seed: int = 0,
    rate_429: float = 0.0,
    rate_500: float = 0.0,
    rate_503: float = 0.0,
    rate_hang: float = 0.0,
    rate_malformed: float = 0.0,
    rate_invalid: float = 0.0,
    retry_after: float = 1.0,
    policy: Annotated[str, typer.Option(help="top | oracle")] = "top",
    gold: Annotated[Path | None, typer.Option(help="Labelled JSONL for the oracle.")] = None,
    oracle_error_rate: float = 0.0,
    error_profile: Annotated[
        Literal["uniform", "difficulty"],
        typer.Option(help="Oracle errors: uniform, or concentrated on ambiguous requests."),
    ] = "uniform",
    model: str = "nem-llm-sim",
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
        out.print(f"simulator listening: OPENAI_BASE_URL={server.base_url}", highlight=False)
        out.print("(a simulator: its answers are not a model's; Ctrl-C to stop)", style="dim")

    serve_forever(config, host, port, on_ready=ready)


@app.command("local-llm")
def local_llm(
    port: Annotated[int, typer.Option(help="Port (0 = a free one).")] = 8090,
) -> None:
    """Serve the real local model (llama.cpp + SmolLM2-135M) on 127.0.0.1."""
    from ..llm import local_llm as local

    ok, reason = local.local_llm_available()
    if not ok:
        raise fail(reason)
    try:
        local.serve_forever(
            port,
            on_ready=lambda srv: out.print(
                f"local LLM ready: OPENAI_BASE_URL={srv.base_url} model={srv.model}",
                highlight=False,
            ),
        )
    except NemLLMError as exc:
        raise fail(str(exc)) from None
