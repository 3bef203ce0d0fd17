"""locft-dist: localized, breadth-first fine-tuning for editing the factual knowledge of LLMs."""

__version__ = "0.1.0"
