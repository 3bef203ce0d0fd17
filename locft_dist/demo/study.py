"""Measurements behind docs/demo.md, on a world built by ``locft demo``.

    python -m locft_dist.demo.study --demo demo_out [--layers 0 1 2 3] [--lrs 5e-4 2e-3 5e-3 1e-2]
    python -m locft_dist.demo.study --demo demo_out --skip authors sweep --widths 64 128 256

Prints markdown tables: (1) ``locft edit`` vs the authors' loop at the authors' settings, (2) a layer x lr
sweep of LocFT-BF (reliability / generalization / locality, teacher-forced), (3) optionally the same edits on
models of other widths pretrained on the same world.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from locft_dist.config import load_config
from locft_dist.demo.build import FULL, build_from_spec
from locft_dist.edit_job import run_edit
from locft_dist.edits import load_edits, write_jsonl
from locft_dist.eval import EditMetrics, compute_reference, evaluate_edits
from locft_dist.locate import resolve_location
from locft_dist.model import load_model, load_tokenizer
from locft_dist.reference_loop import run_reference_loop
from locft_dist.runlog import setup_logging

logger = logging.getLogger(__name__)


def edit_metrics(model_dir: Path, edits: Path, heldout: Path, out: Path, overrides: list[str]) -> dict:
    """Run ``locft edit`` with the demo's model and edits plus ``overrides``; return its metrics record."""
    base = [
        f"model.path={model_dir}",
        f"edits.path={edits}",
        f"eval.heldout_path={heldout}",
        f"output.dir={out}",
        "output.overwrite=true",
        "train.progress=false",
        "model.device=cpu",
    ]
    outcome = run_edit(load_config(None, base + overrides))
    record = json.loads((outcome.run_dir / "metrics.json").read_text())
    return {
        **record["edited"],
        "seconds": record["train"]["seconds"],
        "epochs": record["train"]["epochs_run"],
    }


def reference_loop_metrics(
    model_dir: Path, edits: Path, heldout: Path, layer: int, *, lr: float, batch_size: int, epochs: int
) -> dict:
    """The authors' loop on the same model and edits, evaluated by the same code."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    requests = load_edits(edits).requests
    texts = heldout.read_text().splitlines()
    reference = compute_reference(model, tokenizer, requests)
    names = resolve_location(model, [layer], ["mlp.down_proj"]).parameter_names
    result = run_reference_loop(
        model, tokenizer, requests, names, lr=lr, batch_size=batch_size, epochs=epochs
    )
    metrics: EditMetrics = evaluate_edits(model, tokenizer, requests, reference, heldout_texts=texts)
    return {**metrics.to_dict(), "seconds": result.seconds, "epochs": len(result.epoch_losses)}


def width_row(demo: Path, width: int, layer: int, lr: float) -> str:
    """Pretrain the demo's world at another width, make the same edits, edit with LocFT-BF."""
    spec = replace(FULL, name=f"full-w{width}", hidden_size=width, intermediate_size=4 * width, max_epochs=16)
    built = build_from_spec(demo / f"width_{width}", spec, seed=0, progress=False)
    num_edits = sum(1 for _ in (demo / "edits.jsonl").open())
    requests = built.world.make_edits(num_edits, seed=0)
    edits, heldout = built.out_dir / "edits.jsonl", built.out_dir / "heldout.txt"
    write_jsonl(requests, edits)
    heldout.write_text("\n".join(built.world.heldout_texts(200, 0, exclude=requests)) + "\n")
    m = edit_metrics(
        built.model_dir,
        edits,
        heldout,
        built.out_dir / "run",
        [f"locate.layers=[{layer}]", f"train.lr={lr}", "train.batch_size=50", "train.epochs=25"],
    )
    report = built.report
    return (
        f"| {width} / {4 * width} | {report.num_parameters / 1e6:.2f}M | {report.knowledge_template0:.3f} |"
        + row("", m).split("|  |", 1)[1]
    )


def row(name: str, m: dict) -> str:
    def f(key: str) -> str:
        value = m.get(key)
        return "-" if value is None else f"{value:.3f}"

    return (
        f"| {name} | {f('reliability_tf')} | {f('generalization_tf')} | {f('locality_tf')} | "
        f"{f('reliability_em')} | {f('generalization_em')} | {f('locality_em')} | {f('perplexity')} | "
        f"{m.get('epochs', '-')} | {m.get('seconds', 0):.1f} |"
    )


HEADER = (
    "| run | rel TF | gen TF | loc TF | rel EM | gen EM | loc EM | ppl | epochs | train s |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo", required=True, help="directory written by `locft demo`")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 2e-3, 5e-3, 1e-2])
    parser.add_argument("--authors-layer", type=int, default=1)
    parser.add_argument("--authors-lrs", type=float, nargs="+", default=[5e-4, 5e-3])
    parser.add_argument(
        "--widths", type=int, nargs="*", default=[], help="also pretrain these widths and edit"
    )
    parser.add_argument("--width-lr", type=float, default=5e-3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["authors", "sweep"])
    args = parser.parse_args(argv)
    setup_logging(False)
    torch.manual_seed(0)
    demo = Path(args.demo)
    model_dir, edits, heldout = demo / "base_model", demo / "edits.jsonl", demo / "heldout.txt"
    work = demo / "study"
    start = time.perf_counter()
    if "authors" not in args.skip:
        layer = args.authors_layer
        print(
            f"\n### The authors' loop vs `locft edit` (Adam, batch 100, 25 epochs, layer {layer} down_proj)\n"
        )
        print(HEADER)
        for lr in args.authors_lrs:
            ours = edit_metrics(
                model_dir,
                edits,
                heldout,
                work / f"authors_locft_lr{lr:g}",
                [
                    f"locate.layers=[{layer}]",
                    f"train.lr={lr}",
                    "train.batch_size=100",
                    "train.epochs=25",
                    "train.skip_loss_below=0.01",
                ],
            )
            print(row(f"locft edit, lr {lr:g}", ours))
            theirs = reference_loop_metrics(
                model_dir, edits, heldout, layer, lr=lr, batch_size=100, epochs=25
            )
            print(row(f"authors' loop, lr {lr:g}", theirs), flush=True)
    if "sweep" not in args.skip:
        print("\n### LocFT-BF, layer x lr (down_proj, batch 50, 25 epochs): rel TF / gen TF / loc TF\n")
        print("| layer | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |")
        print("|---|" + "---|" * len(args.lrs))
        for layer in args.layers:
            cells = []
            for lr in args.lrs:
                m = edit_metrics(
                    model_dir,
                    edits,
                    heldout,
                    work / f"sweep_l{layer}_lr{lr:g}",
                    [
                        f"locate.layers=[{layer}]",
                        f"train.lr={lr}",
                        "train.batch_size=50",
                        "train.epochs=25",
                        "eval.generation=false",
                    ],
                )
                cells.append(
                    f"{m['reliability_tf']:.2f} / {m['generalization_tf']:.2f} / {m['locality_tf']:.2f}"
                )
            print(f"| {layer} | " + " | ".join(cells) + " |", flush=True)
    if args.widths:
        print(
            f"\n### Model width (layer {args.authors_layer} down_proj, lr {args.width_lr:g}, "
            "batch 50, 25 epochs)\n"
        )
        print("| hidden / MLP | params | knew | " + HEADER.split("| run | ")[1].split("\n")[0])
        print("|---" * 13 + "|")
        for width in args.widths:
            print(width_row(demo, width, args.authors_layer, args.width_lr), flush=True)
    print(f"\n(study took {time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
