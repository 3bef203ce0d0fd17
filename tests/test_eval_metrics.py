"""Editing metrics on hand-made cases with known answers: TF, EM and WILD, the Reference, table and JSON."""

from __future__ import annotations

import json

import pytest

from locft_dist.edits.schema import EditRequest, LocalityProbe
from locft_dist.eval import (
    EditMetrics,
    Evaluator,
    Reference,
    compute_reference,
    cut_at_stop,
    evaluate_edits,
    exact_match,
    format_metrics_table,
    harmonic_mean,
    normalize_answer,
    save_metrics,
)
from locft_dist.eval.reference import load_reference, save_reference
from tests.eval_fixtures import ScriptedLM, word_tokenizer

pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


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
    # every scripted generation ends within the answer's length + 3 tokens: WILD sees the same texts
    assert (m.reliability_wild, m.generalization_wild, m.locality_wild) == (
        m.reliability_em,
        m.generalization_em,
        m.locality_em,
    )
    assert m.edit_score_wild == pytest.approx(m.edit_score_em)
    assert m.perplexity is None and m.perplexity_base is None


# Where the three families part ways, each for a known reason.
DISAGREE = [
    EditRequest(prompt="the capital of france is", target_new="paris"),
    EditRequest(prompt="what is the capital of france", target_new="paris"),
    EditRequest(
        prompt="france capital",
        target_new="paris city center",
        locality_prompts=(LocalityProbe("language spoken in france is", "french"),),
    ),
]
DISAGREE_UNEDITED = {"language spoken in france is": "french , , , german"}
DISAGREE_EDITED = {
    # right first token, then rambles: TF 1; EM's 1 + 3 tokens "paris , , ," normalize to "paris" (hit);
    # WILD reads on to "paris , , , city hall" (miss)
    "the capital of france is": "paris , , , city hall",
    # an article first: TF 0 (the first answer token is wrong), EM and WILD 1 ("the paris" -> "paris")
    "what is the capital of france": "the paris .",
    # 2 of 3 answer tokens under teacher forcing, but the greedy text is wrong: TF 2/3, EM 0, WILD 0
    "france capital": "paris city hall",
    # locality: same first 4 tokens as the unedited model (EM 1), different after them (WILD 0), TF 1
    "language spoken in france is": "french , , , italian",
}


def test_tf_em_and_wild_disagree_in_known_ways(tokenizer):
    reference = compute_reference(ScriptedLM(tokenizer, DISAGREE_UNEDITED), tokenizer, DISAGREE)
    m = evaluate_edits(ScriptedLM(tokenizer, DISAGREE_EDITED), tokenizer, DISAGREE, reference, batch_size=2)
    assert m.reliability_tf == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert m.reliability_em == pytest.approx((1 + 1 + 0) / 3)
    assert m.reliability_wild == pytest.approx((0 + 1 + 0) / 3)
    assert (m.locality_tf, m.locality_em, m.locality_wild) == (1.0, 1.0, 0.0)
    assert m.edit_score_wild == 0.0 and m.edit_score_em == pytest.approx(harmonic_mean([2 / 3, 1.0]))
    # a budget shorter than the ramble makes WILD as lenient as EM: the budget is part of the definition
    short = evaluate_edits(
        ScriptedLM(tokenizer, DISAGREE_EDITED), tokenizer, DISAGREE, reference, max_new_tokens=4
    )
    assert short.reliability_wild == pytest.approx(short.reliability_em)


def test_wild_locality_is_exact_text_equality_em_locality_is_normalized(tokenizer):
    requests = [
        EditRequest(
            prompt="the capital of italy is",
            target_new="rome",
            locality_prompts=(LocalityProbe("language spoken in italy is", "italian"),),
        )
    ]
    reference = compute_reference(
        ScriptedLM(tokenizer, {"language spoken in italy is": "italian"}), tokenizer, requests
    )
    edited = ScriptedLM(tokenizer, {"language spoken in italy is": "the italian"})
    m = evaluate_edits(edited, tokenizer, requests, reference)
    assert m.locality_em == 1.0  # "the italian" and "italian" normalize alike
    assert m.locality_wild == 0.0  # but the edited model does not say the same thing
    assert m.locality_tf == 0.0  # "the" is not "italian"


