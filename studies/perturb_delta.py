"""How fragile a locality metric is: deltas that are a fraction of an edit, or random noise of its size.

WILD locality asks a neighbour prompt's whole greedy answer (up to its first ".", newline or EOS) to stay
identical. This writes deltas to evaluate with ``locft eval`` beside the real one, to see how small a change
to the same tensors already rewrites those answers:

- ``scaled_S``: the edit itself times ``S`` (the same direction, a fraction of its size);
- ``noise_S``: a random Gaussian direction per tensor with ``S`` times the edit's Frobenius norm (a change
  unrelated to any fact, of a known size).

    python studies/perturb_delta.py run/delta.safetensors --out perturbed/ --scaled 0.03 0.1 --noise 0.1
    locft eval --model MODEL --edits edits.jsonl --delta perturbed/noise_0.1.safetensors --json out.json

Each output keeps the source delta's metadata (base fingerprint, encoding), so ``locft eval`` accepts it
and evaluates with the run's encoding; files are written through a temporary name and a rename.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from locft_dist.delta import Delta, read_delta, write_delta


def scaled(delta: Delta, factor: float) -> dict[str, torch.Tensor]:
    """The edit's own direction at ``factor`` times its size."""
    return {name: tensor * factor for name, tensor in delta.tensors.items()}


def noise(delta: Delta, factor: float, seed: int) -> dict[str, torch.Tensor]:
    """A random direction per tensor whose Frobenius norm is ``factor`` times the edit's there."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(delta.tensors):
        edit = delta.tensors[name]
        direction = torch.randn(edit.shape, generator=generator, dtype=torch.float32)
        out[name] = direction * (factor * edit.norm() / direction.norm().clamp_min(1e-12))
    return out


def write_like(source: Delta, tensors: dict[str, torch.Tensor], path: Path, note: str) -> Path:
    """``tensors`` as a delta on the same base as ``source``, with its encoding and a note of what it is."""
    metadata = source.metadata  # every key carried over (write_delta sets the same values it reads here)
    return write_delta(
        path,
        tensors,
        base_model=metadata.get("locft.base_model", ""),
        base_fingerprint=source.base_fingerprint,
        config_json=metadata.get("locft.config", "{}"),
        encoding=source.encoding,
        extra_metadata={**metadata, "locft.perturbation": note},
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("delta", help="a run's delta.safetensors")
    parser.add_argument("--out", required=True, help="directory for the perturbed deltas")
    parser.add_argument("--scaled", type=float, nargs="*", default=[], help="fractions of the edit")
    parser.add_argument("--noise", type=float, nargs="*", default=[], help="noise norms, as edit fractions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.scaled and not args.noise:
        parser.error("give at least one --scaled or --noise factor")
    for factor in [*args.scaled, *args.noise]:
        if factor <= 0:
            parser.error(f"factors must be positive; got {factor}")
    source = read_delta(args.delta)
    out = Path(args.out)
    written = []
    for factor in args.scaled:
        note = json.dumps({"kind": "scaled", "factor": factor, "source": str(args.delta)})
        written.append(write_like(source, scaled(source, factor), out / f"scaled_{factor}.safetensors", note))
    for factor in args.noise:
        note = json.dumps({"kind": "noise", "factor": factor, "seed": args.seed, "source": str(args.delta)})
        tensors = noise(source, factor, args.seed)
        written.append(write_like(source, tensors, out / f"noise_{factor}.safetensors", note))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
