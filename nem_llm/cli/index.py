"""``nem-llm index build``: encode a large catalog once, resumably, into a saved index."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import NemLLMError
from ..settings import EncoderName, MatcherSettings, SearchMode
from ._app import app, err, fail, say, warn

index_app = typer.Typer(help="Build a reusable search index for a large catalog.")
app.add_typer(index_app, name="index")


_ENCODER_HELP = (
    "Catalog and query encoder: torch, onnx, onnx-int8 (the fast extra), static "
    "(the static extra), or auto (the measured default; a saved index's own encoder)."
)


@index_app.command("build")
def index_build(
    catalog: Annotated[
        Path, typer.Option(help="Entities: JSONL, CSV, TSV or Parquet (id, name, ...).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Index directory (created).")],
    search: Annotated[SearchMode, typer.Option(help="Search: auto, exact or ann.")] = "auto",
    index_description: Annotated[
        bool, typer.Option(help="Also index 'name, description' (record-like catalogs).")
    ] = False,
    lexical_weight: Annotated[
        float, typer.Option(help=MatcherSettings.model_fields["lexical_weight"].description)
    ] = 0.5,
    chunk_size: Annotated[int, typer.Option(help="Forms encoded per saved chunk.")] = 20_000,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress.")] = False,
    encoder: Annotated[EncoderName, typer.Option(help=_ENCODER_HELP)] = "auto",
    index: Annotated[
        SearchMode | None, typer.Option(hidden=True, help="Deprecated: --search.")
    ] = None,
) -> None:
    """Encode a catalog (resumable in chunks; Ctrl-C safe) and save its index to --out."""
    from .._jobs.index_build import build_index
    from .._retrieval.encoders import make_embedder
    from ..catalog import load_catalog

    if index is not None:
        warn("index build --index is deprecated: use --search")
        search = index
    if not catalog.is_file():
        raise fail(f"{catalog}: catalog file not found")
    entities = load_catalog(catalog, include_description=index_description)
    try:
        embedder = make_embedder(encoder)
    except NemLLMError as exc:
        raise fail(str(exc)) from None
    progress = Progress(
        TextColumn("[bold]encoding"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
    )
    task = progress.add_task("encode", total=len(entities.forms))
    try:
        with progress:
            built = build_index(
                entities,
                embedder,
                out_dir,
                index=search,
                lexical_weight=lexical_weight,
                chunk_size=chunk_size,
                on_chunk=lambda done, total: progress.update(task, completed=done),
            )
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: encoded chunks are kept; run again to resume[/]")
        raise typer.Exit(130) from None
    kind = "ann" if built.use_ann else "exact"
    say(
        f"index saved to {out_dir}: {len(entities):,} entities, {len(entities.forms):,} "
        f"forms, {kind} search, {built.dense_nbytes_per_entity():,.0f} dense bytes/entity, "
        f"encoder {embedder.name}"
    )
