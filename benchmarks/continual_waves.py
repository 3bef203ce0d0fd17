"""Continual editing in waves against one breadth-first run over all edits and depth-first sequential editing.

    python benchmarks/continual_waves.py --out /tmp/waves                 # the `locft demo` world (FULL)
    python benchmarks/continual_waves.py --out /tmp/waves_real --real     # SmolLM2-135M-Instruct, CounterFact

Every run is `locft edit` in its own process, timed from launch to exit. The edits are split into
``--waves`` waves of ``--wave-size``:

- waves: wave k starts from wave k-1's run (``continual.previous``), replay ratio ``--replay-ratio``;
- one-shot: one breadth-first run over all the edits;
- depth-first: wave k continues wave k-1 with ``train.pipeline=depth_first`` (no replay), each edit given as
  many steps as a breadth-first run gives it passes (``train.depth_first_max_steps = train.epochs``);
- cost (``--cost``): each wave after the first once more without evaluation, continuing the waves chain,
  and once alone from the base (no previous, no replay): the ratio is what a wave's continuity costs.

Metrics are over every edit in force after the wave (``all_waves`` in metrics.json). The table and a JSON
summary (``OUT/continual_waves.json``) are printed/written at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("reliability", "generalization", "locality")


def demo_setup(
    out: Path, num_edits: int, tiny: Path | None = None, keep_neighbours: bool = False
) -> tuple[Path, list, list[str]]:
    from locft_dist.demo.build import build_demo_world, build_tiny_world_model
    from locft_dist.demo.run import FULL

    if tiny is not None:  # the tests' 80-subject world (seconds to build): waves of a dozen edits
        demo = build_tiny_world_model(tiny, seed=0)
    else:
        demo = build_demo_world(out / "world", quick=False, seed=0, progress=False)
    requests = demo.world.make_edits(num_edits, seed=0)
    if keep_neighbours:  # the facts to keep: the edited subjects' other facts (never the evaluated probes)
        keep = out / "keep.txt"
        keep.write_text("\n".join(demo.world.neighbour_prompts(requests)) + "\n")
        locality = [
            "augment.locality_source=file",
            f"augment.locality_path={keep}",
            "augment.locality_loss=kl",
        ]
    else:
        locality = []
    settings = [
        f"locate.layers={list(FULL.layers)}",
        f"locate.modules={list(FULL.modules)}",
        f"train.lr={FULL.lr}",
        f"train.batch_size={FULL.batch_size}",
        f"train.epochs={FULL.epochs}",
        f"train.depth_first_max_steps={FULL.epochs}",
        *locality,
    ]
    return demo.model_dir, requests, settings


def real_setup(out: Path, num_edits: int, preset: str | None) -> tuple[Path, list, list[str]]:
    from locft_dist.edits import load_edits
    from locft_dist.real_model import real_model_dir

    data = REPO.parent / "shared" / "data" / "counterfact_3k.json"
    requests = list(load_edits(data, limit=num_edits).requests)
    if preset:
        settings = [f"locate.preset={preset}"]
    else:
        settings = [
            "locate.layers=[24]",
            "locate.modules=[mlp.down_proj]",
            "train.lr=5e-3",
            "train.batch_size=10",
            "train.epochs=15",
            "train.depth_first_max_steps=15",
        ]
    return real_model_dir(progress=False), requests, settings


REUSE = False
"""``--reuse``: a run directory that already holds a finished run is kept, its time read from its log."""


def edit(run_dir: Path, overrides: list[str]) -> float:
    """`locft edit` as a process; its wall time."""
    if REUSE and (run_dir / "run.json").is_file() and (run_dir / "delta.safetensors").is_file():
        return run_seconds(run_dir)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "locft_dist", "edit", *overrides, f"output.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stderr[-4000:]}")
    return seconds


def all_waves(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return (metrics.get("all_waves") or metrics)["edited"]


def train_seconds(run_dir: Path) -> float:
    """The training loop's time (run.json's ``trained`` phase)."""
    record = json.loads((run_dir / "run.json").read_text())
    return record["phases"]["trained"]["seconds"]


def row(name: str, result: dict, suffix: str) -> str:
    values = " ".join(f"{result['all'][f'{k}_{suffix}']:>14.3f}" for k in KEYS)
    return f"{name:<22} {values} {result['seconds']:>9.1f} {result.get('train_seconds', 0):>9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct on CounterFact")
    parser.add_argument("--tiny-world", type=Path, help="the tests' tiny world (built there if needed)")
    parser.add_argument("--preset", help="locate.preset for --real (default: explicit layer 24 recipe)")
    parser.add_argument("--waves", type=int, default=5)
    parser.add_argument("--wave-size", type=int, default=100)
    parser.add_argument("--replay-ratio", default="1")
    parser.add_argument("--eval-limit", type=int, help="continual.eval_limit (all-waves evaluation sample)")
    parser.add_argument("--cost", action="store_true", help="also time each wave without evaluation")
    parser.add_argument("--skip-depth-first", action="store_true")
    parser.add_argument(
        "--keep-neighbours",
        action="store_true",
        help="demo worlds: every run keeps the edited subjects' other facts (augment.locality_*, KL)",
    )
    parser.add_argument("--set", action="append", default=[], help="more `locft edit` overrides (KEY=VALUE)")
    parser.add_argument(
        "--continued-set",
        action="append",
        default=[],
        help="overrides for the waves after the first only (KEY=VALUE; after --set)",
    )
    parser.add_argument(
        "--table-only", action="store_true", help="print the table from OUT's run directories (no runs)"
    )
    parser.add_argument("--skip-one-shot", action="store_true")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep runs already finished under OUT (an interrupted benchmark, or a first wave copied in)",
    )
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    out = args.out.resolve()
    if args.table_only:
        print_table(collect(out, args.waves))
        return
    out.mkdir(parents=True, exist_ok=True)
    total = args.waves * args.wave_size
    if args.real:
        model_dir, requests, settings = real_setup(out, total, args.preset)
    else:
        model_dir, requests, settings = demo_setup(out, total, args.tiny_world, args.keep_neighbours)
    from locft_dist.edits import write_jsonl

    if len(requests) < total:
        raise SystemExit(f"only {len(requests)} edits available, {total} wanted")
    waves = []
    for k in range(args.waves):
        path = out / f"wave{k + 1}.jsonl"
        write_jsonl(requests[k * args.wave_size : (k + 1) * args.wave_size], path)
        waves.append(path)
    write_jsonl(requests[:total], out / "all.jsonl")
    common = [
        f"model.path={model_dir}",
        *settings,
        "train.progress=false",
        "output.overwrite=true",
        *args.set,
    ]
    if args.eval_limit:
        common.append(f"continual.eval_limit={args.eval_limit}")
    summary: dict = {"settings": settings, "waves": args.waves, "wave_size": args.wave_size, "runs": {}}

    def chain(name: str, extra: list[str]) -> list[dict]:
        results = []
        for k, path in enumerate(waves, start=1):
            run_dir = out / f"{name}{k}"
            previous = [f"continual.previous={out / f'{name}{k - 1}'}", *args.continued_set] if k > 1 else []
            seconds = edit(run_dir, [*common, *extra, f"edits.path={path}", *previous])
            results.append(
                {
                    "wave": k,
                    "seconds": seconds,
                    "train_seconds": train_seconds(run_dir),
                    "all": all_waves(run_dir),
                }
            )
            print(f"{name} wave {k}: {seconds:.1f}s {json.dumps(results[-1]['all'])[:200]}", flush=True)
        return results

    summary["runs"]["waves"] = chain("waves", [f"continual.replay_ratio={args.replay_ratio}"])
    if not args.skip_one_shot:
        seconds = edit(out / "oneshot", [*common, f"edits.path={out / 'all.jsonl'}"])
        summary["runs"]["oneshot"] = {
            "seconds": seconds,
            "train_seconds": train_seconds(out / "oneshot"),
            "all": all_waves(out / "oneshot"),
        }
    if not args.skip_depth_first:
        summary["runs"]["depth_first"] = chain("depth_first", ["train.pipeline=depth_first"])
    if args.cost:
        cost = []
        quiet = [*common, "eval.enabled=false"]
        for k in range(2, args.waves + 1):
            path = waves[k - 1]
            continued = edit(
                out / f"cost_wave{k}",
                [
                    *quiet,
                    f"edits.path={path}",
                    f"continual.previous={out / f'waves{k - 1}'}",
                    f"continual.replay_ratio={args.replay_ratio}",
                    *args.continued_set,
                ],
            )
            alone = edit(out / f"cost_alone{k}", [*quiet, f"edits.path={path}"])
            cost.append(
                {
                    "wave": k,
                    "continued": continued,
                    "alone": alone,
                    "ratio": continued / alone,
                    "train_continued": train_seconds(out / f"cost_wave{k}"),
                    "train_alone": train_seconds(out / f"cost_alone{k}"),
                }
            )
            print(f"cost wave {k}: continued {continued:.1f}s, alone {alone:.1f}s", flush=True)
        summary["cost"] = cost
    (out / "continual_waves.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary)


def run_seconds(run_dir: Path) -> float:
    """A run's own time from its log (start-up before the log opens, about a second, is not in it)."""
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return sum(e["seconds"] for e in events if e["event"] == "done")


