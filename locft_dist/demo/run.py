"""``locft demo``: build the synthetic world, edit it with LocFT-BF and the depth-first baseline, compare.

Both editors get the same location, learning rate and compute budget (edit-forwards): LocFT-BF runs
``epochs`` passes over the whole set in mini-batches; the depth-first baseline gives each edit up to
``epochs`` steps of its own, one edit after the other.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from locft_dist.config import load_config
from locft_dist.demo.build import FULL as FULL_WORLD
from locft_dist.demo.build import QUICK as QUICK_WORLD
from locft_dist.demo.build import DemoSpec, build_from_spec
from locft_dist.edit_job import run_edit
from locft_dist.edits import write_jsonl
from locft_dist.eval import format_metrics_table, save_metrics
from locft_dist.runlog import setup_logging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """What the demo edits and how; the same location and lr for both editors."""

    num_edits: int
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    lr: float
    batch_size: int
    epochs: int
    num_heldout: int = 200


QUICK = DemoSettings(
    num_edits=300, layers=(1,), modules=("mlp.down_proj",), lr=5e-3, batch_size=50, epochs=25
)
FULL = DemoSettings(num_edits=500, layers=(1,), modules=("mlp.down_proj",), lr=5e-3, batch_size=50, epochs=25)


def editor_overrides(settings: DemoSettings, model_dir: Path, edits: Path, heldout: Path) -> list[str]:
    """The ``locft edit`` overrides shared by both editors."""
    return [
        f"model.path={model_dir}",
        f"edits.path={edits}",
        f"locate.layers={list(settings.layers)}",
        f"locate.modules={list(settings.modules)}",
        f"train.lr={settings.lr}",
        f"train.batch_size={settings.batch_size}",
        f"train.epochs={settings.epochs}",
        f"train.depth_first_max_steps={settings.epochs}",
        f"eval.heldout_path={heldout}",
        "model.device=cpu",
        "dist.strategy=none",
        "output.overwrite=true",
    ]


def run_demo(
    out: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    world_spec: DemoSpec | None = None,
    settings: DemoSettings | None = None,
) -> dict:
    """Run the whole demo into ``out`` and print the side-by-side table; returns the metrics.

    ``world_spec``/``settings`` replace the QUICK/FULL choice (tests use a tiny world).
    """
    setup_logging(True)
    start = time.perf_counter()
    out = Path(out)
    settings = settings or (QUICK if quick else FULL)
    demo = build_from_spec(
        out, world_spec or (QUICK_WORLD if quick else FULL_WORLD), seed=seed, progress=True
    )
    world = demo.world
    requests = world.make_edits(settings.num_edits, seed=seed)
    edits_path = out / "edits.jsonl"
    write_jsonl(requests, edits_path)
    heldout_path = out / "heldout.txt"
    heldout_path.write_text(
        "\n".join(world.heldout_texts(settings.num_heldout, seed, exclude=requests)) + "\n"
    )
    # Unedited facts of the edited subjects, for augment.locality_path (disjoint from the locality probes).
    (out / "locality_train.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in world.neighbour_prompts(requests))
    )
    common = editor_overrides(settings, demo.model_dir, edits_path, heldout_path)
    runs = {
        "LocFT-BF": [*common, "train.pipeline=breadth_first", f"output.dir={out / 'run'}"],
        "depth-first": [*common, "train.pipeline=depth_first", f"output.dir={out / 'run_depth_first'}"],
    }
    columns, summary = {}, {"settings": asdict(settings), "quick": quick, "seed": seed}
    for name, overrides in runs.items():
        logger.info("=== %s ===", name)
        outcome = run_edit(load_config(None, overrides))
        metrics = json.loads((outcome.run_dir / "metrics.json").read_text())
        columns.setdefault("unedited", metrics["unedited"])
        columns[name] = metrics["edited"]
        summary[name] = metrics
    summary["seconds"] = round(time.perf_counter() - start, 1)
    save_metrics(out / "demo_metrics.json", summary)
    title = (
        f"{settings.num_edits} edits on a {demo.report.num_parameters / 1e6:.2f}M-parameter Llama that knew "
        f"{demo.report.knowledge_template0:.1%} of {len(world.facts)} facts;\n"
        f"layer(s) {list(settings.layers)} {', '.join(settings.modules)}, lr {settings.lr:g}, "
        f"same budget ({settings.epochs} passes per edit)"
    )
    print(format_metrics_table(columns, title=title))
    print(f"\nbase model: {demo.model_dir}\nedits: {edits_path}")
    print(f"LocFT-BF delta: {out / 'run' / 'delta.safetensors'}")
    print(f"demo finished in {summary['seconds']:.0f}s")
    return summary
