"""The canonical edit record every loader maps onto (GUIDE section 2).

One JSON object per line::

    {"prompt": str, "target_new": str, "subject": str?, "target_true": str?,
     "rephrase_prompts": [str], "locality_prompts": [{"prompt": str, "answer": str}]}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LocalityProbe:
    """An unrelated fact whose prediction the edit must not change."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRequest:
    """One edit: make the model complete ``prompt`` with ``target_new``."""

    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    rephrase_prompts: tuple[str, ...] = field(default_factory=tuple)
    locality_prompts: tuple[LocalityProbe, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        """The canonical JSON object (optional fields omitted when empty)."""
        record: dict[str, Any] = {"prompt": self.prompt, "target_new": self.target_new}
        if self.subject is not None:
            record["subject"] = self.subject
        if self.target_true is not None:
            record["target_true"] = self.target_true
        record["rephrase_prompts"] = list(self.rephrase_prompts)
        record["locality_prompts"] = [{"prompt": p.prompt, "answer": p.answer} for p in self.locality_prompts]
        return record

    @staticmethod
    def from_json(record: dict[str, Any]) -> EditRequest:
        """The request ``to_json`` wrote (trusted: no validation; edit files go through ``formats``)."""
        return _from_json(record)


def _probe(record: dict[str, Any]) -> LocalityProbe:
    return LocalityProbe(record["prompt"], record["answer"])


def _from_json(record: dict[str, Any]) -> EditRequest:
    return EditRequest(
        prompt=record["prompt"],
        target_new=record["target_new"],
        subject=record.get("subject"),
        target_true=record.get("target_true"),
        rephrase_prompts=tuple(record.get("rephrase_prompts", ())),
        locality_prompts=tuple(_probe(p) for p in record.get("locality_prompts", ())),
    )


def edits_fingerprint(requests: Iterable[EditRequest]) -> str:
    """A stable hash of the edit set, in order; checkpoints record it so resume refuses other data."""
    digest = hashlib.sha256()
    for request in requests:
        digest.update(json.dumps(request.to_json(), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]
