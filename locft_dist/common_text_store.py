"""The common text's continuations cached in the run directory (``common_text.json``, written atomically).

``locate.common_generated_tokens`` has the unedited model continue every common-text prompt before the
subject rows are chosen: minutes on a CPU for a few thousand prompts, repeated by every resume. Reading
them back also keeps a resumed run's rows exactly those it started with, whatever device resumes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from locft_dist import outputs

FILE = "common_text.json"
FORMAT = "locft-common-text/1"


def cache_key(*, model: str, dtype: str, prompts: Sequence[str], num_tokens: int) -> str:
    """What the continuations depend on: the model's content, its dtype, the prompts and their length."""
    parts = {"model": model, "dtype": dtype, "prompts": list(prompts), "num_tokens": num_tokens}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load(path: Path, key: str) -> list[str] | None:
    """The cached texts, or None when ``path`` is absent, unreadable or made for another key."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("key") != key:
        return None
    texts = payload.get("texts")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return None
    return texts


def cached(path: Path, key: str, compute: Callable[[], list[str]]) -> tuple[list[str], bool]:
    """The texts from ``path`` if they match ``key``, else ``compute()`` saved there; and whether read."""
    texts = load(path, key)
    if texts is not None:
        return texts, True
    texts = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_json(path, {"format": FORMAT, "key": key, "texts": texts})
    return texts, False
