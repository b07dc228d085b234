"""Data: TFDS data sources (ArrayRecord, random access, no TensorFlow) read with grain."""

from bigjax.data.sources import load_source

__all__ = ["load_source"]
