"""edits.chat_template=auto: the prompt is a user turn, the target the assistant's reply ending the turn."""

import logging

import pytest

from locft_dist.edits.encode import Encoding, encode_pair, encode_pairs, render_prompt
from locft_dist.errors import ConfigError
from locft_dist.model import load_tokenizer
from tests.tokenizer_families import (
    CHATML_TEMPLATE,
    TRIMMING_TEMPLATE,
    byte_level_tokenizer,
    sentencepiece_tokenizer,
    with_chat_template,
)

CHAT = Encoding(chat_template="auto")


@pytest.fixture(scope="module")
def chatml():
    return with_chat_template(byte_level_tokenizer(add_bos=False), CHATML_TEMPLATE)


def _parts(tok, example):
    n = example.num_prompt_tokens
    return tok.decode(list(example.input_ids[:n])), tok.decode(list(example.input_ids[n:]))


def test_prompt_is_a_user_turn_and_target_the_reply_with_end_of_turn(chatml):
    example = encode_pair(chatml, "The capital of France is", "Paris", CHAT)
    prompt, target = _parts(chatml, example)
    assert prompt == "<|im_start|>user\nThe capital of France is<|im_end|>\n<|im_start|>assistant\n"
    assert target == "Paris<|im_end|>"  # no leading space, and not the newline after the turn
    assert example.input_ids[-1] == chatml.convert_tokens_to_ids("<|im_end|>") == chatml.eos_token_id
    rendered = chatml.apply_chat_template(
        [{"role": "user", "content": "The capital of France is"}], tokenize=False, add_generation_prompt=True
    )
    assert list(example.input_ids[: example.num_prompt_tokens]) == chatml(rendered)["input_ids"]


def test_probes_render_the_same_prompt_without_the_end_of_turn(chatml):
    prompts, answers = ["The capital of France is", "The Colosseum is located in"], ["Paris", "Rome"]
    train = encode_pairs(chatml, prompts, answers, CHAT)
    probes = encode_pairs(chatml, prompts, answers, CHAT.for_probes())
    for t, p, answer in zip(train, probes, answers, strict=True):
        assert t.input_ids[: t.num_prompt_tokens] == p.input_ids[: p.num_prompt_tokens]
        assert _parts(chatml, p)[1] == answer
        assert t.input_ids[:-1] == p.input_ids
    assert render_prompt(chatml, prompts, CHAT) == [list(p.input_ids[: p.num_prompt_tokens]) for p in probes]
    assert encode_pairs(chatml, prompts, answers, Encoding(chat_template="auto", target_prefix="")) == train


def test_no_chat_template_is_a_config_error():
    tok = byte_level_tokenizer(add_bos=False)
    with pytest.raises(ConfigError, match=r"has no chat template.*edits\.chat_template=none"):
        encode_pair(tok, "The capital of France is", "Paris", CHAT)
    with pytest.raises(ConfigError, match="no chat template"):
        render_prompt(tok, ["The capital of France is"], CHAT)


def test_a_template_that_rewrites_text_is_rendered_per_edit(caplog):
    tok = with_chat_template(sentencepiece_tokenizer("metaspace"), TRIMMING_TEMPLATE)
    prompts = ["The capital of France is  ", "The Colosseum is located in"]
    with caplog.at_level(logging.WARNING, logger="locft_dist.edits.chat"):
        examples = encode_pairs(tok, prompts, [" Paris ", "Rome"], CHAT)
    assert "rewrites message text" in caplog.text
    for prompt, example in zip(prompts, examples, strict=True):
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = list(example.input_ids)
        assert ids[: example.num_prompt_tokens] == tok(rendered, add_special_tokens=False)["input_ids"]
        assert ids.count(tok.bos_token_id) == 1  # the template writes BOS; the tokenizer does not add one
        assert ids[-1] == tok.eos_token_id
    assert tok.decode(list(examples[0].input_ids[examples[0].num_prompt_tokens :])) == "Paris</s>"


def test_a_template_without_a_special_token_after_the_reply_ends_it_with_eos(caplog):
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tok = with_chat_template(byte_level_tokenizer(add_bos=False), template)
    with caplog.at_level(logging.WARNING, logger="locft_dist.edits.chat"):
        example = encode_pair(tok, "The capital of France is", "Paris", CHAT)
    assert "no special token" in caplog.text
    assert _parts(tok, example) == ("user: The capital of France is\nassistant: ", "Paris<|im_end|>")


def test_locality_targets_continue_the_rendered_prompt(chatml):
    from locft_dist.edits.augment import locality_targets
    from tests.conftest import make_random_llama

    model = make_random_llama(len(chatml))
    prompts = ["The capital of France is", "It was founded in"]
    examples = locality_targets(model, chatml, prompts, num_tokens=3, encoding=CHAT)
    for example, ids in zip(examples, render_prompt(chatml, prompts, CHAT), strict=True):
        assert list(example.input_ids[: example.num_prompt_tokens]) == list(ids)
        assert len(example.input_ids) > len(ids)


def test_a_chat_run_trains_on_rendered_turns_and_records_its_encoding(chatml, tmp_path):
    from locft_dist.config import load_config
    from locft_dist.delta import read_delta
    from locft_dist.edit_job import load_encoded_edits, run_edit
    from locft_dist.edits import EditRequest, write_jsonl
    from tests.conftest import make_random_llama

    model_dir = tmp_path / "model"
    make_random_llama(len(chatml)).save_pretrained(model_dir)
    chatml.save_pretrained(model_dir)
    edits = [
        EditRequest(prompt=p, target_new=a)
        for p, a in [("The capital of France is", "Rome"), ("It was", "1984")]
    ]
    write_jsonl(edits, tmp_path / "edits.jsonl")
    overrides = [
        f"model.path={model_dir}",
        f"edits.path={tmp_path / 'edits.jsonl'}",
        f"output.dir={tmp_path / 'run'}",
        "edits.chat_template=auto",
        "augment.paraphrases=1",
        "augment.paraphrase_tokens=3",
        "eval.enabled=false",
        "train.epochs=2",
        "train.batch_size=2",
        "dist.strategy=none",
        "model.device=cpu",
    ]
    cfg = load_config(None, overrides)
    outcome = run_edit(cfg)
    assert read_delta(outcome.delta_path).encoding == CHAT
    examples = load_encoded_edits(cfg, load_tokenizer(model_dir), need_requests=False).examples
    assert chatml.decode(list(examples[0].input_ids)).startswith("<|im_start|>user\nThe capital of France is")
    augment = (tmp_path / "run" / "augment.json").read_text()
    assert '"prefixes"' in augment

    plain_dir = tmp_path / "plain"
    make_random_llama(len(chatml)).save_pretrained(plain_dir)
    byte_level_tokenizer(add_bos=False).save_pretrained(plain_dir)
    other = load_config(
        None, [*overrides[:2], f"model.path={plain_dir}", f"output.dir={tmp_path / 'run2'}", *overrides[3:]]
    )
    with pytest.raises(ConfigError, match="no chat template"):
        run_edit(other)
    assert not (tmp_path / "run2" / "config.yaml").exists()
