"""``locft``: argument parsing only; each subcommand calls one function that does the work."""

from __future__ import annotations

import argparse
import os
import sys

from locft_dist.errors import LocftError

EDIT_EXAMPLES = """examples:
  locft edit --config run.yaml
  locft edit model.path=./llama-3-8b edits.path=zsre_3k.json locate.preset=llama3-8b output.dir=runs/zsre
  locft edit --config run.yaml train.lr=1e-4 locate.layers=[-1] train.pipeline=depth_first
  torchrun --nproc_per_node 8 -m locft_dist.cli edit --config run.yaml
  locft edit --help-config          # every config key with its default and meaning
"""

EVAL_EXAMPLES = """examples:
  locft eval --model demo/base_model --edits demo/edits.jsonl
  locft eval --model demo/base_model --edits demo/edits.jsonl --delta demo/run/delta.safetensors --json m.json
"""

APPLY_EXAMPLES = """examples:
  locft apply --model ./llama-3-8b --delta runs/zsre/delta.safetensors --out ./llama-3-8b-edited
"""

CONVERT_EXAMPLES = """examples:
  locft convert zsre_3k.json zsre.jsonl
  locft convert --format counterfact --limit 1000 counterfact_full.jsonl cf1k.jsonl
"""

REPORT_EXAMPLES = """examples:
  locft report runs/zsre              # runs/zsre/report/{loss.png,metrics.png,report.md,report.html}
  locft report runs/zsre --out /tmp/zsre_report
"""

DEMO_EXAMPLES = """examples:
  locft demo --quick                 # < 3 minutes on 2 CPU cores
  locft demo --out demo_out          # the full demo, < 10 minutes
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

    edit = sub.add_parser(
        "edit", help="run an editing job (the main job)", epilog=EDIT_EXAMPLES, formatter_class=fmt
    )
    edit.add_argument("--config", help="YAML config file")
    edit.add_argument("--help-config", action="store_true", help="list every config key and exit")
    edit.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, values parsed as YAML"
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
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--no-generation", action="store_true", help="skip greedy-generation exact match")
    ev.add_argument("--heldout", help="text file for perplexity (one passage per line)")
    ev.add_argument("--device", default="auto")

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

    rp = sub.add_parser(
        "report",
        help="plot a run's loss and metrics and write a short summary",
        epilog=REPORT_EXAMPLES,
        formatter_class=fmt,
    )
    rp.add_argument("run_dir", help="the run's output.dir")
    rp.add_argument("--out", help="where to write (default: RUN_DIR/report)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "demo":
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
        if outcome.metrics is not None:
            from locft_dist.evaluate import format_metrics_table

            columns = {"unedited": outcome.metrics_base, "edited": outcome.metrics}
            print(format_metrics_table(columns, title=str(outcome.run_dir)))
        print(f"delta: {outcome.delta_path}")
    elif args.command == "eval":
        from locft_dist.edit_job import read_heldout
        from locft_dist.eval_job import run_eval

        run_eval(
            args.model,
            args.edits,
            delta_path=args.delta,
            json_out=args.json_out,
            edits_format=args.format,
            limit=args.limit,
            batch_size=args.batch_size,
            generation=not args.no_generation,
            heldout=read_heldout(args.heldout),
            device=args.device,
        )
    elif args.command == "apply":
        from locft_dist.delta import apply_delta_to_dir

        print(f"wrote {apply_delta_to_dir(args.model, args.delta, args.out)}")
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
    args = build_parser().parse_args(argv)
    code = _run_with_exit_code(args)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo can still be releasing a collective's tensors in a background thread after the process group
        # is destroyed; interpreter teardown then aborts the process. Everything is written: leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run_with_exit_code(args: argparse.Namespace) -> int:
    from locft_dist.resumable import Preempted

    try:
        return run(args)
    except LocftError as err:
        print(f"locft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(
            f"locft {args.command}: preempted; checkpoint {stop}; rerun the same command to resume",
            file=sys.stderr,
        )
        return Preempted.exit_code


if __name__ == "__main__":
    sys.exit(main())
