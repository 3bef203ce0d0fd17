"""augment.wordings: other wordings of an edit's relation, learned from a dataset's records, held out from the
edit's own rephrase probes, trained beside the prompt (and under the pseudo-paraphrase prefixes)."""

import json

import pytest

from locft_dist.config import load_config
from locft_dist.edit_job import run_edit
from locft_dist.edits import EditRequest, augment_store, write_jsonl
from locft_dist.edits import augment as aug
from locft_dist.edits.encode import Encoding, encode_pairs
from locft_dist.edits.wordings import WordingIndex, edit_wordings, wording, wordings_for_edits
from locft_dist.errors import ConfigError
from locft_dist.subject_rows import choose_subject_rows, subject_token_ids
from tests.tokenizer_families import byte_level_tokenizer


def _record(subject: str, prompt: str, *rephrases: str) -> EditRequest:
    return EditRequest(prompt.format(subject), "x", subject=subject, rephrase_prompts=tuple(rephrases))


# A pool as CounterFact's: each record pairs its prompt's wording with a rephrasing (after unrelated text).
POOL = [
    _record("Ada Brill", "The mother tongue of {} is", "It rained all day. Ada Brill's mother tongue is"),
    _record("Oto Fenn", "The mother tongue of {} is", "Oto Fenn is a native speaker of"),
    _record("Ike Moss", "The mother tongue of {} is", "Ike Moss's mother tongue is"),
    _record("Ula Gray", "{}'s mother tongue is", "The mother tongue of Ula Gray is"),
    _record("Bo Lind", "The mother tongue of {} is", "Bo Lind is a native speaker of"),
    _record("Cy Roe", "{} works as a", "The profession of Cy Roe is"),
    _record("Di Vos", "{} works as a", "The profession of Di Vos is"),
]


def test_a_wording_is_the_sentence_that_names_the_subject():
    assert wording("The mother tongue of Ada Brill is", "Ada Brill") == "The mother tongue of {} is"
    assert wording("It rained all day. Ada Brill's mother tongue is", "Ada Brill") == "{}'s mother tongue is"
    assert wording("Where Ada Brill is from, people speak", "Ada Brill") == "Where {} is from, people speak"
    assert wording("Why? Well\nAda Brill plays", "Ada Brill") == "{} plays"
    assert wording("Nobody here plays", "Ada Brill") is None
    assert wording("Ada Brill plays", None) is None


def test_wordings_paired_most_often_come_first_and_rare_pairs_are_dropped():
    index = WordingIndex.from_records(POOL, skip_subjects=set())
    assert index.related("The mother tongue of {} is", min_count=1) == [
        "{}'s mother tongue is",  # 3 records pair them (one each way round)
        "{} is a native speaker of",  # 2
    ]
    assert index.related("The mother tongue of {} is", min_count=3) == ["{}'s mother tongue is"]
    assert index.related("{} works as a", min_count=1) == ["The profession of {} is"]
    assert index.related("{} was born in", min_count=1) == []


def test_an_edit_never_trains_in_its_own_rephrase_probes_wording_nor_learns_from_its_subjects_records():
    edit = _record("Zed Korr", "The mother tongue of {} is", "Some text. Zed Korr's mother tongue is")
    index = WordingIndex.from_records(POOL, skip_subjects=set())
    assert edit_wordings(index, edit, num=5, min_count=1) == ["Zed Korr is a native speaker of"]
    unprobed = _record("Zed Korr", "The mother tongue of {} is")
    assert edit_wordings(index, unprobed, num=1, min_count=1) == ["Zed Korr's mother tongue is"]
    # the pool's records of an edited subject teach nothing (their prompts may be the edit's probes)
    edits = [_record("Ike Moss", "The mother tongue of {} is")]
    assert wordings_for_edits(POOL, edits, num=5, min_count=3) == [[]]  # Ike Moss's pair no longer counts
    assert wordings_for_edits(POOL, edits, num=5, min_count=2) == [  # 2 records each: ties go by text
        ["Ike Moss is a native speaker of", "Ike Moss's mother tongue is"]
    ]


def test_subject_rows_include_the_subjects_tokens_in_the_other_wordings():
    tokenizer = byte_level_tokenizer(add_bos=False)  # " Eiffel" and "E", "iff", "el": GPT-2-style pieces
    edit = EditRequest("The Eiffel Tower is located in", "Rome", subject="Eiffel Tower")
    other = "Eiffel Tower is in"  # the subject opens the sentence: no leading space
    alone = choose_subject_rows(tokenizer, [edit], [], max_share=0.0)
    both = choose_subject_rows(tokenizer, [edit], [], max_share=0.0, other_prompts=[[other]])
    opening = set(subject_token_ids(tokenizer, other, "Eiffel Tower"))
    assert opening - set(alone.rows), "the tokenizer should split an opening subject differently"
    assert set(both.rows) == set(alone.rows) | opening


