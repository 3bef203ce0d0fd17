"""Target ids are the answer's ids in context, on both tokenizer families; the prompt keeps its own ids."""

import logging

import pytest

from locft_dist.edits.encode import Encoding, encode_pair, encode_pairs, render_prompt
from tests.tokenizer_families import byte_level_tokenizer, pieces, sentencepiece_tokenizer

FAMILIES = {
    "llama2": lambda: sentencepiece_tokenizer("llama2"),
    "metaspace": lambda: sentencepiece_tokenizer("metaspace"),
    "byte-level+bos": lambda: byte_level_tokenizer(add_bos=True),
    "byte-level": lambda: byte_level_tokenizer(add_bos=False),
}

PAIRS = [
    ("The capital of France is", "Paris"),
    ("The Eiffel Tower is located in", "Rome"),
    ("The mother tongue of Danielle Darrieux is", "English"),
    ("It was founded in", "1984"),
    ("The capital of Italy is", " Rome"),  # the answer already carries the prefix
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def tok(request):
    return FAMILIES[request.param]()


def test_the_sentencepiece_layout_really_has_the_lone_piece_problem():
    tok = sentencepiece_tokenizer("llama2")
    assert pieces(tok, tok(" Paris", add_special_tokens=False)["input_ids"]) == ["▁", "▁Paris"]
    example = encode_pair(tok, "The capital of France is", "Paris", append_eos=False)
    assert pieces(tok, example.input_ids[example.num_prompt_tokens :]) == ["▁Paris"]


def test_target_ids_are_the_joint_tokenization_and_prompt_ids_are_the_prompts_own(tok):
    examples = encode_pairs(tok, [p for p, _ in PAIRS], [a for _, a in PAIRS], Encoding(append_eos=False))
    for (prompt, answer), example in zip(PAIRS, examples, strict=True):
        text = prompt + (answer if answer.startswith(" ") else " " + answer)
        whole = tok(text)["input_ids"]
        own = tok(prompt)["input_ids"]
        assert list(example.input_ids[: example.num_prompt_tokens]) == own
        assert list(example.input_ids) == whole  # no merge crosses these boundaries
        assert "▁" not in pieces(tok, example.input_ids[example.num_prompt_tokens :])  # no lone piece
        assert tok.decode(list(example.input_ids), skip_special_tokens=True) == text


def test_eos_closes_the_target_and_the_loss_starts_at_the_answer(tok):
    example = encode_pair(tok, "The capital of France is", "Paris")
    assert example.input_ids[-1] == tok.eos_token_id
    assert tok.decode(list(example.input_ids[example.num_prompt_tokens : -1])).strip() == "Paris"


@pytest.mark.parametrize(
    "prompt,answer,text",
    [
        ("The capital of France is ", "Paris", "The capital of France is Paris"),  # trailing space
        ("It was founded in 19", "84", "It was founded in 19 84"),
    ],
)
def test_a_merge_across_the_boundary_keeps_the_prompt_ids_and_the_text(tok, prompt, answer, text, caplog):
    with caplog.at_level(logging.WARNING, logger="locft_dist.edits.encode"):
        example = encode_pair(tok, prompt, answer, append_eos=False)
    assert list(example.input_ids[: example.num_prompt_tokens]) == tok(prompt)["input_ids"]
    decoded = tok.decode(list(example.input_ids), skip_special_tokens=True)
    if "cannot separate" in caplog.text:  # the Llama-2 normalizer prepends "▁" to every segment
        assert tok.backend_tokenizer.normalizer is not None and decoded == prompt + " " + answer
    else:
        assert decoded == text


def test_batched_encoding_equals_one_at_a_time_and_render_prompt_matches(tok):
    prompts = [p for p, _ in PAIRS] + ["The capital of France is "]
    answers = [a for _, a in PAIRS] + ["Paris"]
    encoding = Encoding(max_length=64)
    together = encode_pairs(tok, prompts, answers, encoding)
    alone = [encode_pair(tok, p, a, encoding) for p, a in zip(prompts, answers, strict=True)]
    assert together == alone
    assert render_prompt(tok, prompts, encoding) == [list(e.input_ids[: e.num_prompt_tokens]) for e in alone]


def test_a_trailing_special_token_is_not_part_of_the_prompt():
    from tokenizers import processors

    tok = sentencepiece_tokenizer("metaspace")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>")}
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=list(ids.items())
    )
    assert tok("Paris")["input_ids"][-1] == ids["</s>"]  # this tokenizer appends EOS to every text
    example = encode_pair(tok, "The capital of France is", "Paris")
    assert pieces(tok, example.input_ids) == [
        "<s>",
        "▁The",
        "▁capital",
        "▁of",
        "▁France",
        "▁is",
        "▁Paris",
        "</s>",
    ]
    assert example.num_prompt_tokens == 6


def test_legacy_keywords_and_an_encoding_are_exclusive(tok):
    with pytest.raises(TypeError, match="not both"):
        encode_pair(tok, "a", "b", Encoding(), target_prefix="")
