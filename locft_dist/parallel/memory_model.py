"""What each FSDP rank holds for a LocFT-BF run, computed from the architecture (no model needed).

    python -m locft_dist.parallel.memory_model            # Llama-3-8B and Qwen2.5-72B on 8 ranks

Counts: the frozen weights' shard (compute dtype), the trainable parameters' fp32 master shard, their fp32
gradient shard and Adam's two fp32 moments (sharded), one decoder layer all-gathered for compute (twice, for
prefetch), and the fp32 logits of this rank's share of a global batch. Activations of the layers below the
first trainable one are not kept for backward (nothing there needs gradients), so they are left out.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def total_params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.layer_params() + embed + self.hidden


LLAMA3_8B = Arch("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256)
QWEN25_72B = Arch("Qwen2.5-72B", 8192, 29568, 80, 64, 8, 152064)


def per_rank_bytes(
    arch: Arch, *, world_size: int, trainable_params: int, batch: int, seq_len: int, compute_bytes: int = 2
) -> dict[str, float]:
    """GiB per rank, by kind."""
    tokens_per_rank = -(-batch // world_size) * seq_len
    rows = {
        "frozen weights (shard)": arch.total_params() * compute_bytes / world_size,
        "trainable fp32 master (shard)": trainable_params * 4 / world_size,
        "gradients fp32 (shard)": trainable_params * 4 / world_size,
        "Adam moments fp32 (shard)": trainable_params * 8 / world_size,
        "gathered layers (2, prefetch)": 2 * arch.layer_params() * compute_bytes,
        "logits fp32 (rank's edits)": tokens_per_rank * arch.vocab * 4,
    }
    rows = {k: v / GIB for k, v in rows.items()}
    rows["total"] = sum(rows.values())
    return rows


def table(world_size: int = 8, batch: int = 100, seq_len: int = 32) -> str:
    lines = []
    for arch in (LLAMA3_8B, QWEN25_72B):
        down = arch.hidden * arch.intermediate
        rows = per_rank_bytes(
            arch, world_size=world_size, trainable_params=down, batch=batch, seq_len=seq_len
        )
        lines.append(
            f"\n{arch.name}: {arch.total_params() / 1e9:.1f}B params, one down_proj = {down / 1e6:.0f}M "
            f"trainable; {world_size} ranks, batch {batch}, {seq_len} tokens/edit, bf16 compute"
        )
        lines.append(f"{'':34}GiB per rank")
        lines += [f"  {name:32}{value:8.2f}" for name, value in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args(argv)
    print(table(args.world_size, args.batch, args.seq_len))


if __name__ == "__main__":
    main()
