"""Breadth-first global order of edits: every edit exactly once per epoch, reshuffled by (seed, epoch).

The whole training position is one replicated number, ``consumed`` (edits consumed since the start of the
run). Epoch ``e`` covers ``consumed`` in ``[e*N, (e+1)*N)``; its global batches start at multiples of the
global batch size inside the epoch, so the last batch of an epoch may be smaller and nothing is dropped
or repeated. Rank ``r`` of ``W`` takes a contiguous slice of each global batch. Because the global order
does not depend on the world size, a run can resume on a different number of ranks and see the same batches.

A continual run (``Replay``) adds earlier waves' edits to every epoch: the epoch's sample list is every new
example plus a draw of earlier edits seeded by (seed, epoch), then shuffled as above. The draw is part of
the seeded order, so the state is still the one counter and resume stays exact on any world size.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import torch


def labelled_generator(label: str) -> torch.Generator:
    """A torch generator seeded by a hash of ``label``: independent streams for independent labels."""
    digest = hashlib.sha256(label.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def epoch_permutation(num_edits: int, seed: int, epoch: int) -> list[int]:
    """The global order of epoch ``epoch``: a permutation of range(num_edits) seeded by (seed, epoch)."""
    return torch.randperm(num_edits, generator=labelled_generator(f"locft-order:{seed}:{epoch}")).tolist()


def replay_draw(pool_size: int, per_epoch: int, seed: int, epoch: int) -> list[int]:
    """Pool indices replayed in epoch ``epoch``: ``per_epoch`` distinct ones by (seed, epoch), sorted."""
    if per_epoch >= pool_size:
        return list(range(pool_size))
    generator = labelled_generator(f"locft-replay:{seed}:{epoch}")
    return sorted(torch.randperm(pool_size, generator=generator)[:per_epoch].tolist())


@dataclass(frozen=True)
class Replay:
    """Earlier edits mixed into each epoch of a continual run.

    The training examples are laid out as ``num_new`` new examples, then the pool edits in ``used`` order:
    only the pool edits some epoch draws are tokenized and cached, so a wave's cost is bounded by its own
    size and the replay budget (``epochs x per_epoch``), not by the number of edits made so far.
    """

    num_new: int
    pool_size: int
    per_epoch: int
    seed: int
    epochs: int
    used: tuple[int, ...] = field(init=False)
    """Pool indices drawn by any epoch, sorted: the pool examples the run needs."""

    def __post_init__(self) -> None:
        per_epoch = min(self.per_epoch, self.pool_size)
        object.__setattr__(self, "per_epoch", per_epoch)
        drawn: set[int] = set()
        for epoch in range(self.epochs):
            drawn.update(replay_draw(self.pool_size, per_epoch, self.seed, epoch))
            if len(drawn) == self.pool_size:
                break
        object.__setattr__(self, "used", tuple(sorted(drawn)))

    @property
    def epoch_size(self) -> int:
        return self.num_new + self.per_epoch

    def epoch_examples(self, epoch: int) -> list[int]:
        """Example indices of epoch ``epoch`` before shuffling: every new one, then the replayed ones."""
        position = {pool_index: self.num_new + i for i, pool_index in enumerate(self.used)}
        draw = replay_draw(self.pool_size, self.per_epoch, self.seed, epoch)
        return [*range(self.num_new), *(position[i] for i in draw)]

    def describe(self) -> str:
        return f"replay {self.per_epoch}/{self.pool_size}x{self.epochs}:{self.seed}"


def rank_slice(batch: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch (sizes differ by at most one; may be empty)."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (1 if rank < extra else 0)]


@dataclass(frozen=True)
class SamplerState:
    """Everything needed to continue the exact sequence of batches (and to refuse other data)."""

    consumed: int
    seed: int
    global_batch_size: int
    num_edits: int
    """Samples per epoch (a continual run's new examples plus its replay draw)."""
    dataset_fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GlobalBatch:
    epoch: int
    step_in_epoch: int
    indices: list[int]
    """The global batch; ranks take ``rank_slice`` of it."""


class BreadthFirstSampler:
    """Streams global batches of edit indices from a consumed-edits counter."""

    def __init__(
        self,
        num_edits: int,
        global_batch_size: int,
        seed: int,
        dataset_fingerprint: str = "",
        consumed: int = 0,
        replay: Replay | None = None,
    ) -> None:
        """``num_edits``: the examples; with ``replay`` they are laid out as it says, and an epoch covers
        ``replay.epoch_size`` samples."""
        if replay is not None:
            if replay.num_new + len(replay.used) != num_edits:
                raise ValueError(
                    f"{num_edits} examples, the replay plan lays out {replay.num_new} + {len(replay.used)}"
                )
            num_edits = replay.epoch_size
        if num_edits <= 0:
            raise ValueError("the sampler needs at least one edit")
        if global_batch_size <= 0:
            raise ValueError("global_batch_size must be positive")
        self.num_edits = num_edits
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.dataset_fingerprint = dataset_fingerprint
        self.consumed = consumed
        self.replay = replay
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_edits // self.global_batch_size)

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_edits

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            self._order = epoch_permutation(self.num_edits, self.seed, epoch)
            if self.replay is not None:
                examples = self.replay.epoch_examples(epoch)
                self._order = [examples[i] for i in self._order]
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> GlobalBatch:
        """The next global batch; advances ``consumed`` by its size."""
        epoch, offset = divmod(self.consumed, self.num_edits)
        if offset % self.global_batch_size != 0:
            raise RuntimeError(f"consumed={self.consumed} is not on a batch boundary of epoch {epoch}")
        indices = self._epoch_order(epoch)[offset : offset + self.global_batch_size]
        self.consumed += len(indices)
        return GlobalBatch(epoch, offset // self.global_batch_size, indices)

    def epoch_batches(self):
        """Yield the remaining global batches of the current epoch (resuming mid-epoch if needed)."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def state(self) -> SamplerState:
        return SamplerState(
            self.consumed, self.seed, self.global_batch_size, self.num_edits, self.dataset_fingerprint
        )

    def load_state(self, state: SamplerState) -> None:
        """Continue from ``state``; refuse a state from other data or another global batch size."""
        if state.dataset_fingerprint != self.dataset_fingerprint or state.num_edits != self.num_edits:
            raise ValueError(
                f"checkpoint was made on another edit set (fingerprint {state.dataset_fingerprint}, "
                f"{state.num_edits} edits) than this run's "
                f"({self.dataset_fingerprint}, {self.num_edits} edits)"
            )
        if state.global_batch_size != self.global_batch_size:
            raise ValueError(
                f"checkpoint used global batch size {state.global_batch_size}, this run uses "
                f"{self.global_batch_size}: the batch order would differ; keep train.batch_size equal"
            )
        if state.seed != self.seed:
            raise ValueError(f"checkpoint used train.seed={state.seed}, this run uses {self.seed}")
        self.consumed = state.consumed
