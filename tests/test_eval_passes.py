"""The model passes on a tiny real Llama: padding, batching and the KV cache change no result."""

from __future__ import annotations

import math

import pytest
import torch

from locft_dist.edits.encode import EncodedExample
from locft_dist.eval import compute_reference, evaluate_edits, perplexity_texts
from locft_dist.eval.generate import greedy_generate, stop_tokens
from locft_dist.eval.passes import Decoding, run_probes
from tests.eval_fixtures import tiny_llama, word_tokenizer
from tests.test_eval_metrics import REQUESTS

# The greedy loop must use the current cache argument: a deprecated one is an error here.
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def never_stop(tokenizer):
    """No token ends a generation: every row decodes to its full budget."""
    return torch.zeros(len(tokenizer), dtype=torch.bool)


PROMPTS = ["the capital of france is", "rome", "what language is spoken in italy"]


def test_perplexity_equals_exp_of_hand_computed_nll(llama, tokenizer):
    texts = ["the capital of france is paris .", "rome", "language spoken in italy is italian", "a city"]
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(tokenizer(text)["input_ids"])
            if len(ids) < 2:
                continue
            logits = llama(ids[None]).logits[0]
            total += torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
            count += len(ids) - 1
    assert perplexity_texts(llama, tokenizer, texts, batch_size=3) == pytest.approx(
        math.exp(total / count), rel=1e-5
    )


def test_greedy_decoding_with_left_padding_and_cache_matches_one_row_and_teacher_forcing(
    llama, tokenizer, never_stop
):
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    batched = greedy_generate(llama, prompt_ids, max_new_tokens=5, pad_id=0, stop=never_stop)
    for ids, generated in zip(prompt_ids, batched, strict=True):
        assert len(generated) == 5
        assert generated == greedy_generate(llama, [ids], max_new_tokens=5, pad_id=0, stop=never_stop)[0]
        # the model's own full forward, token by token, agrees with the cached loop
        sequence = list(ids)
        for _ in range(5):
            with torch.no_grad():
                sequence.append(int(llama(torch.tensor([sequence])).logits[0, -1].argmax()))
        assert sequence[len(ids) :] == generated
        example = EncodedExample(tuple(ids + generated), len(ids))
        assert run_probes(llama, [example], pad_id=0, batch_size=1)[0].predicted == generated


def test_the_fused_pass_decodes_as_the_plain_greedy_loop(llama, tokenizer, never_stop):
    """The answer's columns are cut off the teacher-forced forward's cache: generation does not see them."""
    answers = ["paris city", "is", "french , german"]
    examples = [
        EncodedExample(
            tuple(tokenizer(p)["input_ids"] + tokenizer(a)["input_ids"]), len(tokenizer(p)["input_ids"])
        )
        for p, a in zip(PROMPTS, answers, strict=True)
    ]
    limits = [6, 3, 4]
    outputs = run_probes(llama, examples, pad_id=0, batch_size=3, decoding=Decoding(limits, never_stop))
    for example, output, limit in zip(examples, outputs, limits, strict=True):
        prompt = list(example.input_ids[: example.num_prompt_tokens])
        alone = greedy_generate(llama, [prompt], max_new_tokens=limit, pad_id=0, stop=never_stop)[0]
        assert output.generated == alone
        alone_tf = run_probes(llama, [example], pad_id=0, batch_size=1)[0].predicted
        assert output.predicted == alone_tf


def test_stop_tokens_end_decoding_and_are_kept(llama, tokenizer):
    stop = stop_tokens(tokenizer, len(tokenizer))
    assert stop[tokenizer.convert_tokens_to_ids(".")] and stop[tokenizer.eos_token_id]
    assert not stop[tokenizer.convert_tokens_to_ids(",")]
    stop_all = torch.ones(len(tokenizer), dtype=torch.bool)  # every token stops: one token each
    rows = greedy_generate(
        llama, [tokenizer(p)["input_ids"] for p in PROMPTS], max_new_tokens=9, pad_id=0, stop=stop_all
    )
    assert [len(r) for r in rows] == [1, 1, 1]


