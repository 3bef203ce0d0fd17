"""Where the time of ``locft bench``'s locft-dist loop goes: the same run under ``torch.profiler``.

    python benchmarks/profile_bench.py --device cuda --shape llama3-8b --dtype bfloat16 --layer 22 \\
        --num-edits 1000 --epochs 3 --batch-size 100

Takes ``locft bench``'s options (``--epochs``: the epochs profiled), ``--rows`` and ``--first-epoch``
(profile from the start: the prefix-cache fill and the first epochs, where a short GPU bench loses most
against the FLOP floor). Prints the wall time of the profiled epochs (by default after one unprofiled
warm-up epoch that also fills the prefix cache), the device's busy time (the sum of its kernels' time; on
CPU the operators' own time), and the operators that take the most device and host time. Busy time well
under the wall time means the loop waits on the host (Python, launches, synchronizations), not on the
device. On a GPU it also counts the host's waits on the device (synchronizations and blocking copies) and
lists the source lines that caused them.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from locft_dist.bench import _sync, bench_examples, build_model, train_config
from locft_dist.cli import bench_config, build_parser
from locft_dist.locate import freeze_all_but, resolve_location
from locft_dist.parallel.master_weights import casts_for_matmul, keep_fp32_master
from locft_dist.parallel.single import SingleProcess
from locft_dist.trainer import train_breadth_first


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=15, help="operators listed per table")
    parser.add_argument(
        "--first-epoch",
        action="store_true",
        help="profile from the start instead: the prefix-cache fill and the first epoch (--epochs 1)",
    )
    own, bench_args = parser.parse_known_args(argv)
    bench = bench_config(build_parser().parse_args(["bench", *bench_args]))
    profiled_epochs = bench.epochs
    if not own.first_epoch:
        bench.epochs += 1  # one warm-up epoch first
    device = torch.device(bench.device)
    torch.set_grad_enabled(True)
    model = build_model(bench)
    freeze_all_but(model, resolve_location(model, [bench.layer], bench.modules).parameter_names)
    keep_fp32_master(model, cast_for_matmul=casts_for_matmul(device))  # as `locft bench` and `locft edit` do
    examples = bench_examples(bench, model)
    train = train_config(bench)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    state = {"profiler": None, "began": 0.0}

    def start_profiling() -> None:
        _sync(device)
        state["profiler"] = profile(activities=activities)
        state["profiler"].__enter__()
        if device.type == "cuda":  # each wait on the device becomes a warning naming its source line
            torch.cuda.set_sync_debug_mode("warn")
        state["began"] = time.perf_counter()

    def on_step_end(step: int, sampler, _progress) -> None:  # the warm-up epoch ends: profile from here on
        if step == sampler.steps_per_epoch and state["profiler"] is None:
            start_profiling()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if own.first_epoch:
            start_profiling()
        train_breadth_first(
            model, examples, SingleProcess(device), copy.copy(train), pad_id=0, on_step_end=on_step_end
        )
        _sync(device)
    wall = time.perf_counter() - state["began"]
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
        waits = Counter(
            f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
        )
        print(f"host waits on the device in the profiled epochs: {sum(waits.values())}")
        for where, count in waits.most_common(own.rows):
            print(f"  {count:6d}  {where}")
    prof = state["profiler"]
    prof.__exit__(None, None, None)
    events = prof.key_averages()
    on_device = device.type == "cuda"
    if on_device:  # the kernels themselves (operators' rows repeat their kernels' time)
        busy = sum(e.self_device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6
    else:
        busy = prof.events().self_cpu_time_total / 1e6
    print(
        f"{profiled_epochs} profiled epochs: wall {wall:.3f} s, device busy {busy:.3f} s ({busy / wall:.0%})"
    )
    if on_device:
        print(events.table(sort_by="self_cuda_time_total", row_limit=own.rows))
    print(events.table(sort_by="self_cpu_time_total", row_limit=own.rows))


if __name__ == "__main__":
    main()
