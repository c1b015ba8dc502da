"""Retrieval: from a normalized query to scored candidates, and from scores to a route.

Embedding (the encoder and the micro-batcher), the hybrid index (dense + lexical search),
routing and threshold calibration live here. Modules here may import only the base
modules (``catalog``, ``config``, ``models``, ``errors``, ``text``); the matcher and the
jobs import them, never the other way round.
"""
