"""A plain Hugging Face editing script at the LocFT authors' compute: the yardstick for a whole `locft edit`.

    python benchmarks/naive_edit.py MODEL_DIR EDITS.jsonl DELTA.safetensors --epochs 5 --batch-size 50

It imports torch and transformers only, loads the model, reads a canonical JSONL edit file, encodes each
edit as `locft edit` does (prompt and " " + target + EOS tokenized apart), then trains one layer's
`mlp.down_proj` with Adam: each epoch a seeded shuffle, every batch padded to its longest edit, the whole
model run forward, logits at every position over the whole vocabulary in float32, per-edit mean target
cross-entropy. It writes the delta (trained - base, float32) as safetensors and prints the training time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir")
    parser.add_argument("edits")
    parser.add_argument("out")
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    layers = model.model.layers
    name = f"model.layers.{args.layer % len(layers)}.mlp.down_proj.weight"
    for param_name, param in model.named_parameters():
        param.requires_grad_(param_name == name)
    param = dict(model.named_parameters())[name]
    base = param.detach().clone()

    with open(args.edits, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    prompts = tokenizer([r["prompt"] for r in records])["input_ids"]
    targets = tokenizer([" " + r["target_new"] for r in records], add_special_tokens=False)["input_ids"]
    examples = [(p, [*t, tokenizer.eos_token_id]) for p, t in zip(prompts, targets, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    optimizer = torch.optim.Adam([param], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        total = 0.0
        for begin in range(0, len(order), args.batch_size):
            batch = [examples[i] for i in order[begin : begin + args.batch_size]]
            width = max(len(p) + len(t) for p, t in batch)
            ids = torch.full((len(batch), width), pad)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100)
            for row, (p, t) in enumerate(batch):
                ids[row, : len(p) + len(t)] = torch.tensor(p + t)
                mask[row, : len(p) + len(t)] = 1
                labels[row, len(p) : len(p) + len(t)] = torch.tensor(t)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            shifted = labels[:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="none"
            ).view(shifted.shape)
            real = (shifted != -100).float()
            loss = ((token_loss * real).sum(1) / real.sum(1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch}: mean loss {total / len(examples):.4f}", flush=True)
    seconds = time.perf_counter() - start
    save_file({name: (param.detach() - base).contiguous()}, args.out)
    print(f"trained in {seconds:.2f} s")


if __name__ == "__main__":
    main()
