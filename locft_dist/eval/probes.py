"""The probes of an edit set: every (prompt, answer) pair evaluation runs, encoded as training encodes.

An edit contributes one reliability probe (its prompt), one generalization probe per rephrase prompt and
one locality probe per unrelated prompt. Probes go through the run's ``Encoding`` (``for_probes()``: the
same rendering, chat template included, without the EOS), so a probe is tokenized exactly as the edit was
trained. A sharded evaluation gives edit ``i`` with all its probes to rank ``i % world_size``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from locft_dist.edits.encode import EncodedExample, Encoding, encode_pairs
from locft_dist.edits.schema import EditRequest
from locft_dist.errors import EncodingError


@dataclass(frozen=True)
class Probe:
    edit: int
    """Index of the edit in the evaluated list."""
    kind: str
    """reliability | generalization | locality."""
    slot: int
    """Locality probes: the row in the unedited model's Reference (global order); -1 otherwise."""
    example: EncodedExample
    answer: str


@dataclass(frozen=True)
class ProbeSet:
    """This rank's probes, plus what holds for the whole set (counts, the key of its contents)."""

    probes: list[Probe]
    num_edits: int
    num_rephrases: int
    num_locality: int
    key: str
    """Hash of the edits' probe texts, the encoding and the tokenizer: what a stored Reference must match."""

    def counts(self) -> dict[str, int]:
        return {
            "num_edits": self.num_edits,
            "num_rephrases": self.num_rephrases,
            "num_locality": self.num_locality,
        }


def encode_probes(
    tokenizer, encoding: Encoding, prompts: Sequence[str], answers: Sequence[str]
) -> list[EncodedExample]:
    """(prompt, answer) pairs encoded with ``encoding`` as evaluation probes (no EOS after the answer)."""
    return encode_pairs(tokenizer, list(prompts), list(answers), encoding.for_probes())


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides token ids: the fast tokenizer's full definition (vocabulary, merges, normalizer...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id]
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256((definition + json.dumps([*extra, template], default=str)).encode()).hexdigest()


def probes_key(requests: Sequence[EditRequest], encoding: Encoding, tokenizer) -> str:
    """Hash of what the probes are made of; equal on every rank without any communication."""
    digest = hashlib.sha256()
    digest.update(json.dumps(encoding.for_probes().to_dict(), sort_keys=True).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    for request in requests:
        record = [
            request.prompt,
            request.target_new,
            list(request.rephrase_prompts),
            [[p.prompt, p.answer] for p in request.locality_prompts],
        ]
        digest.update(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()[:32]


def build_probes(
    tokenizer,
    requests: Sequence[EditRequest],
    encoding: Encoding,
    *,
    rank: int = 0,
    world_size: int = 1,
    source: str = "edits",
) -> ProbeSet:
    """The probes of the edits this rank owns (``i % world_size == rank``), encoded with ``encoding``.

    A probe that cannot be encoded (an answer too long for ``max_length``) is reported with its edit number
    and probe, as ``source: edit N: ...``.
    """
    if not requests:
        raise ValueError("evaluation needs at least one edit request")
    locality_start = 0
    specs: list[tuple[int, str, int, str, str]] = []  # edit, kind, slot, prompt, answer
    for edit, request in enumerate(requests):
        if edit % world_size == rank:
            specs.append((edit, "reliability", -1, request.prompt, request.target_new))
            specs.extend(
                (edit, "generalization", -1, p, request.target_new) for p in request.rephrase_prompts
            )
            specs.extend(
                (edit, "locality", locality_start + j, p.prompt, p.answer)
                for j, p in enumerate(request.locality_prompts)
            )
        locality_start += len(request.locality_prompts)
    try:
        examples = encode_probes(tokenizer, encoding, [s[3] for s in specs], [s[4] for s in specs])
    except EncodingError:
        for edit, kind, _, prompt, answer in specs:  # find the offending probe for the message
            try:
                encode_probes(tokenizer, encoding, [prompt], [answer])
            except EncodingError as err:
                raise EncodingError(f"{source}: edit {edit + 1}: {kind} probe {prompt!r}: {err}") from None
        raise
    probes = [
        Probe(edit, kind, slot, example, answer)
        for (edit, kind, slot, _, answer), example in zip(specs, examples, strict=True)
    ]
    return ProbeSet(
        probes=probes,
        num_edits=len(requests),
        num_rephrases=sum(len(r.rephrase_prompts) for r in requests),
        num_locality=locality_start,
        key=probes_key(requests, encoding, tokenizer),
    )
