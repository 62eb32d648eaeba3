"""Runtimes: encoder and decoder backends and the Pipeline that joins them."""

from .pipeline import Pipeline, Result

__all__ = ["Pipeline", "Result"]
