"""``python -m nem_llm.cli``: the same as the ``nem-llm`` command."""

from __future__ import annotations

from ._app import main

main()
