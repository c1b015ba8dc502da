"""The matching stages that need both retrieval and the LLM: the decision and rewrite."""
