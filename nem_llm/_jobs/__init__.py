"""What the CLI runs over files: batch matching, checkpoints, readers and writers, eval, bench.

Jobs sit above the Matcher: they may import ``matcher``, ``retrieval``, ``llm``, ``sim`` and
the base modules; only ``cli`` and ``integrations`` import them.
"""
