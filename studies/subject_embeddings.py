"""Edit facts through the input-embedding rows of the subjects' tokens: does that keep unrelated prompts?

A prompt that contains none of the tuned token ids computes exactly what the unedited model computes, so
its greedy answer (WILD locality) cannot move; a change to any MLP matrix reaches every prompt. This
trains, breadth-first (Adam, shuffled batches, cross-entropy on the targets as ``locft edit`` encodes
them, the same early stop), a delta on the *input* embedding rows of the edited subjects' tokens only and
scores the result with ``locft``'s own evaluation (teacher-forced, greedy EM and WILD; locality against the
unedited model).

    python studies/subject_embeddings.py --model smollm2 --edits cf500.jsonl --limit 100 \
        --preserve locality.jsonl --max-share 0.001 --rarest --paraphrases 2 --lr 3e-2 --out emb.json

Which rows: the tokens that overlap the subject's characters in the edit prompt, minus *common* ones:
tokens found in more than ``--max-share`` of the ``--preserve`` prompts (``studies/locality_file.py``
makes that file from other records; never the evaluated probes), which would carry the edit into
unrelated text (" of", " The", frequent first names). ``--rarest`` keeps each subject's rarest token when
all of its tokens are common, so that every edit has a row. ``--paraphrases`` adds pseudo-paraphrases as
``locft edit`` makes them (``augment.paraphrases``: text the unedited model samples, put before the
prompt). The delta leaves the output layer alone, also when it shares its weight with the input
embedding (``--tied`` applies it to both, as a tied checkpoint would).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from locft_dist.edits.augment import paraphrase_prompt, sample_prefixes
from locft_dist.edits.encode import collate, encode_pairs, pad_token_id
from locft_dist.edits.formats import load_edits
from locft_dist.edits.schema import EditRequest
from locft_dist.eval.evaluate import EvalSettings, Evaluator
from locft_dist.losses import forward_losses
from locft_dist.model import load_model, load_tokenizer
from locft_dist.outputs import write_json
from locft_dist.subject_rows import document_frequency, subject_token_ids


def choose_rows(
    tokenizer, requests: Sequence[EditRequest], frequency: Counter, max_count: float, *, rarest: bool
) -> tuple[list[int], int]:
    """The token ids to tune (sorted) and how many edits got none."""
    rows: set[int] = set()
    without = 0
    for request in requests:
        ids = subject_token_ids(tokenizer, request.prompt, request.subject or "")
        kept = [token for token in ids if frequency.get(token, 0) <= max_count]
        if rarest and not kept and ids:
            kept = [min(ids, key=lambda token: frequency.get(token, 0))]
        without += not kept
        rows.update(kept)
    return sorted(rows), without


class EmbeddingRowDelta:
    """``embedding(ids) + delta[slot(ids)]`` for the chosen rows; ``delta`` is the only trainable tensor.

    With ``tied`` the output layer's logits of those rows move too (``hidden @ delta.T``), as they would if
    the delta were added to a weight the input and output layers share."""

    def __init__(self, model: nn.Module, rows: Sequence[int], *, tied: bool = False) -> None:
        embedding = model.get_input_embeddings()
        self.rows = torch.tensor(list(rows), dtype=torch.long)
        self.slot = torch.full((embedding.num_embeddings,), -1, dtype=torch.long)
        self.slot[self.rows] = torch.arange(len(self.rows))
        self.delta = torch.zeros(len(self.rows), embedding.embedding_dim, requires_grad=True)
        self.handles = [embedding.register_forward_hook(self._add_rows)]
        if tied:
            self.handles.append(model.get_output_embeddings().register_forward_hook(self._add_logits))

    def _add_rows(
        self, _module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> torch.Tensor:
        slot = self.slot[args[0].cpu()].to(out.device)
        hit = slot >= 0
        extra = torch.zeros_like(out)
        extra[hit] = self.delta.to(out)[slot[hit]]
        return out + extra

    def _add_logits(
        self, _module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> torch.Tensor:
        out = out.clone()
        out[..., self.rows.to(out.device)] += args[0] @ self.delta.to(out).T
        return out

    def touches(self, tokenizer, prompt: str) -> bool:
        return not set(tokenizer(prompt)["input_ids"]).isdisjoint(self.rows.tolist())


def train(model, examples, delta: EmbeddingRowDelta, *, epochs: int, batch_size: int, lr: float, pad: int):
    """Breadth-first with ``locft``'s early stop (epoch mean loss < 0.01); returns the epochs' mean losses."""
    optimizer = torch.optim.Adam([delta.delta], lr=lr)
    generator = torch.Generator().manual_seed(0)
    losses: list[float] = []
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        total = 0.0
        for first in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[first : first + batch_size]], pad)
            per_example = forward_losses(model, batch)
            loss = per_example.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(per_example)
        losses.append(total / len(examples))
        print(f"epoch {epoch + 1}: mean loss {losses[-1]:.4f}", flush=True)
        if losses[-1] < 0.01:
            break
    return losses


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    requests = load_edits(args.edits, limit=args.limit).requests
    preserved = [json.loads(line)["prompt"] for line in Path(args.preserve).read_text().splitlines() if line]
    frequency = document_frequency(tokenizer, preserved)
    rows, without = choose_rows(
        tokenizer, requests, frequency, args.max_share * len(preserved), rarest=args.rarest
    )
    evaluator = Evaluator(tokenizer, requests, settings=EvalSettings(batch_size=args.eval_batch_size))
    reference, before = evaluator.unedited(model)
    delta = EmbeddingRowDelta(model, rows, tied=args.tied)
    neighbours = [probe.prompt for r in requests for probe in r.locality_prompts]
    touched = sum(delta.touches(tokenizer, prompt) for prompt in neighbours)
    prompts = [r.prompt for r in requests]
    targets = [r.target_new for r in requests]
    if args.paraphrases:
        prefixes = sample_prefixes(
            model, tokenizer, len(requests) * args.paraphrases, args.paraphrase_tokens, 0
        )
        for copy in range(args.paraphrases):
            chunk = prefixes[copy * len(requests) : (copy + 1) * len(requests)]
            prompts += [
                paraphrase_prompt(prefix, r.prompt) for prefix, r in zip(chunk, requests, strict=True)
            ]
            targets += [r.target_new for r in requests]
    examples = encode_pairs(tokenizer, prompts, targets)
    model.train()
    losses = train(
        model,
        examples,
        delta,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        pad=pad_token_id(tokenizer),
    )
    model.eval()
    after = evaluator.edited(model, reference)
    base_rows = model.get_input_embeddings().weight[delta.rows]
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "num_edits": len(requests),
        "rows": len(rows),
        "edits_without_rows": without,
        "neighbours_touching_rows": touched,
        "num_neighbours": len(neighbours),
        "relative_row_norm": float(delta.delta.detach().norm(dim=1).mean() / base_rows.norm(dim=1).mean()),
        "epoch_losses": losses,
        "unedited": before.to_dict(),
        "edited": after.to_dict(),
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--edits", required=True, help="edit file (any format locft reads) with subjects")
    parser.add_argument("--limit", type=int, default=100, help="edits to train and evaluate")
    parser.add_argument("--preserve", required=True, help='JSONL of {"prompt": ...}: which tokens are common')
    parser.add_argument("--max-share", type=float, default=0.001, help="common: in more than this share")
    parser.add_argument("--rarest", action="store_true", help="an all-common subject keeps its rarest token")
    parser.add_argument("--tied", action="store_true", help="move the output layer's rows too")
    parser.add_argument("--paraphrases", type=int, default=2, help="pseudo-paraphrases per edit")
    parser.add_argument("--paraphrase-tokens", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--out", required=True, help="JSON of the settings and both models' metrics")
    args = parser.parse_args(argv)
    result = run(args)
    write_json(args.out, result, indent=2)  # temporary name, then renamed
    edited = result["edited"]
    row = " | ".join(
        f"{edited[key]:.3f}" if edited.get(key) is not None else "-"
        for key in (
            "reliability_tf",
            "generalization_tf",
            "locality_tf",
            "reliability_wild",
            "generalization_wild",
            "locality_wild",
        )
    )
    print(
        f"| {result['rows']} rows, {result['neighbours_touching_rows']}/{result['num_neighbours']} neighbours"
        f" touch them | {row} | {result['seconds']:.0f} s |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
