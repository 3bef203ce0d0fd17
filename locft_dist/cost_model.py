"""Time and memory per rank for a large editing run, from layer shapes and stated assumptions.

    python -m locft_dist.cost_model --shape llama3-8b --layer 22 --gpus 8 --peak-tflops 989 --mfu 0.4

FLOPs per real token are counted as ``locft bench`` counts its FLOP floor: the frozen prefix forward once per
edit, then every epoch the forward of layers k..L, norm and head, and the backward down to the trainable
tensors. The peak and the achieved fraction (MFU) are inputs: pass the numbers ``locft bench --device cuda``
measures on your GPU. Memory per rank assumes FSDP full sharding in bf16 with fp32 trainable master weights,
Adam moments and gradients, and the prefix cache (bf16 hidden states of the edits the rank owns).
Communication: FSDP all-gathers the layers that run, forward and backward, every step, at ``--link-gbps``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from locft_dist.bench import SHAPES


@dataclass(frozen=True)
class Estimate:
    hours_compute: float
    hours_communication: float
    hours_naive_one_gpu: float
    params_gib: float
    optimizer_gib: float
    cache_gib: float

    @property
    def hours_locft(self) -> float:
        """No overlap of communication with compute assumed (an upper bound)."""
        return self.hours_compute + self.hours_communication

    @property
    def total_gib(self) -> float:
        return self.params_gib + self.optimizer_gib + self.cache_gib


def layer_params(shape: dict[str, int]) -> tuple[int, int]:
    """(parameters of one decoder block, of one down_proj)."""
    hidden, inter = shape["hidden"], shape["intermediate"]
    kv = hidden * shape["kv_heads"] // shape["heads"]
    attention = 2 * hidden * hidden + 2 * hidden * kv
    return attention + 3 * hidden * inter, hidden * inter


def estimate(
    shape_name: str,
    layer: int,
    *,
    num_edits: int = 100_000,
    epochs: int = 25,
    tokens_per_edit: float = 20.0,
    gpus: int = 8,
    peak_tflops: float = 989.0,
    mfu: float = 0.4,
    naive_tflops: float = 67.0,
    naive_mfu: float = 0.5,
    batch_size: int = 100,
    link_gbps: float = 300.0,
) -> Estimate:
    shape = SHAPES[shape_name]
    block, down = layer_params(shape)
    num_layers = shape["layers"]
    head = shape["hidden"] * shape["vocab"]
    tokens = num_edits * tokens_per_edit
    prefix = 2 * block * layer
    suffix = 2 * block * (num_layers - layer) + 2 * head
    backward = 2 * block * (num_layers - layer - 1) + 2 * head + 2 * down
    flops = tokens * (prefix + epochs * (suffix + backward))
    naive = tokens * epochs * (2 * block * num_layers + 2 * head + backward)
    total_params = block * num_layers + 2 * head
    # FSDP per step: all-gather the bf16 suffix layers and head for forward and again for backward, and
    # reduce-scatter the fp32 trainable gradients; each rank moves (W-1)/W of every tensor.
    steps = epochs * -(-num_edits // batch_size)
    gathered = 2 * 2 * (block * (num_layers - layer) + head) + 4 * down
    seconds_comm = steps * gathered * (gpus - 1) / gpus / (link_gbps * 1e9) if gpus > 1 else 0.0
    return Estimate(
        hours_compute=flops / (gpus * peak_tflops * 1e12 * mfu) / 3600,
        hours_communication=seconds_comm / 3600,
        hours_naive_one_gpu=naive / (naive_tflops * 1e12 * naive_mfu) / 3600,
        params_gib=2 * total_params / gpus / 2**30,
        optimizer_gib=16 * down / gpus / 2**30,  # fp32 master + grad + two Adam moments
        cache_gib=2 * tokens * shape["hidden"] / gpus / 2**30,
    )


def main(argv: list[str] | None = None) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--shape", default="llama3-8b", choices=[s for s in SHAPES if s != "tiny"])
    parser.add_argument("--layer", type=int, required=True, help="first trainable layer")
    parser.add_argument("--num-edits", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--tokens-per-edit", type=float, default=20.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU, bf16 dense")
    parser.add_argument("--mfu", type=float, default=0.4, help="achieved fraction of the peak")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--link-gbps", type=float, default=300.0, help="all-gather GB/s per GPU")
    args = parser.parse_args(argv)
    est = estimate(
        args.shape,
        args.layer,
        num_edits=args.num_edits,
        epochs=args.epochs,
        tokens_per_edit=args.tokens_per_edit,
        gpus=args.gpus,
        peak_tflops=args.peak_tflops,
        mfu=args.mfu,
        batch_size=args.batch_size,
        link_gbps=args.link_gbps,
    )
    print(
        f"{args.shape} layer {args.layer}, {args.num_edits} edits x {args.epochs} epochs, {args.gpus} GPUs: "
        f"{est.hours_locft:.2f} h = {est.hours_compute:.2f} h compute + {est.hours_communication:.2f} h "
        f"FSDP communication (naive fp32 loop on one GPU: {est.hours_naive_one_gpu:.1f} h); per rank "
        f"{est.params_gib:.1f} GiB weights + {est.optimizer_gib:.2f} GiB trainable state + "
        f"{est.cache_gib:.1f} GiB prefix cache = {est.total_gib:.1f} GiB"
    )


if __name__ == "__main__":
    main()
