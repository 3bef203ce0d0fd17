"""Which layers carry the subject? A probe for choosing where to edit a model.

Fine-tuning an MLP output projection (``mlp.down_proj``) writes into the directions of its inputs, the
"keys". This prints, per layer, the mean cosine similarity of those keys in the unedited model:

* at the prompt's last token: an edit prompt vs its rephrase (same subject, other words), vs its locality
  probe (CounterFact's: another subject, same relation) and vs a random other edit;
* at the subject's last token: an edit prompt vs its rephrase, and vs a random other edit's subject.

A layer whose subject-token key is close across rephrases and far across subjects addresses the subject
itself; where the last-token key is closer to the neighbour's than to the rephrase's, that layer's update
bleeds into same-relation neighbours.

    python studies/subject_keys.py --model smollm2 --edits scan200.jsonl --out keys.json

``--edits`` needs ``subject``, one rephrase and one locality prompt per record (CounterFact has them).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from locft_dist.edits.formats import load_edits
from locft_dist.locate import find_decoder_layers, resolve_location
from locft_dist.model import load_model, load_tokenizer

BATCH = 32


def subject_end(tokenizer, prompt: str, subject: str) -> int | None:
    """Index of the last token overlapping the subject's first occurrence (None if it does not occur)."""
    start = prompt.find(subject)
    if start < 0:
        return None
    end = start + len(subject)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    hits = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
    return hits[-1] if hits else None


class KeyProbe:
    """The down_proj inputs of every layer, read by forward pre-hooks."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.num_layers = find_decoder_layers(model).num_layers
        location = resolve_location(model, list(range(self.num_layers)), ["mlp.down_proj"])
        self.captured: dict[int, torch.Tensor] = {}
        for layer, name in enumerate(location.parameter_names):
            module = model.get_submodule(name.rsplit(".", 1)[0])
            module.register_forward_pre_hook(self._hook(layer))

    def _hook(self, layer: int):
        def capture(_module, args) -> None:
            self.captured[layer] = args[0].detach()

        return capture

    @torch.no_grad()
    def keys(self, items: Sequence[tuple[str, int | None]]) -> torch.Tensor:
        """[N, layers, intermediate] keys at each (prompt, position); None = the last token."""
        out = []
        for first in range(0, len(items), BATCH):
            chunk = items[first : first + BATCH]
            prompts = [p for p, _ in chunk]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="right")
            self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            last = (enc["attention_mask"].sum(1) - 1).tolist()
            pos = torch.tensor([end if p is None else p for (_, p), end in zip(chunk, last, strict=True)])
            rows = torch.arange(len(chunk))
            out.append(torch.stack([self.captured[j][rows, pos] for j in range(self.num_layers)], dim=1))
        return torch.cat(out)


def probe(model_path: str, edits_path: str, limit: int | None) -> dict[str, list[float]]:
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    requests = [
        r for r in load_edits(edits_path, limit=limit).requests if r.rephrase_prompts and r.locality_prompts
    ]
    if len(requests) < 2:
        raise SystemExit(f"{edits_path}: need at least 2 edits with a rephrase and a locality prompt")
    keys = KeyProbe(model, tokenizer)
    cos = torch.nn.functional.cosine_similarity
    generator = torch.Generator().manual_seed(0)
    edit = keys.keys([(r.prompt, None) for r in requests])
    rephrase = keys.keys([(r.rephrase_prompts[0], None) for r in requests])
    neighbour = keys.keys([(r.locality_prompts[0].prompt, None) for r in requests])
    other = torch.randperm(len(requests), generator=generator)
    result = {
        "last_token_rephrase": cos(edit, rephrase, dim=-1).mean(0),
        "last_token_neighbour": cos(edit, neighbour, dim=-1).mean(0),
        "last_token_other": cos(edit, edit[other], dim=-1)[other != torch.arange(len(requests))].mean(0),
    }
    pairs = []
    for r in requests:
        at_edit = subject_end(tokenizer, r.prompt, r.subject or "")
        at_rephrase = subject_end(tokenizer, r.rephrase_prompts[0], r.subject or "")
        if at_edit is not None and at_rephrase is not None:
            pairs.append(((r.prompt, at_edit), (r.rephrase_prompts[0], at_rephrase)))
    if len(pairs) >= 2:
        subject = keys.keys([a for a, _ in pairs])
        subject_rephrase = keys.keys([b for _, b in pairs])
        other = torch.randperm(len(pairs), generator=generator)
        result["subject_rephrase"] = cos(subject, subject_rephrase, dim=-1).mean(0)
        distinct = other != torch.arange(len(pairs))
        result["subject_other"] = cos(subject, subject[other], dim=-1)[distinct].mean(0)
    return {name: values.tolist() for name, values in result.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--edits", required=True, help="edit file with subjects, rephrases, locality prompts")
    parser.add_argument("--limit", type=int, default=200, help="edits to probe (default 200)")
    parser.add_argument("--out", type=Path, help="also write the per-layer means as JSON")
    args = parser.parse_args(argv)
    result = probe(args.model, args.edits, args.limit)
    names = list(result)
    print("layer  " + "  ".join(names))
    for layer in range(len(result[names[0]])):
        print(f"{layer:5d}  " + "  ".join(f"{result[n][layer]:{len(n)}.2f}" for n in names))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
