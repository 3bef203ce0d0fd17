"""Which edits a subject-row delta (``locate.subject_embeddings``) does not learn, and why.

A row is one token's input embedding: an edit whose subject has one frequent token, or shares its rows
with another edit's subject that has another target, has little room to hold its fact. This applies the
delta (untying as the run did), checks every edit prompt teacher-forced (argmax at each target token, the
run's own encoding) and prints how many rows the learned and unlearned edits have, how many share a row
with an edit of another target, and the unlearned edits.

    python studies/subject_row_failures.py --model smollm2 --edits cf500.jsonl \
        --delta runs/smol_subjects/delta.safetensors --json failures.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from locft_dist.delta import apply_delta_to_model, read_delta
from locft_dist.edits.encode import encode_pairs
from locft_dist.edits.formats import load_edits
from locft_dist.model import load_model, load_tokenizer
from locft_dist.subject_rows import input_embedding_name, subject_token_ids


def edit_rows(tokenizer, requests, moved: set[int]) -> list[list[int]]:
    """Each edit's tuned rows: its subject's tokens that the delta moved."""
    return [
        [t for t in subject_token_ids(tokenizer, r.prompt, r.subject or "") if t in moved] for r in requests
    ]


def shares_a_row(rows: list[list[int]], targets: list[str]) -> list[bool]:
    """Whether an edit shares a row with another edit whose target differs."""
    targets_of_row: dict[int, set[str]] = defaultdict(set)
    for edit_rows_, target in zip(rows, targets, strict=True):
        for row in edit_rows_:
            targets_of_row[row].add(target)
    return [any(len(targets_of_row[row]) > 1 for row in r) for r in rows]


@torch.no_grad()
def learned(model, tokenizer, requests, encoding) -> list[bool]:
    """Teacher-forced: does the model's argmax give every target token of the edit prompt?"""
    prompts, answers = [r.prompt for r in requests], [r.target_new for r in requests]
    examples = encode_pairs(tokenizer, prompts, answers, encoding)
    result = []
    for example in examples:
        ids = torch.tensor([example.input_ids])
        start = example.num_prompt_tokens
        predicted = model(input_ids=ids).logits[0, start - 1 : -1].argmax(-1)
        result.append(bool(torch.equal(predicted, ids[0, start:])))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--edits", required=True)
    parser.add_argument("--delta", required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the summary and the unlearned edits here")
    args = parser.parse_args(argv)

    tokenizer, model = load_tokenizer(args.model), load_model(args.model).eval()
    delta = read_delta(args.delta)
    apply_delta_to_model(model, delta, source=args.model)
    name = input_embedding_name(model)
    if name not in delta.tensors:
        raise SystemExit(f"{args.delta}: no {name!r}; not a locate.subject_embeddings delta")
    moved = set(delta.tensors[name].ne(0).any(dim=1).nonzero().flatten().tolist())
    requests = load_edits(args.edits, limit=args.limit).requests
    rows = edit_rows(tokenizer, requests, moved)
    shared = shares_a_row(rows, [r.target_new for r in requests])
    ok = learned(model, tokenizer, requests, delta.encoding)

    def group(flag: bool) -> dict:
        picked = [i for i, o in enumerate(ok) if o == flag]
        return {
            "edits": len(picked),
            "mean_rows": round(sum(len(rows[i]) for i in picked) / max(1, len(picked)), 2),
            "share_a_row": sum(shared[i] for i in picked),
        }

    summary = {
        "learned": group(True),
        "not_learned": group(False),
        "unlearned_edits": [
            {"subject": r.subject, "target_new": r.target_new, "rows": len(rows[i]), "shared": shared[i]}
            for i, r in enumerate(requests)
            if not ok[i]
        ],
    }
    print("| edits | count | mean rows | share a row with another target |")
    print("|---|---:|---:|---:|")
    for label, key in (("learned", "learned"), ("not learned", "not_learned")):
        g = summary[key]
        print(f"| {label} | {g['edits']} | {g['mean_rows']} | {g['share_a_row']} |")
    for edit in summary["unlearned_edits"]:
        edited = f"{edit['subject']!r} -> {edit['target_new']!r}"
        print(f"  {edited}: {edit['rows']} rows, shared: {edit['shared']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
