"""Where the time of ``locft bench``'s locft-dist loop goes: the same run under ``torch.profiler``.

    python benchmarks/profile_bench.py --device cuda --shape llama3-8b --dtype bfloat16 --layer 22 \\
        --num-edits 1000 --epochs 3 --batch-size 100

Prints the wall time of the profiled epochs (after one unprofiled warm-up epoch that also fills the prefix
cache), the device's busy time (the sum of its kernels' time; on CPU the operators' own time), and the
operators that take the most device and host time. Busy time well under the wall time means the loop waits
on the host (Python, launches, synchronizations), not on the device.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from locft_dist.bench import BenchConfig, _sync, bench_examples, build_model
from locft_dist.config import TrainConfig
from locft_dist.locate import freeze_all_but, resolve_location
from locft_dist.parallel.single import SingleProcess
from locft_dist.trainer import train_breadth_first


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-edits", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3, help="profiled epochs (after one warm-up epoch)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--rows", type=int, default=15, help="operators listed per table")
    args = parser.parse_args()
    bench = BenchConfig(
        device=args.device,
        shape=args.shape,
        num_layers=args.num_layers,
        layer=args.layer,
        dtype=args.dtype,
        num_edits=args.num_edits,
        epochs=args.epochs + 1,
        batch_size=args.batch_size,
    )
    device = torch.device(bench.device)
    torch.set_grad_enabled(True)
    model = build_model(bench)
    freeze_all_but(model, resolve_location(model, [bench.layer], bench.modules).parameter_names)
    examples = bench_examples(bench, model)
    train = TrainConfig(
        epochs=bench.epochs, batch_size=bench.batch_size, lr=bench.lr, early_stop_loss=None, progress=False
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    state = {"profiler": None, "began": 0.0}

    def on_step_end(step: int, sampler, _progress) -> None:  # the warm-up epoch ends: profile from here on
        if step == sampler.steps_per_epoch:
            _sync(device)
            state["profiler"] = profile(activities=activities)
            state["profiler"].__enter__()
            state["began"] = time.perf_counter()

    train_breadth_first(
        model, examples, SingleProcess(device), copy.copy(train), pad_id=0, on_step_end=on_step_end
    )
    _sync(device)
    wall = time.perf_counter() - state["began"]
    prof = state["profiler"]
    prof.__exit__(None, None, None)
    events = prof.key_averages()
    on_device = device.type == "cuda"
    if on_device:  # the kernels themselves (operators' rows repeat their kernels' time)
        busy = sum(e.self_device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6
    else:
        busy = prof.events().self_cpu_time_total / 1e6
    print(f"{args.epochs} profiled epochs: wall {wall:.3f} s, device busy {busy:.3f} s ({busy / wall:.0%})")
    if on_device:
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
