"""One shape table and one estimator: time and per-rank memory of a LocFT-BF run, from layer shapes.

    python -m locft_dist.cost_model                       # shapes, per-rank memory (8B, 72B), time
    python -m locft_dist.cost_model --shape llama3-8b --layer 22 --gpus 8 --peak-tflops 989 --mfu 0.4

Compute, per real token (``locft bench`` counts its FLOP floor the same way): the frozen prefix forward
once per edit; every epoch the forward of layers k..L and the final norm, the backward down to the
trainable tensors, and the output layer forward and backward at the target positions only
(``locft_dist/losses.py``). Time = FLOPs / (GPUs x peak x MFU); FSDP communication: the bf16 layers that
run all-gathered for forward and again for backward, the output layer likewise (its own unit, resharded
after forward), the fp32 trainable gradients reduce-scattered; no overlap with compute (an upper bound).

Memory per rank, FSDP2 full sharding in bf16 with fp32 trainable state, in two layouts: ``before`` (one
root unit holding the embedding and the head, gathered after the first forward and kept; full-vocabulary
fp32 logits at every position; the prefix cache all on the device; the delta gathered on every rank;
DeepSpeed checkpoints holding full weights and both Adam moments on every rank) and ``after`` (the code
now: embedding and head as units resharded after forward, the embedding never gathered on the cached path;
logits at target positions only; the prefix cache capped at half the free device memory, the rest in
host memory; the delta gathered to rank 0; checkpoints written as shards).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder's dimensions (random-weight benches build from these)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def block_params(self) -> int:
        """Parameters of one decoder block (attention, MLP, two norms)."""
        kv = self.hidden * self.kv_heads // self.heads
        return (
            2 * self.hidden * self.hidden
            + 2 * self.hidden * kv
            + 3 * self.hidden * self.intermediate
            + 2 * self.hidden
        )

    @property
    def down_params(self) -> int:
        """One ``mlp.down_proj``: the usual LocFT location."""
        return self.hidden * self.intermediate

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        embeddings = self.head_params * (1 if self.tied_embeddings else 2)
        return self.layers * self.block_params + embeddings + self.hidden


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("tiny", hidden=256, intermediate=1024, layers=8, heads=8, kv_heads=4, vocab=512),
        Shape("llama3-8b", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
        Shape("qwen2.5-72b", hidden=8192, intermediate=29568, layers=80, heads=64, kv_heads=8, vocab=152064),
        Shape(
            "smollm2-135m",
            hidden=576,
            intermediate=1536,
            layers=30,
            heads=9,
            kv_heads=3,
            vocab=49152,
            tied_embeddings=True,
        ),
    )
}
"""Real models' layer shapes (Qwen2.5-72B's dimensions on a Llama block) and a tiny one for CPU benches."""


@dataclass(frozen=True)
class Workload:
    """What a run does: the assumptions behind every estimate (none of them are measurements)."""

    layer: int
    """First trainable decoder layer (the prefix below it is cached)."""
    num_edits: int = 100_000
    epochs: int = 25
    tokens_per_edit: float = 20.0
    target_tokens_per_edit: float = 4.0
    """Answer tokens plus EOS: where the loss reads the output layer."""
    batch_size: int = 100
    world_size: int = 8
    micro_batch_tokens: int = 4096
    compute_bytes: int = 2
    """bf16 weights and activations; trainable master weights, gradients and Adam moments are fp32."""
    device_gib: float = 80.0


def flops(shape: Shape, work: Workload) -> tuple[float, float]:
    """(locft-dist FLOPs, the naive loop's FLOPs) over the whole run."""
    tokens = work.num_edits * work.tokens_per_edit
    targets = work.num_edits * work.target_tokens_per_edit
    below, above = work.layer, shape.layers - work.layer
    block, head, down = shape.block_params, shape.head_params, shape.down_params
    forward = 2 * block * above * tokens + 2 * head * targets
    backward = 2 * block * (above - 1) * tokens + 2 * down * tokens + 2 * head * targets
    locft = 2 * block * below * tokens + work.epochs * (forward + backward)
    naive_backward = 2 * block * (above - 1) * tokens + 2 * down * tokens + 2 * head * tokens
    naive = work.epochs * tokens * (2 * block * shape.layers + 2 * head) + work.epochs * naive_backward
    return locft, naive


def communication_bytes(shape: Shape, work: Workload) -> float:
    """Bytes each rank moves per run under FSDP: (W-1)/W of every gathered or reduced tensor."""
    if work.world_size == 1:
        return 0.0
    steps = work.epochs * -(-work.num_edits // work.batch_size)
    above = shape.layers - work.layer
    per_step = (
        2 * work.compute_bytes * (above * shape.block_params + shape.head_params) + 4 * shape.down_params
    )
    return steps * per_step * (work.world_size - 1) / work.world_size


def memory_per_rank(shape: Shape, work: Workload, *, layout: str = "after") -> dict[str, float]:
    """GiB per rank by kind, for one ``mlp.down_proj`` trained at ``work.layer``; ``layout`` is ``before``
    or ``after`` (see the module docstring)."""
    assert layout in ("before", "after"), layout
    w, cb, trainable = work.world_size, work.compute_bytes, shape.down_params
    share = -(-work.batch_size // w)
    micro_tokens = min(share * work.tokens_per_edit, work.micro_batch_tokens)
    micro_targets = micro_tokens / work.tokens_per_edit * work.target_tokens_per_edit
    embeddings = shape.head_params * (1 if shape.tied_embeddings else 2)
    cache = -(-work.num_edits // w) * work.tokens_per_edit * shape.hidden * cb
    before = layout == "before"
    rows = {
        "frozen weights (shard)": shape.total_params * cb / w,
        "trainable fp32 master + grad + Adam (shard)": 16 * trainable / w,
        "decoder layers gathered (2, prefetch)": 2 * shape.block_params * cb,
        # before: one root unit with both, gathered by the first forward and kept; after: the head's unit,
        # gathered while it runs (the embedding's is never gathered on the cached path)
        "embedding / output layer gathered": (embeddings if before else shape.head_params) * cb,
        # logits and their gradient: every position of a micro-batch, or its target positions only
        "logits fp32": 2 * (micro_tokens if before else micro_targets) * shape.vocab * 4,
        "prefix cache on the device": cache if before else min(cache, 0.5 * work.device_gib * GIB),
    }
    gib = {name: value / GIB for name, value in rows.items()}
    gib["total while training"] = sum(gib.values())
    # Saving, between steps, on top of the shards: the delta's whole fp32 tensors (before: on every rank;
    # after: on rank 0 only), and a ZeRO-3 checkpoint's weights and two Adam moments (before: whole on
    # every rank; after: each rank's shard).
    gib["delta export, ranks 1..W-1"] = (trainable * 4 if before else 0) / GIB
    gib["ZeRO-3 checkpoint save"] = 3 * trainable * 4 / (1 if before else w) / GIB
    return gib


def memory_table(shapes: list[str], work: Workload) -> str:
    """Per-rank memory before/after, one block per shape (markdown)."""
    lines = []
    for name in shapes:
        shape = SHAPES[name]
        work_at = Workload(**{**work.__dict__, "layer": min(work.layer, shape.layers - 1)})
        before, after = (memory_per_rank(shape, work_at, layout=x) for x in ("before", "after"))
        lines.append(
            f"\n{shape.name}: {shape.total_params / 1e9:.1f}B params, one down_proj "
            f"({shape.down_params / 1e6:.0f}M) trainable at layer {work_at.layer}; {work.world_size} ranks, "
            f"{work.num_edits} edits x {work.tokens_per_edit:g} tokens ({work.target_tokens_per_edit:g} "
            f"target), batch {work.batch_size}, bf16 compute\n"
        )
        lines.append("| GiB per rank | before | after |")
        lines.append("|---|---:|---:|")
        for label, value in before.items():
            lines.append(f"| {label} | {value:.2f} | {after[label]:.2f} |")
    return "\n".join(lines)


def time_line(shape: Shape, work: Workload, *, peak_tflops: float, mfu: float, link_gbps: float) -> str:
    locft, naive = flops(shape, work)
    hours = locft / (work.world_size * peak_tflops * 1e12 * mfu) / 3600
    comm = communication_bytes(shape, work) / (link_gbps * 1e9) / 3600
    naive_hours = naive / (67e12 * 0.5) / 3600  # fp32 on one GPU (vendor peak) at 50%
    return (
        f"{shape.name} layer {work.layer}, {work.num_edits} edits x {work.epochs} epochs, "
        f"{work.world_size} GPUs: {hours + comm:.2f} h = {hours:.2f} h compute + {comm:.2f} h FSDP "
        f"communication (naive fp32 loop on one GPU: {naive_hours:.1f} h)"
    )


def shape_table() -> str:
    lines = [
        "| shape | hidden | intermediate | layers | heads | kv heads | vocab | params |",
        "|---|" + "---:|" * 7,
    ]
    for s in SHAPES.values():
        lines.append(
            f"| {s.name} | {s.hidden} | {s.intermediate} | {s.layers} | {s.heads} | {s.kv_heads} | {s.vocab} "
            f"| {s.total_params / 1e9:.2f}B |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", choices=[s for s in SHAPES if s != "tiny"], help="time for this shape only"
    )
    parser.add_argument("--layer", type=int, help="first trainable layer (default: 22 of 8B, 60 of 72B)")
    parser.add_argument("--num-edits", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--tokens-per-edit", type=float, default=20.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU, bf16 dense")
    parser.add_argument("--mfu", type=float, default=0.4, help="achieved fraction of the peak")
    parser.add_argument("--link-gbps", type=float, default=300.0, help="all-gather GB/s per GPU")
    args = parser.parse_args(argv)
    default_layers = {"llama3-8b": 22, "qwen2.5-72b": 60, "smollm2-135m": 29}
    names = [args.shape] if args.shape else ["llama3-8b", "qwen2.5-72b"]

    def work(name: str) -> Workload:
        return Workload(
            layer=args.layer if args.layer is not None else default_layers[name],
            num_edits=args.num_edits,
            epochs=args.epochs,
            tokens_per_edit=args.tokens_per_edit,
            batch_size=args.batch_size,
            world_size=args.gpus,
        )

    print(shape_table())
    for name in names:
        print(memory_table([name], work(name)))
    print()
    for name in names:
        print(
            time_line(
                SHAPES[name], work(name), peak_tflops=args.peak_tflops, mfu=args.mfu, link_gbps=args.link_gbps
            )
        )


if __name__ == "__main__":
    main()
