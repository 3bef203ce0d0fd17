"""Model-editing metrics from per-probe results: three families, reduced through (sum, count) pairs.

Each of reliability (the edit prompt), generalization (its rephrasings) and locality (unrelated prompts)
is measured three ways, since papers report all three and they disagree:

* ``_tf`` (teacher-forced, EasyEdit): feed prompt + answer ids, score the argmax at each answer position.
  Locality: agreement of those argmax tokens with the unedited model's.
* ``_em`` (greedy exact match with a budget of the answer's length + ``EXTRA_NEW_TOKENS`` tokens): decode
  greedily after the prompt, cut at the first ".", newline or EOS, SQuAD-normalized exact match.
  Locality: the same normalized text as the unedited model under the same budget.
* ``_wild`` (the WILD protocol): question-only context, greedy decoding up to ``max_new_tokens`` whatever
  the answer's length, the same cut and normalized match. Locality: exactly the same cut text as the
  unedited model.

A metric is a mean over edits of the mean over that edit's probes, so every edit weighs the same however
many probes it has. Per-edit means are summed into (sum, number of edits) pairs that ranks can add before
dividing; nothing here talks to ranks.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

EXTRA_NEW_TOKENS = 3
"""``_em`` decodes this many tokens past the answer's length, so a too-long answer fails."""

STOP_STRINGS = ("\n", ".")
"""A generation is cut at its first newline or period (and ends at EOS) before it is compared."""

KINDS = ("reliability", "generalization", "locality")
FAMILIES = ("tf", "em", "wild")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)

Sums = dict[str, tuple[float, int]]
"""Metric name -> (sum over edits of the edit's mean probe score, number of edits with such probes)."""


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD-style)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    """Whether two strings agree after ``normalize_answer``."""
    return normalize_answer(prediction) == normalize_answer(answer)


