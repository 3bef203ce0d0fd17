"""Whole-process time of `locft edit` against a plain Hugging Face script, start-up and saving included.

    python benchmarks/whole_process.py --model /tmp/smol/model --edits counterfact.jsonl --num-edits 200
    python benchmarks/whole_process.py --toy            # the 8-layer, 256-wide toy, 200 edits x 10 epochs

Each side runs as its own process, timed from launch to exit: `locft edit` (evaluation off, one process,
a fresh token cache) and `benchmarks/naive_edit.py` (torch + transformers, the LocFT authors' compute), on
the same edit file, layer, epochs, batch size and learning rate. Both print how long their training loop
took; the table shows that next to the whole process.

`--toy` builds the toy in a temporary directory first (not timed): a randomly initialized Llama of
`cost_model.SHAPES["tiny"]` (8 layers, hidden 256) with a 512-token BPE trained on synthetic edits.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_toy(out: Path, num_edits: int) -> tuple[Path, Path]:
    """(model directory, edit file) of the toy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from locft_dist.cost_model import SHAPES
    from locft_dist.demo.synthetic import synthetic_edits
    from locft_dist.demo.tokenizer import train_tokenizer
    from locft_dist.edits import write_jsonl

    requests = list(synthetic_edits(num_edits, seed=0))
    edits = out / "edits.jsonl"
    write_jsonl(requests, edits)
    model_dir = out / "toy"
    tokenizer = train_tokenizer([f"{r.prompt} {r.target_new}" for r in requests], model_dir, vocab_size=512)
    shape = SHAPES["tiny"]
    import torch

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    return model_dir, edits


def first_edits(source: str, num: int, out: Path) -> Path:
    """The first ``num`` edits of any supported file, as canonical JSONL (what both sides read)."""
    from locft_dist.edits import load_edits, write_jsonl

    path = out / "edits.jsonl"
    write_jsonl(load_edits(source, limit=num).requests, path)
    return path


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def trained_seconds(output: str) -> float:
    match = re.search(r"trained in ([0-9.]+) ?s", output)
    if not match:
        raise SystemExit(f"no 'trained in' line in:\n{output[-2000:]}")
    return float(match.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="Hugging Face model directory")
    parser.add_argument("--edits", help="edit file (any format `locft convert` reads)")
    parser.add_argument("--toy", action="store_true", help="build and use the 8-layer toy")
    parser.add_argument("--num-edits", type=int, default=200)
    parser.add_argument("--epochs", type=int, help="default: 5 (--model), 10 (--toy)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--keep", help="run in this directory and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.toy == bool(args.model):
        parser.error("give --model (with --edits) or --toy")
    epochs = args.epochs or (10 if args.toy else 5)
    work = Path(args.keep or tempfile.mkdtemp(prefix="locft-whole-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.toy:
        model_dir, edits = build_toy(work, args.num_edits)
    else:
        if not args.edits:
            parser.error("--model needs --edits")
        model_dir, edits = Path(args.model), first_edits(args.edits, args.num_edits, work)
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}  # a first run: no token cache yet
    naive = [sys.executable, str(HERE / "naive_edit.py"), str(model_dir), str(edits), str(work / "naive.st")]
    naive += ["--layer", str(args.layer), "--epochs", str(epochs), "--batch-size", str(args.batch_size)]
    naive += ["--lr", str(args.lr)]
    locft = [sys.executable, "-m", "locft_dist.cli", "edit", f"model.path={model_dir}", f"edits.path={edits}"]
    locft += [
        f"locate.layers=[{args.layer}]",
        f"train.epochs={epochs}",
        f"train.batch_size={args.batch_size}",
    ]
    locft += [
        f"train.lr={args.lr}",
        "train.early_stop_loss=null",
        "eval.enabled=false",
        "train.progress=false",
    ]
    locft += ["dist.strategy=none", "model.device=cpu", f"output.dir={work / 'run'}", "output.overwrite=true"]
    rows = {}
    for name, command in (("naive script", naive), ("locft edit", locft)):
        seconds, output = timed(command, env)
        rows[name] = (seconds, trained_seconds(output))
    (n_whole, n_train), (l_whole, l_train) = rows["naive script"], rows["locft edit"]
    print(
        f"{model_dir.name}: {args.num_edits} edits x {epochs} epochs, batch {args.batch_size}, layer "
        f"{args.layer} down_proj, CPU, one process"
    )
    print(f"{'':32}{'naive script':>14}{'locft edit':>12}{'ratio':>8}")
    for label, a, b in (
        ("whole process s", n_whole, l_whole),
        ("training loop s", n_train, l_train),
        ("the rest (start-up, load, save) s", n_whole - n_train, l_whole - l_train),
    ):
        print(f"{label:32}{a:14.1f}{b:12.1f}{a / b:8.2f}")


if __name__ == "__main__":
    main()
