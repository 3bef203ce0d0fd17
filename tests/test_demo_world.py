"""The synthetic demo world: facts, edits, tokenizer, pretraining and the cached build."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from locft_dist.demo.build import TINY, _try_reuse, build_tiny_world_model
from locft_dist.demo.pretrain import encode_world, knowledge, pretrain
from locft_dist.demo.tokenizer import train_tokenizer
from locft_dist.demo.world import World, build_world


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(num_subjects=50, seed=3)


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_tokenizer(world.pretraining_corpus(), vocab_size=1024)


def test_world_is_deterministic_by_seed_and_well_formed(world):
    assert build_world(num_subjects=50, seed=3) == world
    assert build_world(num_subjects=50, seed=4).facts != world.facts
    assert len(world.subjects) == 50 == len(set(world.subjects))
    assert all(len(s.split()) == 2 for s in world.subjects)
    assert len(world.relations) >= 4
    for relation in world.relations:
        assert len(relation.templates) >= 4 and 20 <= len(relation.objects) <= 60
        facts = [f for f in world.facts if f.relation == relation.name]
        assert len(facts) == 50 and all(f.object in relation.objects for f in facts)
    fact = world.facts[0]
    assert world.sentence(fact, 1) == world.prompt(fact, 1) + " " + fact.object
    assert fact.subject in world.prompt(fact, 2)
    assert len(world.pretraining_corpus()) == sum(world.num_templates(f) for f in world.facts)


def test_json_round_trip(world, tmp_path):
    assert World.from_json(json.loads(json.dumps(world.to_json()))) == world
    world.save(tmp_path / "world.json")
    assert World.load(tmp_path / "world.json") == world
    with pytest.raises(ValueError, match="not a demo world"):
        World.from_json({"facts": []})


def test_make_edits(world):
    edits = world.make_edits(30, seed=1, num_locality=3)
    assert edits == world.make_edits(30, seed=1, num_locality=3)
    assert edits != world.make_edits(30, seed=2, num_locality=3)
    assert len(edits) == 30 and len({e.subject for e in edits}) == 30
    edited_subjects = {e.subject for e in edits}
    facts = {(f.subject, world.prompt(f, 0)): f for f in world.facts}
    for edit in edits:
        fact = facts[(edit.subject, edit.prompt)]
        relation = world.relation(fact.relation)
        assert edit.prompt == relation.templates[0].format(s=edit.subject)
        assert edit.target_true == fact.object != edit.target_new
        assert edit.target_new in relation.objects
        assert list(edit.rephrase_prompts) == [t.format(s=edit.subject) for t in relation.templates[1:]]
        assert len(edit.locality_prompts) == 3
        for probe in edit.locality_prompts:
            (probe_fact,) = [f for f in world.facts if world.prompt(f, 0) == probe.prompt]
            assert probe_fact.subject not in edited_subjects and probe.answer == probe_fact.object
    with pytest.raises(ValueError, match="num_edits"):
        world.make_edits(50, seed=0)


def test_heldout_texts_avoid_edited_facts(world):
    edits = world.make_edits(40, seed=0)
    texts = world.heldout_texts(500, seed=0, exclude=edits)
    assert texts == world.heldout_texts(500, seed=0, exclude=edits)
    assert len(texts) == len(world.facts) - 40 and len(set(texts)) == len(texts)
    corpus = set(world.pretraining_corpus())
    edited = world.edited_facts(edits)
    assert len(edited) == 40
    forbidden = {world.sentence(f, t) for f in edited for t in range(world.num_templates(f))}
    assert all(t in corpus and t not in forbidden for t in texts)


def test_tokenizer_answers_tokenize_alone_as_in_the_sentence(world, tokenizer, tmp_path):
    assert len(tokenizer) <= 1024
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<pad>", "<s>", "</s>", "<unk>")}
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        ids["<pad>"],
        ids["<s>"],
        ids["</s>"],
    )
    for fact in world.facts:
        answer = tokenizer(" " + fact.object)["input_ids"]
        for t in range(world.num_templates(fact)):
            prompt = tokenizer(world.prompt(fact, t))["input_ids"]
            full = tokenizer(world.sentence(fact, t))["input_ids"]
            assert full == prompt + answer  # also: no special tokens added automatically
            assert tokenizer.decode(full) == world.sentence(fact, t)
    for text in ("Hello, Wörld! 42 x", "  two  spaces", "unseen Zyxqu"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    sentence = world.sentence(world.facts[7], 2)
    assert reloaded(sentence)["input_ids"] == tokenizer(sentence)["input_ids"]
    assert reloaded.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_training_is_deterministic(world, tokenizer):
    again = train_tokenizer(world.pretraining_corpus(), vocab_size=1024)
    assert again.get_vocab() == tokenizer.get_vocab()


def _micro_pretrain(world, tokenizer, **overrides):
    kwargs = dict(num_layers=2, hidden_size=32, intermediate_size=64, max_epochs=2, seed=5, progress=False)
    return pretrain(world, tokenizer, **(kwargs | overrides))


def test_pretraining_is_deterministic_and_honours_its_budget(tokenizer):
    small = build_world(num_subjects=10, seed=3)
    model_a, report_a = _micro_pretrain(small, tokenizer)
    model_b, report_b = _micro_pretrain(small, tokenizer)
    assert report_a.epochs == 2 and report_a.steps == 2 * 3  # 160 rows, batch 64
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert report_a.final_loss == report_b.final_loss
    _, stopped = _micro_pretrain(small, tokenizer, max_epochs=50, time_budget_s=0.0)
    assert stopped.epochs == 1 and not stopped.reached_target


def test_tiny_world_model_knows_its_facts_and_reloads(world_model):
    report = world_model.report
    assert report.reached_target and report.knowledge_template0 >= 0.95
    assert report.knowledge_all_templates >= 0.93
    assert world_model.world.make_edits(40, seed=0)  # room for the edits other tests make
    model = AutoModelForCausalLM.from_pretrained(world_model.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(world_model.model_dir)
    enc = encode_world(world_model.world, tokenizer)
    assert knowledge(model, enc, tokenizer.pad_token_id, templates={0}) == report.knowledge_template0
    if world_model.model is not None:  # built in this session: compare with the in-memory model
        batch = tokenizer([world_model.world.sentence(f) for f in world_model.world.facts[:16]], padding=True)
        ids = torch.tensor(batch["input_ids"])
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, world_model.model(input_ids=ids).logits)
    assert World.load(world_model.world_path) == world_model.world


def test_a_second_build_reuses_the_first(world_model):
    weights = world_model.model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = build_tiny_world_model(world_model.out_dir, seed=0)
    assert time.perf_counter() - start < 5 and again.reused and again.model is None
    assert weights.stat().st_mtime_ns == mtime
    assert again.world == world_model.world and again.report == world_model.report
    assert not list(world_model.out_dir.glob(".build-*"))
    # another seed or spec is a miss (checked without training)
    assert _try_reuse(world_model.out_dir, TINY, 1, start) is None
    other = type(TINY)(**{**TINY.__dict__, "hidden_size": 32})
    assert _try_reuse(world_model.out_dir, other, 0, start) is None
