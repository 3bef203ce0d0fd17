"""Submit a ``locft edit`` run to SLURM without writing an sbatch script: prints the job id, log and delta.

    locft slurm submit -- --config run.yaml                   # 1 node, its GPUs
    locft slurm submit --nodes 8 --gpus-per-node 8 --time 24:00:00 -- --config qwen72b.yaml
    locft slurm submit --launcher deepspeed --nodes 2 --gpus-per-node 8 -- --config run.yaml
    locft slurm submit --ntasks-per-node 2 --nproc 1 -- --config tiny.yaml   # CPU, 2 ranks
    locft slurm submit --dry-run ...                                  # print the sbatch line

Everything after ``--`` goes to ``locft edit`` unchanged. The job runs the ``edit_torchrun.sbatch`` (or
``edit_deepspeed.sbatch``) shipped in ``locft_dist/slurm/`` (also ``slurm/`` in a checkout): preemption-safe,
it requeues itself and resumes (docs/slurm.md).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT_DIR = Path(__file__).resolve().parent / "slurm"
"""The sbatch scripts ship inside the package (a wheel has no repository ``slurm/`` directory)."""
SCRIPTS = {
    "torchrun": SCRIPT_DIR / "edit_torchrun.sbatch",
    "deepspeed": SCRIPT_DIR / "edit_deepspeed.sbatch",
}


def build_parser(prog: str = "locft slurm submit") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Submit a preemption-safe `locft edit` job to SLURM (see docs/slurm.md).",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--launcher", choices=sorted(SCRIPTS), default="torchrun")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (sets --gpus-per-node and --nproc)")
    parser.add_argument(
        "--ntasks-per-node", type=int, default=1, help="launcher agents per node (default 1; 2 on CPU tests)"
    )
    parser.add_argument(
        "--nproc", type=int, help="workers per agent (default: --gpus-per-node, or visible GPUs)"
    )
    parser.add_argument("--cpus-per-task", type=int, help="CPUs per agent")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the script's 04:00:00)")
    parser.add_argument("--partition", "-p", help="partition")
    parser.add_argument("--job-name", "-J", default="locft-edit")
    parser.add_argument(
        "--log-dir", default=".", help="where the job's log goes (default: the current directory)"
    )
    parser.add_argument(
        "--max-failures", type=int, help="requeues after failures before giving up (default 3)"
    )
    parser.add_argument(
        "--signal-lead", type=int, default=300, help="seconds before the time limit to save and requeue (300)"
    )
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command, submit nothing")
    parser.add_argument("edit_args", nargs=argparse.REMAINDER, help="-- then the `locft edit` arguments")
    return parser


def output_dir(edit_args: list[str]) -> Path:
    """The run directory the job will write (``output.dir``), resolved like the job does (from the cwd)."""
    config_path, overrides = None, []
    args = list(edit_args)
    while args:
        arg = args.pop(0)
        if arg == "--config" and args:
            config_path = args.pop(0)
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif "=" in arg:
            overrides.append(arg)
    try:
        from locft_dist.config import load_config

        directory = load_config(config_path, overrides).output.dir
    except Exception:  # an invalid config fails in the job with its own message; still say where it goes
        directory = next(
            (o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("output.dir=")), None
        )
        directory = directory or "runs/locft"
    return Path(directory).expanduser().resolve()


def sbatch_command(opts: argparse.Namespace) -> list[str]:
    log_dir = Path(opts.log_dir).expanduser().resolve()
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name={opts.job_name}",
        f"--nodes={opts.nodes}",
        f"--ntasks-per-node={opts.ntasks_per_node}",
        f"--output={log_dir}/%x-%j.out",
        f"--signal=B:USR1@{opts.signal_lead}",
    ]
    if opts.gpus_per_node:
        cmd.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task:
        cmd.append(f"--cpus-per-task={opts.cpus_per_task}")
    if opts.time:
        cmd.append(f"--time={opts.time}")
    if opts.partition:
        cmd.append(f"--partition={opts.partition}")
    nproc = opts.nproc or opts.gpus_per_node
    exports = {"LOCFT_PYTHON": sys.executable, "LOCFT_STATE_DIR": str(log_dir)}
    if nproc:
        exports["LOCFT_NPROC"] = str(nproc)
    if opts.max_failures is not None:
        exports["LOCFT_MAX_FAILURES"] = str(opts.max_failures)
    cmd.append("--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items()))
    cmd += opts.sbatch_arg
    edit_args = opts.edit_args[1:] if opts.edit_args[:1] == ["--"] else opts.edit_args
    return [*cmd, str(SCRIPTS[opts.launcher]), *edit_args]


def main(argv: list[str] | None = None, prog: str = "python -m locft_dist.slurm_submit") -> int:
    opts = build_parser(prog).parse_args(argv)
    edit_args = opts.edit_args[1:] if opts.edit_args[:1] == ["--"] else opts.edit_args
    if not edit_args:
        print(f"{prog}: error: give the `locft edit` arguments after --", file=sys.stderr)
        return 2
    cmd = sbatch_command(opts)
    run_dir = output_dir(edit_args)
    if opts.dry_run:
        print(shlex.join(cmd))
        return 0
    if shutil.which("sbatch") is None:
        print(
            f"{prog}: error: sbatch is not on PATH; run this where SLURM's commands are (a login node), "
            "or add --dry-run to print the command",
            file=sys.stderr,
        )
        return 2
    Path(opts.log_dir).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{prog}: sbatch failed ({proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = re.split(r"[;\s]", proc.stdout.strip())[0]
    log = Path(opts.log_dir).expanduser().resolve() / f"{opts.job_name}-{job_id}.out"
    print(f"job {job_id}")
    print(f"log:   {log}")
    print(f"run:   {run_dir}")
    print(f"delta: {run_dir / 'delta.safetensors'}")
    print(f"watch: squeue -j {job_id}; tail -f {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
