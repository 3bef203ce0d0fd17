"""Editing metrics on hand-made cases with known answers, plus padding invariance on a tiny real Llama."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from locft_dist.edits.encode import EncodedExample
from locft_dist.edits.schema import EditRequest, LocalityProbe
from locft_dist.eval_generation import cut_at_stop, greedy_generate, target_argmax
from locft_dist.evaluate import (
    EditMetrics,
    Reference,
    compute_reference,
    evaluate_edits,
    exact_match,
    format_metrics_table,
    harmonic_mean,
    normalize_answer,
    perplexity_texts,
    save_metrics,
)

WORDS = (  # noqa: SIM905 (a word list reads better as one string)
    "<pad> </s> <unk> the a capital of france italy germany is paris rome berlin city hall center town "
    "what has language spoken in french italian german . , milan"
).split()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lowercasing, no BOS: one token per word, so the expected values can be counted by hand."""
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


class ScriptedLM(torch.nn.Module):
    """A causal LM whose greedy continuation of each known prompt is a fixed text, then EOS.

    After a known prompt plus k more tokens (whatever they are) it predicts the k-th continuation token,
    so teacher-forced argmax and greedy decoding are both known exactly. Returns no KV cache.
    """

    def __init__(self, tokenizer, continuations: dict[str, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.vocab_size = len(tokenizer)
        self.unk = tokenizer.unk_token_id
        eos = tokenizer.eos_token_id
        self.scripts = sorted(
            (
                (tuple(tokenizer(p)["input_ids"]), [*tokenizer(c)["input_ids"], eos])
                for p, c in continuations.items()
            ),
            key=lambda item: -len(item[0]),
        )

    def _next(self, prefix: tuple[int, ...]) -> int:
        for prompt, continuation in self.scripts:
            if prefix[: len(prompt)] == prompt:
                k = len(prefix) - len(prompt)
                return continuation[k] if k < len(continuation) else continuation[-1]
        return self.unk

    def forward(self, input_ids, attention_mask=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for b in range(input_ids.size(0)):
            real: list[int] = []
            for t in range(input_ids.size(1)):
                if mask[b, t]:
                    real.append(int(input_ids[b, t]))
                if real:
                    logits[b, t, self._next(tuple(real))] = 10.0
        return SimpleNamespace(logits=logits)


REQUESTS = [
    EditRequest(
        prompt="the capital of france is",
        target_new="paris city center",
        rephrase_prompts=("what is the capital of france", "france capital"),
        locality_prompts=(
            LocalityProbe("language spoken in france is", "french"),
            LocalityProbe("language spoken in italy is", "italian city"),
        ),
    ),
    EditRequest(prompt="the capital of italy is", target_new="Rome"),
    EditRequest(
        prompt="the capital of germany is",
        target_new="berlin",
        rephrase_prompts=("germany capital",),
        locality_prompts=(LocalityProbe("language spoken in germany is", "german"),),
    ),
]

UNEDITED = {
    "language spoken in france is": "french",
    "language spoken in italy is": "italian town",
    "language spoken in germany is": "german",
}
EDITED = {
    "the capital of france is": "paris city hall",  # tf 2/3, em no
    "what is the capital of france": "paris city center .",  # tf 1, em yes (cut at ".")
    "france capital": "rome city center",  # tf 2/3, em no
    "the capital of italy is": "the rome .",  # tf 0, em yes ("the" is an article)
    "the capital of germany is": "berlin",
    "germany capital": "berlin",
    "language spoken in france is": "french",  # agrees with the unedited model
    "language spoken in italy is": "italian city",  # agrees on 1 of 2 positions
    "language spoken in germany is": "french",  # disagrees
}


@pytest.fixture(scope="module")
def scripted_metrics(tokenizer) -> EditMetrics:
    reference = compute_reference(ScriptedLM(tokenizer, UNEDITED), tokenizer, REQUESTS, batch_size=2)
    return evaluate_edits(ScriptedLM(tokenizer, EDITED), tokenizer, REQUESTS, reference, batch_size=2)


def test_teacher_forced_metrics_match_hand_counts(scripted_metrics):
    m = scripted_metrics
    assert m.reliability_tf == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert m.generalization_tf == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)  # edit 2 has no rephrases
    assert m.locality_tf == pytest.approx(((1 + 0.5) / 2 + 0) / 2)  # edit 2 has no locality probes
    assert m.edit_score_tf == pytest.approx(
        harmonic_mean([m.reliability_tf, m.generalization_tf, m.locality_tf])
    )
    assert (m.num_edits, m.num_rephrases, m.num_locality) == (3, 3, 3)
    assert (m.num_edits_with_rephrases, m.num_edits_with_locality) == (2, 2)


def test_exact_match_metrics_match_hand_counts(scripted_metrics):
    m = scripted_metrics
    assert m.reliability_em == pytest.approx(2 / 3)
    assert m.generalization_em == pytest.approx(((1 + 0) / 2 + 1) / 2)
    assert m.locality_em == pytest.approx(((1 + 0) / 2 + 0) / 2)
    assert m.edit_score_em == pytest.approx(3 / (1.5 + 1 / 0.75 + 4))
    assert m.perplexity is None and m.perplexity_base is None


def test_reference_holds_unedited_predictions_and_round_trips(tokenizer):
    reference = compute_reference(ScriptedLM(tokenizer, UNEDITED), tokenizer, REQUESTS, batch_size=8)
    ids = tokenizer.convert_tokens_to_ids
    assert reference.locality_ids == [[[ids("french")], [ids("italian"), ids("town")]], [], [[ids("german")]]]
    assert reference.locality_texts == [["french", "italian town"], [], ["german"]]
    assert Reference.from_json(json.loads(json.dumps(reference.to_json()))) == reference
    with pytest.raises(ValueError, match="other locality probes"):
        swapped = [REQUESTS[2], REQUESTS[1], REQUESTS[0]]
        evaluate_edits(ScriptedLM(tokenizer, EDITED), tokenizer, swapped, reference)


def test_without_reference_or_generation_those_metrics_are_none(tokenizer):
    model = ScriptedLM(tokenizer, EDITED)
    m = evaluate_edits(model, tokenizer, REQUESTS, None, generation=False)
    assert m.locality_tf is None and m.locality_em is None
    assert m.reliability_em is None and m.generalization_em is None and m.edit_score_em is None
    assert m.edit_score_tf == pytest.approx(harmonic_mean([m.reliability_tf, m.generalization_tf]))
    bare = evaluate_edits(model, tokenizer, [REQUESTS[1]], None, generation=False)
    assert bare.generalization_tf is None and bare.edit_score_tf == 0.0


def test_normalization_and_exact_match():
    assert normalize_answer("The  Paris.") == "paris"
    assert exact_match("The  Paris.", "paris")
    assert normalize_answer("An apple, a pear!") == "apple pear"
    assert normalize_answer("Theater") == "theater"
    assert not exact_match("paris city", "paris")
    assert cut_at_stop(" Paris, France. It is\nbig") == " Paris, France"
    assert cut_at_stop("line one\nline. two") == "line one"


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.9, 0.0, 1.0]) == 0.0
    assert harmonic_mean([None, 0.4, None]) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        harmonic_mean([None])