def test_examples_are_the_wordings_then_prefixes_cycling_over_wordings_and_prompt(
    tiny_model_dir, tiny_tokenizer
):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "augment.paraphrases=3"])
    requests = [EditRequest("Vorin Talbeck is", "amber"), EditRequest("Kesso Varn is", "glass")]
    words = [["Talbeck plays", "Vorin sings"], []]
    generated = augment_store.Generated(["x0", "x1", "x2", "y0", "y1", "y2"], [])
    expected = [
        ("Talbeck plays", "amber"),
        ("Vorin sings", "amber"),
        ("x0. Talbeck plays", "amber"),
        ("x1. Vorin sings", "amber"),
        ("x2. Vorin Talbeck is", "amber"),
        ("y0. Kesso Varn is", "glass"),
        ("y1. Kesso Varn is", "glass"),
        ("y2. Kesso Varn is", "glass"),
    ]
    prompts, targets = zip(*expected, strict=True)
    encoding = Encoding.from_config(cfg.edits)
    assert aug._examples(tiny_tokenizer, requests, cfg, generated, words) == encode_pairs(
        tiny_tokenizer, list(prompts), list(targets), encoding
    )
    # without wordings every prefix goes before the prompt, as before the option existed
    assert aug._examples(tiny_tokenizer, requests, cfg, generated, []) == encode_pairs(
        tiny_tokenizer, [p for p, _ in expected[2:]][:0] + [f"{x}. {r.prompt}" for r, xs in
                         zip(requests, (["x0", "x1", "x2"], ["y0", "y1", "y2"]), strict=True) for x in xs],
        ["amber"] * 3 + ["glass"] * 3, encoding,
    )  # fmt: skip


def test_the_cache_key_is_unchanged_while_wordings_are_off(tiny_model_dir, tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_jsonl(POOL, pool)
    base = [f"model.path={tiny_model_dir}", "augment.paraphrases=2"]
    off = aug._key(load_config(None, base), "e", "b")
    assert off == aug._key(load_config(None, [*base, f"augment.wordings_path={pool}"]), "e", "b")
    on = aug._key(load_config(None, [*base, "augment.wordings=2", f"augment.wordings_path={pool}"]), "e", "b")
    assert on != off
    with pytest.raises(ConfigError, match=r"augment\.wordings_path"):
        load_config(None, [*base, "augment.wordings=2"])


def test_a_subject_row_run_trains_every_example_of_the_wordings_each_epoch(tiny_model_dir, tmp_path):
    edits, pool, common = tmp_path / "edits.jsonl", tmp_path / "pool.jsonl", tmp_path / "common.txt"
    write_jsonl(
        [
            EditRequest("The mother tongue of Vorin Talbeck is", "Baltholm", subject="Vorin Talbeck"),
            EditRequest("Kesso Varn works as a", "glassblower", subject="Kesso Varn"),
        ],
        edits,
    )
    write_jsonl(POOL, pool)
    common.write_text("The favourite colour of Rina Sol is\n")
    run = tmp_path / "run"
    overrides = [
        f"model.path={tiny_model_dir}",
        f"edits.path={edits}",
        f"output.dir={run}",
        "locate.subject_embeddings=true",
        f"locate.common_text_path={common}",
        "locate.common_token_share=0",
        "augment.wordings=2",
        f"augment.wordings_path={pool}",
        "augment.wordings_min_count=1",
        "train.epochs=2",
        "train.batch_size=2",
        "train.progress=false",
        "dist.strategy=none",
        "model.device=cpu",
        "eval.enabled=false",
    ]
    run_edit(load_config(None, overrides))
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert next(e for e in events if e["event"] == "augment")["wordings"] == 3  # 2 + 1 ("profession")
    steps = [e for e in events if e["event"] == "step"]
    assert sum(e["batch_edits"] for e in steps) == 2 * (2 + 3)


def test_a_missing_wordings_file_fails_before_the_run_directory_exists(tiny_model_dir, tmp_path):
    from locft_dist.errors import EditDataError

    edits = tmp_path / "edits.jsonl"
    write_jsonl([EditRequest("Kesso Varn works as a", "glassblower", subject="Kesso Varn")], edits)
    overrides = [
        f"model.path={tiny_model_dir}",
        f"edits.path={edits}",
        f"output.dir={tmp_path / 'run'}",
        "augment.wordings=2",
        f"augment.wordings_path={tmp_path / 'missing.jsonl'}",
        "dist.strategy=none",
        "model.device=cpu",
    ]
    with pytest.raises(EditDataError, match=r"missing\.jsonl"):
        run_edit(load_config(None, overrides))
    assert not (tmp_path / "run").exists()
