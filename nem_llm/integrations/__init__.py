"""Integrations with other stacks: the HTTP service, DataFrames and Ray Data.

Each lives behind an optional extra and may import anything below it (``jobs``,
``matcher``, ``retrieval``, ``llm`` and the base modules); only ``cli`` imports it.
"""
