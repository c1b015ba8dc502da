"""Prompt templates shipped with nem_llm (installed as the ``nem_llm.prompts`` package)."""
