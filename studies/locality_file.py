"""Build a locality-supervision file (``augment.locality_path``) from a dataset of other facts.

Locality supervision keeps the unedited model's predictions on prompts the edits must not change. Those
prompts have to be *random unedited facts*: prompts of other records of a dataset, never a prompt of an
edited subject (the edit should change those) and never a probe the evaluation reads (locality, rephrase
or edit prompts of the edit files), or the locality metric stops being held out.

    python studies/locality_file.py --pool counterfact_full.jsonl --edits my_edits.jsonl \
        --num 3000 --out locality.jsonl

``--pool`` and ``--edits`` take any edit format ``locft convert`` reads. The output is JSONL with one
``{"prompt": ...}`` per line, written through a temporary file and a rename.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from locft_dist.edits.formats import load_edits
from locft_dist.edits.schema import EditRequest


def excluded(edits: Sequence[EditRequest]) -> tuple[set[str], set[str]]:
    """Subjects the edits touch, and every prompt the evaluation reads for them."""
    subjects = {e.subject.strip().lower() for e in edits if e.subject}
    prompts: set[str] = set()
    for edit in edits:
        prompts.add(edit.prompt.strip())
        prompts.update(p.strip() for p in edit.rephrase_prompts)
        prompts.update(p.prompt.strip() for p in edit.locality_prompts)
    return subjects, prompts


def mentions(prompt: str, subjects: set[str]) -> bool:
    lowered = prompt.lower()
    return any(subject in lowered for subject in subjects)


def answers(record: EditRequest) -> set[str]:
    """The record's new and true answers, normalized for comparison."""
    return {a.strip().lower() for a in (record.target_new, record.target_true or "") if a.strip()}


def related(record: EditRequest, objects: set[str]) -> bool:
    """Whether a pool record's fact has an object some edit names (its true or new answer): for most
    datasets, a fact of the same relation, as the neighbours a locality metric probes."""
    return not answers(record).isdisjoint(objects)


def locality_prompts(
    pool: Sequence[EditRequest],
    edits: Sequence[EditRequest],
    num: int,
    seed: int,
    *,
    near_objects: bool = False,
) -> list[str]:
    """Up to ``num`` distinct pool prompts, drawn at random, that name no edited subject and are no probe.

    ``near_objects``: only records whose true or new answer is an object of some edit, with every prompt
    such a record has (its prompt, rephrasings and locality prompts), so that the supervision holds facts
    of the edited relations in place, not just any fact.
    """
    subjects, probes = excluded(edits)
    objects = set().union(*(answers(e) for e in edits))
    candidates: list[str] = []
    seen: set[str] = set()
    for record in pool:
        if record.subject and record.subject.strip().lower() in subjects:
            continue
        if near_objects:
            if not related(record, objects):
                continue
            texts = [record.prompt, *record.rephrase_prompts, *(p.prompt for p in record.locality_prompts)]
        else:
            texts = [record.prompt]
        for text in texts:
            prompt = text.strip()
            if prompt in probes or prompt in seen or mentions(prompt, subjects):
                continue
            seen.add(prompt)
            candidates.append(prompt)
    random.Random(seed).shuffle(candidates)
    return candidates[:num]


def write_jsonl(path: Path, prompts: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for prompt in prompts:
                handle.write(json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", required=True, help="dataset whose other records' prompts are drawn")
    parser.add_argument("--edits", required=True, nargs="+", help="edit file(s) to keep the pool apart from")
    parser.add_argument("--num", type=int, default=3000, help="prompts to write (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--near-objects",
        action="store_true",
        help="only records sharing an object with an edit (same relations), with all their prompts",
    )
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.num <= 0:
        parser.error("--num must be positive")
    edits = [request for path in args.edits for request in load_edits(path).requests]
    pool = load_edits(args.pool, skip_invalid=True).requests
    prompts = locality_prompts(pool, edits, args.num, args.seed, near_objects=args.near_objects)
    if not prompts:
        print(f"{args.pool}: no record left once edited subjects and probes are excluded", file=sys.stderr)
        return 1
    write_jsonl(args.out, prompts)
    print(f"wrote {len(prompts)} locality prompts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