def cut_at_stop(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """The text up to (excluding) the first stop string.

    This also cuts answers that contain a period themselves ("St. Louis"); such answers can never match
    exactly, which is the reference definitions' behaviour too.
    """
    end = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            end = min(end, index)
    return text[:end]


def harmonic_mean(values: Iterable[float | None]) -> float:
    """Harmonic mean of the given components, skipping ``None`` (a component that was not measured).

    Zero if any component is zero: an edit method that destroys locality scores nothing.
    """
    present = [float(v) for v in values if v is not None]
    if not present:
        raise ValueError("harmonic_mean needs at least one value")
    if any(v < 0 for v in present):
        raise ValueError(f"harmonic_mean is defined for non-negative values, got {present}")
    if any(v == 0 for v in present):
        return 0.0
    return len(present) / sum(1.0 / v for v in present)


def token_accuracy(predicted: Sequence[int], target: Sequence[int]) -> float:
    """Fraction of answer positions whose teacher-forced argmax is the answer's token."""
    if len(predicted) != len(target):
        raise ValueError(f"{len(predicted)} predictions for {len(target)} answer tokens")
    return sum(int(p == t) for p, t in zip(predicted, target, strict=True)) / len(target)


def decoded(tokenizer, tokens: Sequence[int]) -> str:
    """Generated tokens as text, exactly as produced (special tokens dropped, no space clean-up), so the
    text of a prefix of the tokens is a prefix of the text (up to a trailing partial character)."""
    return tokenizer.decode(list(tokens), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def greedy_text(tokenizer, generated: Sequence[int], budget: int) -> str:
    """The first ``budget`` generated tokens as text, cut at the first stop string."""
    return cut_at_stop(decoded(tokenizer, generated[:budget]))


_LAST_SPACE = re.compile(r"\s(?=\S*$)")
_ARTICLE_WORDS = ("a", "an", "the")


def without_partial_character(text: str) -> str:
    """``text`` less the replacement characters an incomplete UTF-8 sequence at its end may decode to:
    later bytes can turn them into one real character. At most three: such a sequence is at most three
    bytes, and decoders write one replacement per sequence (byte-level BPE) or per byte (byte fallback).
    Replacement characters before those are final."""
    end = len(text)
    while end > 0 and len(text) - end < 3 and text[end - 1] == "\ufffd":
        end -= 1
    return text[:end]


def can_still_match(text: str, words: Sequence[str]) -> bool:
    """Whether more tokens after ``text`` (no stop in it yet) could make its normalized form ``words``.

    The words before the last whitespace are final; the trailing word can only grow (a partial character
    at the very end aside), and it matters unless it may still become an article (which normalization
    drops). A no is final; a yes may still turn out a miss.
    """
    text = without_partial_character(text)
    split = _LAST_SPACE.search(text)
    complete, tail = (text[: split.end()], text[split.end() :]) if split else ("", text)
    done = normalize_answer(complete).split()
    if done != list(words[: len(done)]):
        return False
    tail = "".join(ch for ch in tail.lower() if ch not in _PUNCTUATION)
    if not tail or any(article.startswith(tail) for article in _ARTICLE_WORDS):
        return True
    rest = words[len(done) :]
    return bool(rest) and rest[0].startswith(tail)


def settled_words(text: str, final: bool) -> list[str]:
    """The normalized words of a generation that can no longer change: all of them once it is final, else
    those before its last whitespace (the trailing word may still grow)."""
    if final:
        return normalize_answer(text).split()
    text = without_partial_character(text)
    split = _LAST_SPACE.search(text)
    return normalize_answer(text[: split.end()]).split() if split else []


def parted(a: Sequence, a_final: bool, b: Sequence, b_final: bool) -> bool:
    """Whether two growing sequences (texts, or lists of settled words) can no longer end up equal: they
    differ within their common length, or a finished one is already shorter than the other."""
    common = min(len(a), len(b))
    if a[:common] != b[:common]:
        return True
    return (a_final and len(b) > len(a)) or (b_final and len(a) > len(b))


@dataclass(frozen=True)
class Expected:
    """What one probe's generation is compared with, so decoding can stop once both results are settled:
    a budget is used up, or the text can no longer match (``can_still_match``; for the exact locality
    text, the text so far is not a prefix of it). A match is never settled early: it needs the stop."""

    em_budget: int
    wild_budget: int
    em_words: tuple[str, ...]
    """The normalized words the ``_em`` text must have (the answer's, or the unedited model's text's)."""
    wild_words: tuple[str, ...] = ()
    """Reliability, generalization: the normalized words the ``_wild`` text must have."""
    wild_text: str | None = None
    """Locality: the exact text the ``_wild`` text must be (the unedited model's)."""

    def settled(self, text: str, num_tokens: int) -> bool:
        """Whether ``text`` (of ``num_tokens`` generated tokens, no stop yet) fixes both results."""
        if num_tokens < self.em_budget and can_still_match(text, self.em_words):
            return False
        if num_tokens >= self.wild_budget:
            return True
        if self.wild_text is not None:
            return not self.wild_text.startswith(without_partial_character(text))
        return not can_still_match(text, self.wild_words)


@dataclass
class EditMetrics:
    """Means over edits (each edit weighs the same whatever its number of probes); ``None`` = not measured.

    ``num_rephrases`` and ``num_locality`` count probes; the ``num_edits_with_*`` fields count the edits
    that enter the generalization and locality means.
    """

    reliability_tf: float
    generalization_tf: float | None
    locality_tf: float | None
    reliability_em: float | None
    generalization_em: float | None
    locality_em: float | None
    edit_score_tf: float
    edit_score_em: float | None
    perplexity: float | None
    perplexity_base: float | None
    num_edits: int
    num_rephrases: int
    num_locality: int
    num_edits_with_rephrases: int = 0
    num_edits_with_locality: int = 0
    reliability_wild: float | None = None
    generalization_wild: float | None = None
    locality_wild: float | None = None
    edit_score_wild: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditMetrics:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class EditScores:
    """Per-probe scores collected per edit, then reduced to ``Sums`` (per-edit means summed over edits)."""

    def __init__(self) -> None:
        self._scores: dict[str, dict[int, list[float]]] = {}

    def add(self, metric: str, edit: int, score: float) -> None:
        self._scores.setdefault(metric, {}).setdefault(edit, []).append(float(score))

    def sums(self) -> Sums:
        return {
            metric: (sum(sum(v) / len(v) for v in by_edit.values()), len(by_edit))
            for metric, by_edit in self._scores.items()
        }


METRIC_KEYS = tuple(f"{kind}_{family}" for family in FAMILIES for kind in KINDS)
"""Every metric a pass can produce, in a fixed order (the order ranks reduce them in)."""


def metrics_from_sums(
    sums: Sums, counts: Mapping[str, int], perplexity: float | None, perplexity_base: float | None
) -> EditMetrics:
    """The metrics of the (already reduced) sums; ``counts`` holds num_edits, num_rephrases, num_locality."""

    def mean(key: str) -> float | None:
        total, count = sums.get(key, (0.0, 0))
        return total / count if count else None

    values = {key: mean(key) for key in METRIC_KEYS}
    reliability_tf = values["reliability_tf"]
    assert reliability_tf is not None, "every edit has a reliability probe"

    def score(family: str) -> float | None:
        parts = [values[f"{kind}_{family}"] for kind in KINDS]
        return harmonic_mean(parts) if parts[0] is not None else None

    return EditMetrics(
        **values,
        edit_score_tf=harmonic_mean(values[f"{kind}_tf"] for kind in KINDS),
        edit_score_em=score("em"),
        edit_score_wild=score("wild"),
        perplexity=perplexity,
        perplexity_base=perplexity_base,
        num_edits=int(counts["num_edits"]),
        num_rephrases=int(counts["num_rephrases"]),
        num_locality=int(counts["num_locality"]),
        num_edits_with_rephrases=int(sums.get("generalization_tf", (0.0, 0))[1]),
        num_edits_with_locality=int(sums.get("locality_tf", (0.0, 0))[1]),
    )
