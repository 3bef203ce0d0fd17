"""The LocFT ablation on the demo world: from depth-first editing to LocFT-BF, one change at a time.

``python -m locft_dist.demo.ablation --demo /tmp/demo_full`` (reuses the world and model that
``locft demo --out /tmp/demo_full`` built, or builds them) runs, with the same lr and 25 passes per edit:

1. depth-first, batch 1 (FT-M's habit), at the default location (the last layer's ``mlp.down_proj``);
2. breadth-first, batch 1 (25 shuffled epochs over all edits, one step per edit);
3. breadth-first, mini-batch (the demo's batch size);
4. + localized layer (the demo's layer);
5. + augmentation: locality supervision on the edited subjects' other facts (and pseudo-paraphrases).

It prints a Markdown table (reliability, generalization, locality, edit score; teacher-forced) and writes
``ablation.json``. The locality supervision prompts are the edited subjects' unedited facts
(``World.neighbour_prompts``); the locality metric asks about subjects no edit touches, so it stays held out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from locft_dist.config import load_config
from locft_dist.demo.build import FULL as FULL_WORLD
from locft_dist.demo.build import QUICK as QUICK_WORLD
from locft_dist.demo.build import build_from_spec
from locft_dist.demo.run import FULL, QUICK, DemoSettings, editor_overrides
from locft_dist.edit_job import run_edit
from locft_dist.edits import write_jsonl
from locft_dist.eval import save_metrics
from locft_dist.runlog import setup_logging

logger = logging.getLogger(__name__)

DEFAULT_LAYER = -1
"""Where the steps before "+ localized layer" edit: the config default (the last layer)."""


def augmentation_overrides(locality_path: Path, paraphrases: int = 0) -> list[str]:
    """The "+ augmentation" row: locality supervision (and optional pseudo-paraphrases)."""
    return [
        "augment.locality_source=file",
        f"augment.locality_path={locality_path}",
        "augment.locality_ratio=3",
        "augment.locality_loss=kl",
        "augment.locality_weight=10",
        f"augment.paraphrases={paraphrases}",
    ]


def ablation_rows(settings: DemoSettings, locality_path: Path, paraphrases: int) -> dict[str, list[str]]:
    """Row name -> the overrides that differ from the shared ones."""
    default = f"locate.layers=[{DEFAULT_LAYER}]"
    localized = f"locate.layers={list(settings.layers)}"
    batch = f"train.batch_size={settings.batch_size}"
    return {
        "depth-first, batch 1": [default, "train.pipeline=depth_first"],
        "breadth-first, batch 1": [default, "train.batch_size=1"],
        f"breadth-first, batch {settings.batch_size}": [default, batch],
        f"+ localized layer {list(settings.layers)}": [localized, batch],
        "+ augmentation (ours)": [localized, batch, *augmentation_overrides(locality_path, paraphrases)],
    }


def format_table(rows: dict[str, dict]) -> str:
    lines = [
        "| step | reliability | generalization | locality | edit score | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, record in rows.items():
        m = record["edited"]
        lines.append(
            f"| {name} | {m['reliability_tf']:.3f} | {m['generalization_tf']:.3f} | "
            f"{m['locality_tf']:.3f} | {m['edit_score_tf']:.3f} | {record['train']['seconds']:.0f} |"
        )
    return "\n".join(lines)


def run_ablation(demo_dir: Path, *, quick: bool, seed: int, paraphrases: int, only: list[str] | None) -> str:
    settings = QUICK if quick else FULL
    demo = build_from_spec(demo_dir, QUICK_WORLD if quick else FULL_WORLD, seed=seed, progress=True)
    requests = demo.world.make_edits(settings.num_edits, seed=seed)
    out = demo_dir / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    edits_path, heldout_path = out / "edits.jsonl", out / "heldout.txt"
    write_jsonl(requests, edits_path)
    heldout_path.write_text(
        "\n".join(demo.world.heldout_texts(settings.num_heldout, seed, exclude=requests)) + "\n"
    )
    locality_path = out / "locality_train.jsonl"
    locality_path.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in demo.world.neighbour_prompts(requests))
    )
    common = [
        *editor_overrides(settings, demo.model_dir, edits_path, heldout_path),
        "eval.generation=false",
        "train.progress=false",
        "output.checkpoint_every=1000000",
    ]
    results: dict[str, dict] = {}
    for number, (name, overrides) in enumerate(ablation_rows(settings, locality_path, paraphrases).items()):
        if only and str(number + 1) not in only:
            continue
        logger.info("=== %s ===", name)
        start = time.perf_counter()
        outcome = run_edit(
            load_config(None, [*common, *overrides, f"output.dir={out / f'step{number + 1}'}"])
        )
        results[name] = json.loads((outcome.run_dir / "metrics.json").read_text())
        results[name]["overrides"] = overrides
        results[name]["wall_seconds"] = round(time.perf_counter() - start, 1)
    summary = out / "ablation.json"  # rows run before (``--only``) are kept
    results = {**(json.loads(summary.read_text()) if summary.is_file() else {}), **results}
    save_metrics(summary, results)
    order = list(ablation_rows(settings, locality_path, paraphrases))
    return format_table({name: results[name] for name in order if name in results})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo", type=Path, required=True, help="demo directory (built if missing)")
    parser.add_argument("--quick", action="store_true", help="the quick world (300 edits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paraphrases", type=int, default=0, help="pseudo-paraphrases per edit in row 5")
    parser.add_argument("--only", nargs="*", help="run only these row numbers (1-5)")
    args = parser.parse_args()
    setup_logging(True)
    print(
        run_ablation(
            args.demo, quick=args.quick, seed=args.seed, paraphrases=args.paraphrases, only=args.only
        )
    )


if __name__ == "__main__":
    main()