@pytest.fixture(scope="module")
def llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,  # well separated logits: no argmax ties that float noise could flip
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def test_perplexity_equals_exp_of_hand_computed_nll(llama, tokenizer):
    texts = ["the capital of france is paris .", "rome", "language spoken in italy is italian", "a city"]
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(tokenizer(text)["input_ids"])
            logits = llama(ids[None]).logits[0]
            total += torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
            count += len(ids) - 1
    assert perplexity_texts(llama, tokenizer, texts, batch_size=3) == pytest.approx(
        math.exp(total / count), rel=1e-5
    )


def test_greedy_decoding_with_left_padding_and_cache_matches_teacher_forcing(llama, tokenizer):
    prompts = ["the capital of france is", "rome", "what language is spoken in italy"]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    batched = greedy_generate(llama, prompt_ids, max_new_tokens=5, pad_id=0, eos_id=tokenizer.eos_token_id)
    for ids, generated in zip(prompt_ids, batched, strict=True):
        assert (
            generated
            == greedy_generate(llama, [ids], max_new_tokens=5, pad_id=0, eos_id=tokenizer.eos_token_id)[0]
        )
        example = EncodedExample(tuple(ids + generated), len(ids))
        if generated:
            assert target_argmax(llama, [example], pad_id=0, batch_size=1, progress=False, desc="") == [
                generated
            ]


def test_metrics_do_not_depend_on_batch_size_and_training_mode_is_restored(llama, tokenizer):
    llama.train()
    ref_1 = compute_reference(llama, tokenizer, REQUESTS, batch_size=1)
    ref_8 = compute_reference(llama, tokenizer, REQUESTS, batch_size=8)
    assert ref_1 == ref_8
    heldout = ["the capital of italy is rome .", "french is spoken in france"]
    m_1 = evaluate_edits(llama, tokenizer, REQUESTS, ref_1, batch_size=1, heldout_texts=heldout)
    m_8 = evaluate_edits(llama, tokenizer, REQUESTS, ref_8, batch_size=8, heldout_texts=heldout)
    assert m_1.to_dict() == pytest.approx(m_8.to_dict())
    assert m_1.locality_tf == 1.0 and m_1.locality_em == 1.0  # unedited model agrees with itself
    assert llama.training


def test_table_and_json(scripted_metrics, tmp_path):
    table = format_metrics_table(
        {"LocFT-BF": scripted_metrics, "depth-first": {"reliability_tf": 0.25}}, title="demo"
    )
    lines = table.splitlines()
    assert lines[0] == "demo" and "LocFT-BF" in lines[1] and "depth-first" in lines[1]
    row = next(line for line in lines if line.startswith("Reliability TF"))
    assert "0.556" in row and "0.250" in row
    assert next(line for line in lines if line.startswith("Perplexity ")).split()[1:] == ["-", "-"]
    assert "0.917" in table and "0.375" in table
    path = tmp_path / "run" / "metrics.json"
    save_metrics(path, {"edited": scripted_metrics, "note": "x"})
    loaded = json.loads(path.read_text())
    assert loaded["edited"]["reliability_tf"] == pytest.approx(5 / 9) and loaded["note"] == "x"
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
