"""Evaluation of an edit set on a model: probes encoded once, one pass per model, metrics reduced over ranks.

``Evaluator`` serves a run (the unedited model before training, the edited one after it, the same probes)
and ``compute_reference``/``evaluate_edits`` are the one-call forms. The unedited model's pass gives its
own metrics and the locality ``Reference`` at once: locality probes run once, not once per use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from locft_dist.edits.encode import Encoding, pad_token_id
from locft_dist.edits.schema import EditRequest
from locft_dist.eval.generate import OneProcess, Ranks, model_eos_ids, stop_tokens
from locft_dist.eval.metrics import (
    EXTRA_NEW_TOKENS,
    METRIC_KEYS,
    EditMetrics,
    EditScores,
    Expected,
    Sums,
    decoded,
    exact_match,
    greedy_text,
    metrics_from_sums,
    normalize_answer,
    parted,
    settled_words,
    token_accuracy,
    without_partial_character,
)
from locft_dist.eval.passes import (
    Decoding,
    FullForward,
    Paired,
    ProbeOutput,
    eval_mode,
    model_device,
    run_probes,
)
from locft_dist.eval.perplexity import nll_sums
from locft_dist.eval.probes import Probe, build_probes
from locft_dist.eval.reference import Reference, gather_rows


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 256
    """Probes per batch (one forward, then greedy decoding with the batch's KV cache)."""
    generation: bool = True
    """Also run greedy decoding (the _em and _wild metrics)."""
    max_new_tokens: int = 40
    """WILD's decoding budget; _em decodes the answer's length + EXTRA_NEW_TOKENS."""
    progress: bool = False
    early_stop: bool = True
    """Stop decoding a probe once its results are settled (they are the same as without; tests compare)."""


UneditedWeights = Callable[[], AbstractContextManager[None]]
"""A context in which the model computes as the unedited model (``eval.base_weights.BaseWeights``)."""


class Evaluator:
    """The probes of ``requests`` this rank owns, and the passes and scores over them."""

    def __init__(
        self,
        tokenizer,
        requests: Sequence[EditRequest],
        *,
        encoding: Encoding | None = None,
        settings: EvalSettings | None = None,
        ranks: Ranks | None = None,
        source: str = "edits",
    ) -> None:
        self.tokenizer = tokenizer
        self.settings = settings or EvalSettings()
        self.ranks = ranks or OneProcess()
        self.encoding = encoding or Encoding()
        self.probes = build_probes(
            tokenizer,
            requests,
            self.encoding,
            rank=self.ranks.rank,
            world_size=self.ranks.world_size,
            source=source,
        )
        self.pad_id = pad_token_id(tokenizer)
        self._stop: torch.Tensor | None = None
        self.seconds: dict[str, float] = {}

    # -- passes ----------------------------------------------------------------------------------------

    def _decoding(
        self,
        model: nn.Module,
        reference: Reference | None,
        unedited: bool,
        unedited_weights: UneditedWeights | None = None,
    ) -> Decoding | None:
        if not self.settings.generation:
            return None
        if self._stop is None:
            config = getattr(getattr(model, "module", model), "config", None)
            vocab = max(int(getattr(config, "vocab_size", 0) or 0), len(self.tokenizer))
            self._stop = stop_tokens(self.tokenizer, vocab, model_eos_ids(model))
        probes = self.probes.probes
        limits = [
            max(self.settings.max_new_tokens, p.example.num_target_tokens + EXTRA_NEW_TOKENS) for p in probes
        ]
        expected = [self._expected(p, reference, unedited) for p in probes]
        tokenizer = self.tokenizer

        def decided(index: int, tokens: list[int]) -> bool:
            target = expected[index]
            return target is not None and target.settled(decoded(tokenizer, tokens), len(tokens))

        paired = None
        if unedited_weights is not None and not unedited:
            locality = frozenset(i for i, p in enumerate(probes) if p.kind == "locality")
            paired = Paired(locality, unedited_weights, self._pair_decided(limits))
        return Decoding(limits, self._stop, decided if self.settings.early_stop else None, paired)

    def _pair_decided(self, limits: Sequence[int]) -> Callable[[int, list[int], list[int]], bool]:
        """Whether a locality probe's edited and unedited generations so far fix both comparisons: for
        each of EM and WILD, both texts are final (a stop or the budget) or they have parted."""
        assert self._stop is not None
        is_stop, tokenizer, wild_budget = self._stop.tolist(), self.tokenizer, self.settings.max_new_tokens
        probes = self.probes.probes

        def known(ours: list[int], theirs: list[int], budget: int, words: bool) -> bool:
            final = [is_stop[t[-1]] or len(t) >= budget for t in (ours, theirs)]
            if all(final):
                return True
            a, b = (greedy_text(tokenizer, t, budget) for t in (ours, theirs))
            if words:
                return parted(settled_words(a, final[0]), final[0], settled_words(b, final[1]), final[1])
            if not final[0]:
                a = without_partial_character(a)
            if not final[1]:
                b = without_partial_character(b)
            return parted(a, final[0], b, final[1])

        def decided(index: int, ours: list[int], theirs: list[int]) -> bool:
            if not self.settings.early_stop:
                return False
            em_budget = min(probes[index].example.num_target_tokens + EXTRA_NEW_TOKENS, limits[index])
            em_known = known(ours, theirs, em_budget, words=True)
            return em_known and known(ours, theirs, wild_budget, words=False)

        return decided

    def _expected(self, probe: Probe, reference: Reference | None, unedited: bool) -> Expected | None:
        """What settles a probe's generation early (None: it runs to a stop or its limit)."""
        em_budget = probe.example.num_target_tokens + EXTRA_NEW_TOKENS
        wild_budget = self.settings.max_new_tokens
        if probe.kind != "locality":
            words = tuple(normalize_answer(probe.answer).split())
            return Expected(em_budget, wild_budget, words, wild_words=words)
        if unedited:
            if reference is not None and reference.deferred:
                return Expected(0, 0, ())  # generated later, beside the edited model's (paired decoding)
            return None  # the Reference itself: every locality generation runs to its end
        if reference is None or reference.generated is None:
            return Expected(0, 0, ())  # nothing to compare with: no generation needed
        before = reference.generated[probe.slot]
        em_words = tuple(normalize_answer(greedy_text(self.tokenizer, before, em_budget)).split())
        return Expected(
            em_budget, wild_budget, em_words, wild_text=greedy_text(self.tokenizer, before, wild_budget)
        )

    def run(
        self,
        model: nn.Module,
        reference: Reference | None = None,
        *,
        unedited: bool = False,
        forward: FullForward | None = None,
        desc: str = "eval",
        unedited_weights: UneditedWeights | None = None,
    ) -> list[ProbeOutput]:
        """Every probe of this rank through ``model`` (collective over the ranks). The locality probes'
        generations run to their end when ``unedited`` (they become the Reference), else until they are
        known to match ``reference`` or not; with ``unedited_weights`` (one process), the unedited
        model's generation runs beside the edited one's and both stop where they part."""
        start = time.perf_counter()
        with eval_mode(model):
            outputs = run_probes(
                model,
                [p.example for p in self.probes.probes],
                pad_id=self.pad_id,
                batch_size=self.settings.batch_size,
                decoding=self._decoding(model, reference, unedited, unedited_weights),
                ranks=self.ranks,
                forward=forward,
                groups=[int(p.kind != "locality") for p in self.probes.probes],  # locality decodes longest
                progress=self.settings.progress,
                desc=desc,
            )
        self.seconds[desc] = time.perf_counter() - start
        return outputs

    def perplexity_sums(self, model: nn.Module, texts: Sequence[str]) -> tuple[float, int]:
        with eval_mode(model):
            return nll_sums(
                model, self.tokenizer, texts, batch_size=self.settings.batch_size, ranks=self.ranks
            )

    # -- reference and scores --------------------------------------------------------------------------

    def reference_from(
        self, outputs: Sequence[ProbeOutput], device: torch.device, *, deferred: bool = False
    ) -> Reference:
        """The locality rows of ``outputs`` (this rank's), assembled over ranks in global order;
        ``deferred``: without generations (the edited pass decodes the unedited model beside it)."""
        mine = [(p, o) for p, o in zip(self.probes.probes, outputs, strict=True) if p.kind == "locality"]
        num = self.probes.num_locality
        predicted = gather_rows({p.slot: o.predicted for p, o in mine}, num, self.ranks, device)
        generated = None
        if self.settings.generation and not deferred:
            generated = gather_rows({p.slot: o.generated or [] for p, o in mine}, num, self.ranks, device)
        return Reference(
            predicted, generated, self.probes.key, self.settings.max_new_tokens, deferred=deferred
        )

    def _probe_scores(
        self, probe: Probe, output: ProbeOutput, reference: Reference | None
    ) -> dict[str, float]:
        budget_em = probe.example.num_target_tokens + EXTRA_NEW_TOKENS
        budget_wild = self.settings.max_new_tokens
        text = self.tokenizer
        if probe.kind != "locality":
            target = probe.example.input_ids[probe.example.num_prompt_tokens :]
            scores = {"tf": token_accuracy(output.predicted, target)}
            if output.generated is not None:
                scores["em"] = float(
                    exact_match(greedy_text(text, output.generated, budget_em), probe.answer)
                )
                scores["wild"] = float(
                    exact_match(greedy_text(text, output.generated, budget_wild), probe.answer)
                )
            return scores
        if reference is None:
            return {}
        expected = reference.predicted[probe.slot]
        if len(expected) != len(output.predicted):
            raise ValueError(
                "a locality probe's length differs from the Reference's: recompute the Reference"
            )
        scores = {"tf": token_accuracy(output.predicted, expected)}
        before = output.other_generated
        if before is None and reference.generated is not None:
            before = reference.generated[probe.slot]
        if output.generated is not None and before is not None:
            em = exact_match(
                greedy_text(text, output.generated, budget_em), greedy_text(text, before, budget_em)
            )
            wild = greedy_text(text, output.generated, budget_wild) == greedy_text(text, before, budget_wild)
            scores["em"], scores["wild"] = float(em), float(wild)
        return scores

    def reduce(self, scores: EditScores, device: torch.device) -> Sums:
        """This rank's per-edit sums added over ranks (float64, in the fixed ``METRIC_KEYS`` order)."""
        local = scores.sums()
        table = torch.tensor([local.get(k, (0.0, 0)) for k in METRIC_KEYS], dtype=torch.float64)
        if self.ranks.world_size > 1:
            table = self.ranks.all_reduce_sum(table.to(device)).cpu()
        return {
            k: (float(total), int(count))
            for k, (total, count) in zip(METRIC_KEYS, table.tolist(), strict=True)
            if count
        }

    def metrics(
        self,
        outputs: Sequence[ProbeOutput],
        reference: Reference | None,
        device: torch.device,
        *,
        perplexity: float | None = None,
        perplexity_base: float | None = None,
    ) -> EditMetrics:
        """Score this rank's outputs against ``reference`` (locality) and the answers; reduce over ranks."""
        if reference is not None:
            reference.check(
                self.probes.key,
                self.probes.num_locality,
                self.settings.generation,
                self.settings.max_new_tokens,
            )
        scores = EditScores()
        for probe, output in zip(self.probes.probes, outputs, strict=True):
            for family, value in self._probe_scores(probe, output, reference).items():
                scores.add(f"{probe.kind}_{family}", probe.edit, value)
        return metrics_from_sums(
            self.reduce(scores, device), self.probes.counts(), perplexity, perplexity_base
        )

    # -- the two passes of a run -----------------------------------------------------------------------

    def unedited(
        self,
        model: nn.Module,
        heldout_texts: Sequence[str] | None = None,
        *,
        forward: FullForward | None = None,
        defer_locality_generation: bool = False,
    ) -> tuple[Reference, EditMetrics]:
        """One pass of the unedited model: the locality Reference and the model's own metrics. With
        ``defer_locality_generation`` the locality probes are not decoded here: the edited pass decodes
        them beside the edited model (``edited(..., unedited_weights=...)``), as far as the two agree."""
        pending = None
        if defer_locality_generation:
            pending = Reference([], None, self.probes.key, self.settings.max_new_tokens, deferred=True)
        outputs = self.run(model, pending, unedited=True, forward=forward, desc="unedited")
        device = model_device(model)
        reference = self.reference_from(outputs, device, deferred=defer_locality_generation)
        perplexity = self._perplexity(model, heldout_texts)
        # its own locality: its generations against themselves (1.0 as with a stored Reference; deferred,
        # the first tokens stand for them), so the unedited column is the same under every strategy
        own = reference if not reference.deferred else self.reference_from(outputs, device)
        metrics = self.metrics(outputs, own, device, perplexity=perplexity)
        reference.metrics = metrics.to_dict()
        return reference, metrics

    def edited(
        self,
        model: nn.Module,
        reference: Reference | None,
        heldout_texts: Sequence[str] | None = None,
        *,
        perplexity_base: float | None = None,
        forward: FullForward | None = None,
        unedited_weights: UneditedWeights | None = None,
    ) -> EditMetrics:
        """The edited model's metrics; ``unedited_weights`` is required when the Reference deferred its
        locality generations."""
        if reference is not None and reference.deferred and self.settings.generation:
            if unedited_weights is None:
                raise ValueError(
                    "the Reference left the locality generations to the edited pass: give it the "
                    "unedited weights, or recompute the Reference with generations"
                )
        else:
            unedited_weights = None
        outputs = self.run(
            model, reference, forward=forward, desc="edited", unedited_weights=unedited_weights
        )
        perplexity = self._perplexity(model, heldout_texts)
        return self.metrics(
            outputs, reference, model_device(model), perplexity=perplexity, perplexity_base=perplexity_base
        )

    def _perplexity(self, model: nn.Module, texts: Sequence[str] | None) -> float | None:
        if not texts:
            return None
        import math

        total, count = self.perplexity_sums(model, texts)
        if count == 0:
            raise ValueError("perplexity needs at least one held-out text of two or more tokens")
        return math.exp(total / count)


def _settings(batch_size: int, generation: bool, max_new_tokens: int, progress: bool) -> EvalSettings:
    return EvalSettings(
        batch_size=batch_size, generation=generation, max_new_tokens=max_new_tokens, progress=progress
    )


def compute_reference(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    *,
    encoding: Encoding | None = None,
    batch_size: int = 256,
    generation: bool = True,
    max_new_tokens: int = 40,
    ranks: Ranks | None = None,
    progress: bool = False,
) -> Reference:
    """The unedited model's Reference on the locality probes (and its own metrics, in ``.metrics``)."""
    settings = _settings(batch_size, generation, max_new_tokens, progress)
    evaluator = Evaluator(tokenizer, requests, encoding=encoding, settings=settings, ranks=ranks)
    return evaluator.unedited(model)[0]


def evaluate_edits(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    reference: Reference | None,
    *,
    encoding: Encoding | None = None,
    batch_size: int = 256,
    generation: bool = True,
    max_new_tokens: int = 40,
    heldout_texts: Sequence[str] | None = None,
    perplexity_base: float | None = None,
    ranks: Ranks | None = None,
    progress: bool = False,
) -> EditMetrics:
    """All metrics of a model on ``requests``; locality needs the unedited model's ``reference``."""
    settings = _settings(batch_size, generation, max_new_tokens, progress)
    evaluator = Evaluator(tokenizer, requests, encoding=encoding, settings=settings, ranks=ranks)
    return evaluator.edited(model, reference, heldout_texts, perplexity_base=perplexity_base)