def collect(out: Path, num_waves: int) -> dict:
    """The summary of whatever runs exist under ``out`` (for ``--table-only``), seconds from the logs."""
    runs: dict = {}
    for name in ("waves", "depth_first"):
        found = [out / f"{name}{k}" for k in range(1, num_waves + 1)]
        runs[name] = [
            {"wave": k, "seconds": run_seconds(d), "train_seconds": train_seconds(d), "all": all_waves(d)}
            for k, d in enumerate(found, start=1)
            if (d / "metrics.json").is_file()
        ]
    if (out / "oneshot" / "metrics.json").is_file():
        one = out / "oneshot"
        runs["oneshot"] = {
            "seconds": run_seconds(one),
            "train_seconds": train_seconds(one),
            "all": all_waves(one),
        }
    cost = []
    for k in range(2, num_waves + 1):
        continued, alone = out / f"cost_wave{k}", out / f"cost_alone{k}"
        if (continued / "delta.safetensors").is_file() and (alone / "delta.safetensors").is_file():
            a, b = run_seconds(continued), run_seconds(alone)
            train_a, train_b = train_seconds(continued), train_seconds(alone)
            cost.append(
                {
                    "wave": k,
                    "continued": a,
                    "alone": b,
                    "ratio": a / b,
                    "train_continued": train_a,
                    "train_alone": train_b,
                }
            )
    return {"runs": runs, "cost": cost}


def print_table(summary: dict) -> None:
    for suffix in ("tf", "em"):
        print(f"\nover all edits so far ({suffix}):")
        print(
            f"{'run':<22} {'reliability':>14} {'generalization':>14} {'locality':>14} "
            f"{'seconds':>9} {'training':>9}"
        )
        for name in ("waves", "depth_first"):
            for result in summary["runs"].get(name, []):
                print(row(f"{name} after {result['wave']}", result, suffix))
        if "oneshot" in summary["runs"]:
            oneshot = summary["runs"]["oneshot"]
            print(row("one-shot (all)", oneshot, suffix))
    for entry in summary.get("cost", []):
        train_ratio = entry["train_continued"] / entry["train_alone"]
        print(
            f"wave {entry['wave']} without evaluation: continued {entry['continued']:.1f}s, "
            f"alone {entry['alone']:.1f}s, ratio {entry['ratio']:.2f}; "
            f"training {entry['train_continued']:.1f}s vs {entry['train_alone']:.1f}s ({train_ratio:.2f}x)"
        )


if __name__ == "__main__":
    main()
