"""Edit requests: the canonical record and the loaders that map dataset files onto it."""

from locft_dist.edits.formats import EditSet, convert, detect_format, load_edits, write_jsonl
from locft_dist.edits.schema import EditRequest, LocalityProbe, edits_fingerprint

__all__ = [
    "EditRequest",
    "EditSet",
    "LocalityProbe",
    "convert",
    "detect_format",
    "edits_fingerprint",
    "load_edits",
    "write_jsonl",
]