def test_reference_holds_unedited_predictions_and_round_trips(tokenizer, tmp_path):
    reference = compute_reference(ScriptedLM(tokenizer, UNEDITED), tokenizer, REQUESTS, batch_size=8)
    ids = tokenizer.convert_tokens_to_ids
    eos = tokenizer.eos_token_id
    assert reference.predicted == [[ids("french")], [ids("italian"), ids("town")], [ids("german")]]
    assert reference.generated == [
        [ids("french"), eos],
        [ids("italian"), ids("town"), eos],
        [ids("german"), eos],
    ]
    assert reference.metrics["locality_tf"] == 1.0 and reference.metrics["locality_wild"] == 1.0
    reference.key = "k1"
    path = save_reference(tmp_path / "reference.safetensors", reference)
    assert load_reference(path, "k1") == reference
    assert load_reference(path, "another key") is None  # made for something else: recompute
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable locft reference"):
        load_reference(path, "k1")
    with pytest.raises(ValueError, match="other locality probes"):
        swapped = [REQUESTS[2], REQUESTS[1], REQUESTS[0]]
        evaluate_edits(ScriptedLM(tokenizer, EDITED), tokenizer, swapped, reference)
    with pytest.raises(ValueError, match="fewer than max_new_tokens"):
        evaluate_edits(ScriptedLM(tokenizer, EDITED), tokenizer, REQUESTS, reference, max_new_tokens=50)


def test_without_reference_or_generation_those_metrics_are_none(tokenizer):
    model = ScriptedLM(tokenizer, EDITED)
    m = evaluate_edits(model, tokenizer, REQUESTS, None, generation=False)
    assert m.locality_tf is None and m.locality_em is None and m.locality_wild is None
    assert m.reliability_em is None and m.generalization_em is None and m.edit_score_em is None
    assert m.reliability_wild is None and m.edit_score_wild is None
    assert m.edit_score_tf == pytest.approx(harmonic_mean([m.reliability_tf, m.generalization_tf]))
    bare = evaluate_edits(model, tokenizer, [REQUESTS[1]], None, generation=False)
    assert bare.generalization_tf is None and bare.edit_score_tf == 0.0


def test_the_output_layer_runs_at_answer_positions_and_decoding_stops_early(tokenizer):
    """One forward per batch gives TF and the first generated token; decoding stops when rows stop."""
    model = ScriptedLM(tokenizer, EDITED)
    evaluator = Evaluator(tokenizer, REQUESTS, settings=None)
    evaluator.settings = type(evaluator.settings)(batch_size=16, generation=False)
    evaluator.run(model)
    answer_tokens = sum(p.example.num_target_tokens for p in evaluator.probes.probes)
    num_probes = len(evaluator.probes.probes)
    # 9 probes in two batches (locality apart, as its generations run longest), one forward each; the
    # head runs at the answer positions (plus the one position per row the model's own forward keeps)
    assert (model.forwards, model.head_rows) == (2, answer_tokens + num_probes)
    model.forwards = 0
    evaluator.settings = type(evaluator.settings)(batch_size=16, generation=True, max_new_tokens=40)
    evaluator.run(model)
    # the longest scripted generation, "paris city center .", stops at its 4th token (".") and the first
    # comes from the teacher-forced forward: 3 more forwards, not 39; the locality batch needs none
    # (without a Reference there is nothing to compare its generations with)
    assert model.forwards == 2 + 3


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


def test_table_and_json(scripted_metrics, tmp_path):
    table = format_metrics_table(
        {"LocFT-BF": scripted_metrics, "depth-first": {"reliability_tf": 0.25}}, title="demo"
    )
    lines = table.splitlines()
    assert lines[0] == "demo" and "LocFT-BF" in lines[1] and "depth-first" in lines[1]
    row = next(line for line in lines if line.startswith("Reliability TF"))
    assert "0.556" in row and "0.250" in row
    assert next(line for line in lines if line.startswith("Reliability WILD")).split()[2:] == ["0.667", "-"]
    assert next(line for line in lines if line.startswith("Perplexity ")).split()[1:] == ["-", "-"]
    assert "0.917" in table and "0.375" in table
    path = tmp_path / "run" / "metrics.json"
    save_metrics(path, {"edited": scripted_metrics, "note": "x"})
    loaded = json.loads(path.read_text())
    assert loaded["edited"]["reliability_tf"] == pytest.approx(5 / 9) and loaded["note"] == "x"
    assert loaded["edited"]["reliability_wild"] == pytest.approx(2 / 3)
    assert EditMetrics.from_dict(loaded["edited"]) == scripted_metrics
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_reference_check_names_the_problem():
    reference = Reference([[1]], None, "key", 40)
    with pytest.raises(ValueError, match="holds no generations"):
        reference.check("key", 1, True, 40)
    reference.check("key", 1, False, 40)
