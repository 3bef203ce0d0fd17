"""Other wordings of an edit's relation, learned from a dataset's records (``augment.wordings``).

An edit is usually trained in one sentence ("The mother tongue of Danielle Darrieux is"), and an edit
learned in one sentence is often not recalled in another ("Danielle Darrieux's mother tongue is"). Datasets
such as CounterFact pair each record's prompt with a rephrasing of the same relation for another subject,
so a file of records holds, for each wording of a relation, the other wordings people use for it. This
module turns the records into *wordings* (the prompt with its subject replaced by ``{}``, any unrelated
leading sentence dropped), counts how often two wordings occur in the same record, and gives each edit the
wordings most often paired with its own, with its subject filled in.

Held out by construction: records of an edited subject are skipped, and an edit never gets a wording that
one of its own rephrase probes uses (the generalization metric then measures a wording it was not trained
in).
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from locft_dist.edits.schema import EditRequest

logger = logging.getLogger(__name__)

SLOT = "{}"
_SENTENCE_END = re.compile(r"[.!?]\s+|\n")


def wording(prompt: str, subject: str | None) -> str | None:
    """``prompt`` with its subject's first occurrence replaced by ``{}``, from the sentence that names it
    (text before the last sentence end ahead of the subject is context, not the relation's wording);
    None when the subject is missing or absent."""
    if not subject:
        return None
    start = prompt.find(subject)
    if start < 0:
        return None
    head = prompt[:start]
    ends = list(_SENTENCE_END.finditer(head))
    if ends:
        head = head[ends[-1].end() :]
    return f"{head}{SLOT}{prompt[start + len(subject) :]}".strip()


def fill(template: str, subject: str) -> str:
    """The wording with the subject in its slot."""
    return template.replace(SLOT, subject, 1)


@dataclass
class WordingIndex:
    """How often two wordings occur in the same record (its prompt and one of its rephrasings)."""

    pairs: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    records: int = 0

    @classmethod
    def from_records(cls, records: Iterable[EditRequest], *, skip_subjects: set[str]) -> WordingIndex:
        index = cls()
        for record in records:
            if not record.subject or record.subject in skip_subjects:
                continue
            own = wording(record.prompt, record.subject)
            others = {wording(p, record.subject) for p in record.rephrase_prompts} - {None, own}
            if own is None or not others:
                continue
            index.records += 1
            for other in others:
                index.pairs[own][other] += 1
                index.pairs[other][own] += 1
        return index

    def related(self, template: str, *, min_count: int) -> list[str]:
        """Wordings paired with ``template`` at least ``min_count`` times, most often first (ties by text)."""
        counts = self.pairs.get(template, Counter())
        return [w for w, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if n >= min_count]


def edit_wordings(index: WordingIndex, request: EditRequest, *, num: int, min_count: int) -> list[str]:
    """Up to ``num`` prompts that state ``request``'s relation for its subject in other words, none in a
    wording of the request's own rephrase probes."""
    own = wording(request.prompt, request.subject)
    if own is None or num <= 0:
        return []
    held_out = {wording(p, request.subject) for p in request.rephrase_prompts} | {own}
    chosen = [w for w in index.related(own, min_count=min_count) if w not in held_out][:num]
    return [fill(w, request.subject) for w in chosen]


def wordings_for_edits(
    pool: Iterable[EditRequest], requests: Sequence[EditRequest], *, num: int, min_count: int
) -> list[list[str]]:
    """Each request's other wordings, learned from ``pool`` (records of an edited subject skipped)."""
    subjects = {r.subject for r in requests if r.subject}
    index = WordingIndex.from_records(pool, skip_subjects=subjects)
    result = [edit_wordings(index, r, num=num, min_count=min_count) for r in requests]
    covered = sum(1 for w in result if w)
    logger.info(
        "relation wordings: %d of %d edits got other wordings (%.1f on average) from %d records",
        covered,
        len(requests),
        sum(len(w) for w in result) / max(len(requests), 1),
        index.records,
    )
    return result
