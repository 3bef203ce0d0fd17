"""Fine-tuning inside the null space of preserved keys: does it keep unrelated prompts' answers?

A change ``dW`` to an MLP output projection moves a prompt's hidden state by ``dW @ k`` for each of its
keys ``k`` (the projection's inputs). If ``dW`` only acts on directions the keys of *preserved* text hardly
use, ``dW = D @ P`` with ``P`` the projection onto the eigenvectors of the preserved keys' second-moment
matrix that hold the lowest ``--energy`` fraction of its trace, then preserved prompts keep their
outputs by construction, and an edit must be written through what its own keys have there.

This trains the edits breadth-first (Adam, shuffled batches, cross-entropy on the target tokens as
``locft edit`` encodes them) with ``D`` as the only trainable tensors and scores the result with
``locft``'s own evaluation (teacher-forced, greedy EM and WILD; locality against the unedited model), next
to the same loop without the projection (``--energy 1``: ``P`` is the identity).

    python studies/null_space.py --model smollm2 --edits cf500.jsonl --limit 100 \
        --preserve locality.jsonl --layers 2 3 4 5 6 --energy 0.01 --lr 2e-2 --out ns.json

``--preserve`` is a JSONL of ``{"prompt": ...}`` (``studies/locality_file.py`` makes one from other
records; never the evaluated probes). Keys are read at every position of each preserved prompt and of its
greedy continuation (``--continuation`` tokens), where WILD's locality is decided.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from locft_dist.edits.encode import collate, encode_pairs, pad_token_id
from locft_dist.edits.formats import load_edits
from locft_dist.eval.evaluate import EvalSettings, Evaluator
from locft_dist.eval.generate import greedy_generate
from locft_dist.locate import resolve_location
from locft_dist.losses import forward_losses
from locft_dist.model import load_model, load_tokenizer
from locft_dist.outputs import write_json


def tuned_modules(model: nn.Module, layers: Sequence[int], module: str) -> list[nn.Linear]:
    names = resolve_location(model, list(layers), [module]).parameter_names
    return [model.get_submodule(name.rsplit(".", 1)[0]) for name in names]


@torch.no_grad()
def key_moments(
    model: nn.Module, tokenizer, modules: Sequence[nn.Linear], prompts: Sequence[str], continuation: int
) -> tuple[list[torch.Tensor], int]:
    """Per module, the float64 sum of ``k k^T`` over every key of the prompts and their continuations."""
    moments = [torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in modules]
    valid: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def add(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if "mask" in valid:
                keys = args[0][valid["mask"]].double()
                moments[index] += keys.T @ keys

        return add

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    pad = pad_token_id(tokenizer)
    never_stop = torch.zeros(model.config.vocab_size, dtype=torch.bool)  # fixed-length continuations
    count = 0
    try:
        for first in range(0, len(prompts), 64):
            ids = [tokenizer(p)["input_ids"] for p in prompts[first : first + 64]]
            if continuation > 0:
                more = greedy_generate(model, ids, max_new_tokens=continuation, pad_id=pad, stop=never_stop)
                ids = [p + g for p, g in zip(ids, more, strict=True)]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.bool)
            for row, x in enumerate(ids):
                input_ids[row, : len(x)] = torch.tensor(x)
                mask[row, : len(x)] = True
            valid["mask"] = mask
            model.get_decoder()(input_ids=input_ids, attention_mask=mask.long())
            valid.clear()
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return moments, count


def null_space_projection(moment: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """Projection onto the eigenvectors of ``moment`` that together hold at most ``energy`` of its trace
    (the identity for ``energy >= 1``), and their number."""
    if energy >= 1:
        return torch.eye(moment.shape[0]), moment.shape[0]
    values, vectors = torch.linalg.eigh(moment)
    values = values.clamp_min(0)
    keep = int((values.cumsum(0) / values.sum() <= energy).sum())
    basis = vectors[:, :keep]
    return (basis @ basis.T).float(), keep


class ProjectedDelta:
    """``module(x) + x @ (D @ P)^T`` on each tuned module, ``D`` trainable; the product is cached
    outside autograd (evaluation)."""

    def __init__(self, modules: Sequence[nn.Linear], projections: Sequence[torch.Tensor]) -> None:
        self.deltas = [torch.zeros_like(m.weight, requires_grad=True) for m in modules]
        self.projections = list(projections)
        self._frozen: dict[int, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def effective(self, index: int) -> torch.Tensor:
        return self.deltas[index] @ self.projections[index]

    def _hook(self, index: int):
        def add(_module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():
                self._frozen.clear()
                return out + F.linear(args[0], self.effective(index))
            if index not in self._frozen:
                self._frozen[index] = self.effective(index).detach()
            return out + F.linear(args[0], self._frozen[index])

        return add


def train(model, examples, delta: ProjectedDelta, *, epochs: int, batch_size: int, lr: float, pad: int):
    """Breadth-first: every epoch visits every edit once in a new order; returns the epochs' mean losses."""
    optimizer = torch.optim.Adam(delta.deltas, lr=lr)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        total = 0.0
        for first in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[first : first + batch_size]], pad)
            per_example = forward_losses(model, batch)  # locft's loss: mean CE over each target
            loss = per_example.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(per_example)
        losses.append(total / len(examples))
    return losses


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    requests = load_edits(args.edits, limit=args.limit).requests
    modules = tuned_modules(model, args.layers, args.module)
    preserved = [json.loads(line)["prompt"] for line in Path(args.preserve).read_text().splitlines() if line]
    preserved = preserved[: args.preserve_num]
    moments, num_keys = key_moments(model, tokenizer, modules, preserved, args.continuation)
    projections, dims = zip(*(null_space_projection(m, args.energy) for m in moments), strict=True)
    evaluator = Evaluator(tokenizer, requests, settings=EvalSettings(batch_size=args.eval_batch_size))
    reference, before = evaluator.unedited(model)
    delta = ProjectedDelta(modules, projections)
    examples = encode_pairs(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
    pad = pad_token_id(tokenizer)
    model.train()
    losses = train(
        model, examples, delta, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, pad=pad
    )
    model.eval()
    after = evaluator.edited(model, reference)
    relative = [float(delta.effective(i).detach().norm() / m.weight.norm()) for i, m in enumerate(modules)]
    return {
        "energy": args.energy,
        "layers": list(args.layers),
        "module": args.module,
        "lr": args.lr,
        "epochs": args.epochs,
        "num_edits": len(requests),
        "num_preserved_keys": num_keys,
        "null_space_dims": list(dims),
        "relative_update_norm": relative,
        "epoch_losses": losses,
        "unedited": before.to_dict(),
        "edited": after.to_dict(),
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--edits", required=True, help="edit file (any format locft reads)")
    parser.add_argument("--limit", type=int, default=100, help="edits to train and evaluate")
    parser.add_argument("--preserve", required=True, help='JSONL of {"prompt": ...}: text to keep as is')
    parser.add_argument("--preserve-num", type=int, default=1500, help="preserved prompts to read")
    parser.add_argument("--continuation", type=int, default=16, help="greedy tokens read per prompt")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    parser.add_argument("--module", default="mlp.down_proj")
    parser.add_argument("--energy", type=float, default=0.01, help="null space: this fraction of the trace")
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--epochs", type=int, default=10)
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
    dims = result["null_space_dims"]
    print(f"| energy {args.energy}, null space {dims} | {row} | {result['seconds']:.0f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
