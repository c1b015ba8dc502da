"""Structured records: compare field by field, weigh by a Fellegi-Sunter model fit without labels."""

from __future__ import annotations
