"""OpenAI-compatible simulator (placeholder; being written)."""
