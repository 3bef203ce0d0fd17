"""Many synthetic edits for scale runs: invented subjects under the demo world's templates.

    python -m locft_dist.demo.synthetic --num-edits 100000 --seed 0 OUT.jsonl

The edits carry no probes (scale runs measure throughput and memory, not quality).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator

from locft_dist.demo.world import RELATIONS
from locft_dist.edits import EditRequest, write_jsonl

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vi", "zo", "pe", "sa", "do", "fi", "gu", "ha", "je", "bo")


def _name(index: int) -> str:
    """A unique pronounceable name per index (base-16 digits spelled as syllables)."""
    digits = []
    while True:
        index, digit = divmod(index, len(SYLLABLES))
        digits.append(SYLLABLES[digit])
        if index == 0:
            break
    word = "".join(reversed(digits))
    return word[0].upper() + word[1:] + " Synth"


def synthetic_edits(num_edits: int, seed: int = 0) -> Iterator[EditRequest]:
    """``num_edits`` distinct edits (distinct subjects), streamed."""
    rng = random.Random(seed)
    for index in range(num_edits):
        relation = RELATIONS[index % len(RELATIONS)]
        subject = _name(index)
        yield EditRequest(
            prompt=relation.templates[0].format(s=subject),
            target_new=rng.choice(relation.objects),
            subject=subject,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out")
    parser.add_argument("--num-edits", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = write_jsonl(synthetic_edits(args.num_edits, args.seed), args.out)
    print(f"wrote {count} edits to {args.out}")


if __name__ == "__main__":
    main()