def test_metrics_do_not_depend_on_batch_size_and_training_mode_is_restored(llama, tokenizer):
    llama.train()
    ref_1 = compute_reference(llama, tokenizer, REQUESTS, batch_size=1)
    ref_8 = compute_reference(llama, tokenizer, REQUESTS, batch_size=8)
    assert ref_1.predicted == ref_8.predicted and ref_1.generated == ref_8.generated
    heldout = ["the capital of italy is rome .", "french is spoken in france"]
    m_1 = evaluate_edits(llama, tokenizer, REQUESTS, ref_1, batch_size=1, heldout_texts=heldout)
    m_8 = evaluate_edits(llama, tokenizer, REQUESTS, ref_8, batch_size=8, heldout_texts=heldout)
    assert m_1.to_dict() == pytest.approx(m_8.to_dict())
    assert m_1.locality_tf == 1.0 and m_1.locality_em == 1.0 and m_1.locality_wild == 1.0
    assert llama.training
    llama.eval()


def test_settling_early_changes_no_metric_and_saves_decoding_steps(llama, tokenizer):
    """Generations stop once their result is known (a mismatch in completed words, a divergence from the
    unedited text); the metrics are those of decoding every probe to its end."""
    from locft_dist.eval import EvalSettings, Evaluator

    calls = [0]
    llama.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    results = {}
    for early in (False, True):
        settings = EvalSettings(batch_size=4, max_new_tokens=12, early_stop=early)
        evaluator = Evaluator(tokenizer, REQUESTS, settings=settings)
        calls[0] = 0
        reference, before = evaluator.unedited(llama)
        with torch.no_grad():
            llama.model.layers[1].mlp.down_proj.weight.mul_(1.5)  # an "edit"
        after = evaluator.edited(llama, reference)
        with torch.no_grad():
            llama.model.layers[1].mlp.down_proj.weight.div_(1.5)
        results[early] = (reference, before, after, calls[0])
    assert results[True][0] == results[False][0]  # the Reference runs to its end either way
    assert results[True][1:3] == results[False][1:3]
    assert results[True][3] < results[False][3]


def test_pooled_stragglers_decode_what_their_own_batches_would():
    """A batch's last rows still decoding are parked and continued with other batches' rows: every row's
    tokens are those of decoding it in its own batch to the end."""
    import random

    from locft_dist.edits.encode import EncodedExample
    from locft_dist.eval.generate import stop_tokens
    from locft_dist.eval.passes import PARK_DIVISOR, Decoding, run_probes
    from tests.eval_fixtures import WORDS, tiny_llama, word_tokenizer

    tokenizer = word_tokenizer()
    model = tiny_llama(tokenizer, num_layers=2).eval()
    calls = [0]
    model.model.layers[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    rng = random.Random(0)
    words = [w for w in WORDS if w not in ("<pad>", "</s>", "<unk>", ".")]
    examples = []
    for _ in range(40):
        prompt = tokenizer(" ".join(rng.choices(words, k=rng.randint(2, 6))))["input_ids"]
        answer = tokenizer.convert_tokens_to_ids("paris")
        examples.append(EncodedExample((*prompt, answer), len(prompt)))
    stop = stop_tokens(tokenizer, len(tokenizer))
    decoding = Decoding([rng.randint(3, 30) for _ in examples], stop)
    kwargs = {"pad_id": tokenizer.pad_token_id, "batch_size": 2 * PARK_DIVISOR, "decoding": decoding}
    pooled = run_probes(model, examples, **kwargs)
    pooled_calls, calls[0] = calls[0], 0
    alone = run_probes(model, examples, pool_stragglers=False, **kwargs)
    assert pooled_calls < calls[0]  # fewer forwards: the long rows of three batches decode together
    assert [o.generated for o in pooled] == [o.generated for o in alone]
    assert [o.predicted for o in pooled] == [o.predicted for o in alone]
    lengths = sorted(len(o.generated) for o in alone)
    assert lengths[0] < lengths[-1] and lengths[-1] > 10  # rows of a batch end far apart
