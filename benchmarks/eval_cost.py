"""What evaluation costs next to training: ``locft edit`` with default evaluation against a naive loop.

    OMP_NUM_THREADS=1 python benchmarks/eval_cost.py --work /tmp/eval_cost [--num-locality 1]
    OMP_NUM_THREADS=1 python benchmarks/eval_cost.py --work /tmp/eval_cost --repo ../other-checkout  # before
    python benchmarks/eval_cost.py --work /tmp/eval_cost --device cuda             # both on a GPU

Builds once (reused from ``--work``): a world of invented facts (``locft_dist.demo.world``), a byte-level
BPE tokenizer trained on it, a randomly initialized Llama of ``locft bench``'s ``tiny`` shape (8 layers,
hidden 256) saved as a model directory, and ``--num-edits`` edits with 3 rephrase prompts and
``--num-locality`` locality probes each. Then times, in separate processes on the same inputs: the naive
loop training alone (the authors' computation, as ``locft bench`` runs it: whole batch padded to its
longest edit, whole-model forward) and the whole ``locft edit`` process with the default evaluation
(before and after editing), from ``--repo`` (default: this checkout). Wall and CPU seconds are reported
(CPU time is steadier on a shared machine); the phases of ``locft edit`` come from its log's timestamps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(work: Path, num_edits: int, num_locality: int, seed: int) -> tuple[Path, Path]:
    """The model directory and the edit file (built once per ``work`` directory)."""
    model_dir, edits = work / "model", work / f"edits_{num_edits}_loc{num_locality}.jsonl"
    if model_dir.joinpath("model.safetensors").is_file() and edits.is_file():
        return model_dir, edits
    from locft_dist.bench import BenchConfig, build_model
    from locft_dist.demo.tokenizer import train_tokenizer
    from locft_dist.demo.world import build_world
    from locft_dist.edits import write_jsonl

    world = build_world(num_subjects=num_edits + 600, seed=seed)
    tokenizer = train_tokenizer(world.pretraining_corpus(), vocab_size=512)
    model = build_model(BenchConfig(shape="tiny", seed=seed))
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    if not model_dir.joinpath("model.safetensors").is_file():
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
    write_jsonl(world.make_edits(num_edits, seed=seed, num_locality=num_locality), edits)
    return model_dir, edits


def naive_seconds(
    model_dir: Path, edits: Path, epochs: int, batch_size: int, lr: float, device: str = "cpu"
) -> tuple[float, float]:
    """Wall and CPU seconds of the naive loop training alone (after loading and encoding)."""
    import torch

    from locft_dist.bench import naive_loop
    from locft_dist.config import TrainConfig
    from locft_dist.edits import load_edits
    from locft_dist.edits.encode import encode_pairs
    from locft_dist.locate import freeze_all_but, resolve_location
    from locft_dist.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    requests = load_edits(str(edits)).requests
    examples = encode_pairs(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
    model = load_model(model_dir).to(device)
    freeze_all_but(model, resolve_location(model, [-1], ["mlp.down_proj"]).parameter_names)
    train = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, early_stop_loss=None, progress=False)
    start, cpu = time.perf_counter(), time.process_time()
    naive_loop(model, examples, train, torch.device(device))
    return time.perf_counter() - start, time.process_time() - cpu


_STAMP = re.compile(r"^(?:(\d{4}-\d\d-\d\d) )?(\d\d:\d\d:\d\d)(?:,(\d{3}))? ")


def _stamp(match: re.Match, started: float) -> float:
    """A log line's time; a line without a date (the default format) is on the day the run started."""
    day = match.group(1) or datetime.fromtimestamp(started).strftime("%Y-%m-%d")
    stamp = datetime.strptime(f"{day} {match.group(2)}", "%Y-%m-%d %H:%M:%S").timestamp()
    stamp += int(match.group(3) or 0) / 1000
    return stamp + 86400 if stamp < started - 1 else stamp


def phases(log: str, started: float, ended: float) -> dict[str, float]:
    """Seconds between the log lines that open each phase of ``locft edit``."""
    marks: dict[str, float] = {"start": started}
    keys = {
        "evaluating the unedited model": "eval_before",
        "training: ": "train",
        "trained in ": "train_end",
        "evaluating the edited model": "eval_after",
    }
    for line in log.splitlines():
        match = _STAMP.match(line)
        if not match:
            continue
        stamp = _stamp(match, started)
        for needle, key in keys.items():
            if needle in line and key not in marks:
                marks[key] = stamp
        if "wrote " in line and "delta.safetensors" in line and "eval_after" not in marks:
            marks["eval_after"] = stamp
    marks["end"] = ended
    out = {}
    if "eval_before" in marks and "train" in marks:
        out["eval_before_s"] = marks["train"] - marks["eval_before"]
        out["startup_s"] = marks["eval_before"] - started
    if "train" in marks and "train_end" in marks:
        out["train_s"] = marks["train_end"] - marks["train"]
    if "eval_after" in marks:
        out["eval_after_s"] = ended - marks["eval_after"]
    return out


def run_edit(
    repo: Path, model_dir: Path, edits: Path, out: Path, epochs: int, extra: list[str]
) -> dict[str, float]:
    """The whole ``locft edit`` process with default evaluation: wall and CPU seconds, and phases. The run
    directory is cleared first: the same command on it would resume a finished run and do nothing."""
    shutil.rmtree(out, ignore_errors=True)
    args = [
        f"model.path={model_dir}",
        f"edits.path={edits}",
        f"train.epochs={epochs}",
        "train.progress=false",
        "train.early_stop_loss=null",
        f"output.dir={out}",
        "output.overwrite=true",
        *extra,
    ]
    started = time.time()
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "locft_dist.cli", "edit", *args],
        capture_output=True,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"locft edit failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    print(proc.stdout)
    return {"wall_s": ended - started, "cpu_s": cpu_seconds, **phases(proc.stderr, started, ended)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="eval_cost", help="where the model, edits and runs go")
    parser.add_argument("--num-edits", type=int, default=2400)
    parser.add_argument("--num-locality", type=int, default=1, help="locality probes per edit (default 1)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose locft edit is timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: both the naive loop and locft edit")
    parser.add_argument("overrides", nargs="*", help="extra locft edit overrides")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, edits = build(work, args.num_edits, args.num_locality, args.seed)
    report: dict[str, object] = {
        "num_edits": args.num_edits,
        "num_locality": args.num_locality,
        "epochs": args.epochs,
        "repo": args.repo,
        "device": args.device,
    }
    if not args.skip_naive:
        code = (
            f"import json, sys; sys.path.insert(0, {str(REPO)!r}); "
            "from benchmarks.eval_cost import naive_seconds; "
            f"print(json.dumps(naive_seconds({str(model_dir)!r}, {str(edits)!r}, {args.epochs}, 100, 5e-4, "
            f"{args.device!r})))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        report["naive_train_s"], report["naive_train_cpu_s"] = json.loads(
            proc.stdout.strip().splitlines()[-1]
        )
    report["locft_edit"] = run_edit(
        Path(args.repo),
        model_dir,
        edits,
        work / "run",
        args.epochs,
        [f"model.device={args.device}", *args.overrides],
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
