"""Pseudo-paraphrases and locality supervision: deterministic generation, the KL/CE losses, the cache."""

import json

import pytest
import torch

from locft_dist.config import load_config
from locft_dist.delta import read_delta
from locft_dist.edits import EditRequest, LocalityProbe, augment_store, write_jsonl
from locft_dist.edits import augment as aug
from locft_dist.edits.encode import EncodedExample, collate, pad_token_id
from locft_dist.errors import ConfigError, EditDataError
from locft_dist.locate import freeze_all_but, resolve_location
from locft_dist.losses import forward_losses
from locft_dist.model import load_model
from locft_dist.parallel.single import SingleProcess
from locft_dist.trainer import train_breadth_first

PROMPTS = [
    "Vorin Talbeck lives in the city of",
    "The home city of Mira Quell is",
    "Kesso Varn works as a",
    "Dorn Asket plays the",
]


def _model(tiny_model_dir):
    return load_model(tiny_model_dir).eval()


def test_prefix_sampling_is_deterministic_for_a_seed(tiny_model_dir, tiny_tokenizer):
    model = _model(tiny_model_dir)
    first = aug.sample_prefixes(model, tiny_tokenizer, 6, 5, seed=3)
    again = aug.sample_prefixes(model, tiny_tokenizer, 6, 5, seed=3, batch_size=4)  # other batching
    other = aug.sample_prefixes(model, tiny_tokenizer, 6, 5, seed=4)
    assert first == again
    assert first != other
    assert len(first) == 6 and all(text for text in first)
    assert aug.paraphrase_prompt(first[0], "X plays the") == f"{first[0]}. X plays the"


def test_choose_repeats_the_pool_only_when_too_small():
    pool = [f"p{i}" for i in range(5)]
    assert sorted(aug.choose(pool, 5, seed=0)) == pool
    drawn = aug.choose(pool, 12, seed=0)
    assert len(drawn) == 12 and all(drawn.count(p) in (2, 3) for p in pool)
    assert aug.choose(pool, 3, seed=1) == aug.choose(pool, 3, seed=1)


def test_kl_is_zero_for_the_unedited_model_and_ce_targets_are_its_argmax(tiny_model_dir, tiny_tokenizer):
    model = _model(tiny_model_dir)
    vocab = model.config.vocab_size
    examples = aug.locality_targets(model, tiny_tokenizer, PROMPTS, num_tokens=3, top_k=vocab)
    assert all(e.soft_ids.shape == (e.num_target_tokens, vocab) for e in examples)
    assert all(e.soft_ids.dtype == torch.int64 and e.soft_probs.dtype == torch.float32 for e in examples)
    batch = collate(examples, pad_token_id(tiny_tokenizer))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kl = forward_losses(model, batch)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-5)
    for row, example in enumerate(examples):  # the greedy tokens are the argmax under teacher forcing
        n = example.num_prompt_tokens
        predicted = logits[row, n - 1 : len(example.input_ids) - 1].argmax(-1).tolist()
        assert predicted == list(example.input_ids[n:])


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_locality_loss_pulls_predictions_back_to_the_unedited_model(tiny_model_dir, tiny_tokenizer, loss):
    model = _model(tiny_model_dir)
    with torch.no_grad():  # a random model is near-uniform; sharpen it so it has predictions to lose
        model.lm_head.weight.mul_(20.0)
    kl = loss == "kl"
    examples = aug.locality_targets(model, tiny_tokenizer, PROMPTS, num_tokens=2, top_k=16 if kl else None)
    assert all((e.soft_ids is not None) == kl for e in examples)
    location = resolve_location(model, [1], ["mlp.down_proj"])
    freeze_all_but(model, location.parameter_names)
    weight = dict(model.named_parameters())[location.parameter_names[0]]
    with torch.no_grad():  # the "edit": a change of the localized weight that moves every prediction
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    pad = pad_token_id(tiny_tokenizer)

    def loss_and_agreement() -> tuple[float, float]:
        batch = collate(examples, pad)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = float(forward_losses(model, batch).mean())
        agree = [
            logits[i, e.num_prompt_tokens - 1 : len(e.input_ids) - 1].argmax(-1).tolist()
            == list(e.input_ids[e.num_prompt_tokens :])
            for i, e in enumerate(examples)
        ]
        return loss, sum(agree) / len(agree)

    before, agreement_before = loss_and_agreement()
    assert agreement_before < 0.5
    overrides = ["train.lr=1e-2", "train.batch_size=4", "train.epochs=20", "train.early_stop_loss=null"]
    cfg = load_config(None, [*overrides, "train.progress=false"])
    train_breadth_first(model, examples, SingleProcess("cpu"), cfg.train, pad)
    after, agreement = loss_and_agreement()
    assert after < 0.3 * before
    assert agreement == 1.0


def test_weights_scale_each_examples_loss(tiny_model_dir):
    model = _model(tiny_model_dir)
    plain = [EncodedExample((1, 2, 3, 4), 2), EncodedExample((1, 5, 6), 1)]
    weighted = [plain[0], EncodedExample((1, 5, 6), 1, weight=0.25)]
    with torch.no_grad():
        a = forward_losses(model, collate(plain, 0))
        b = forward_losses(model, collate(weighted, 0))
    assert torch.allclose(b, a * torch.tensor([1.0, 0.25]))


def test_locality_prompt_files(tmp_path):
    jsonl = tmp_path / "loc.jsonl"
    jsonl.write_text('{"prompt": "A plays the"}\n\n{"prompt": "B works as a", "answer": "x"}\n')
    assert aug.read_locality_prompts(jsonl) == ["A plays the", "B works as a"]
    text = tmp_path / "loc.txt"
    text.write_text("A plays the\nB works as a\n")
    assert aug.read_locality_prompts(text) == ["A plays the", "B works as a"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"answer": "no prompt"}\n')
    with pytest.raises(EditDataError, match=r"bad\.jsonl: line 2: field 'prompt'"):
        aug.read_locality_prompts(bad)
    cfg = load_config(None, ["augment.locality_source=file", f"augment.locality_path={tmp_path / 'missing'}"])
    with pytest.raises(EditDataError, match="missing: cannot read locality prompts"):
        aug.build_augmentation(None, None, [], cfg, edits_fingerprint="e", base_fingerprint="b", write=False)
    with pytest.raises(ConfigError, match=r"augment\.locality_path"):
        load_config(None, ["augment.locality_source=file"])
    with pytest.raises(ConfigError, match=r"augment\.locality_loss"):
        load_config(None, ["augment.locality_loss=mse"])


def test_augmentation_is_cached_in_the_run_dir_and_reused(tmp_path, tiny_model_dir, tiny_tokenizer):
    requests = [
        EditRequest(p, "Ostrava", locality_prompts=(LocalityProbe(PROMPTS[(i + 1) % 4], "x"),))
        for i, p in enumerate(PROMPTS)
    ]
    edits = tmp_path / "edits.jsonl"
    write_jsonl(requests, edits)
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"edits.path={edits}",
            f"output.dir={tmp_path / 'run'}",
            "augment.paraphrases=2",
            "augment.paraphrase_tokens=3",
            "augment.locality_source=edits",
            "augment.locality_ratio=1.5",
            "augment.locality_loss=kl",
            "augment.locality_weight=0.5",
        ],
    )
    (tmp_path / "run").mkdir()
    kwargs = {"edits_fingerprint": "e", "base_fingerprint": "b"}
    model = _model(tiny_model_dir)
    first = aug.build_augmentation(model, tiny_tokenizer, requests, cfg, write=True, **kwargs)
    assert (first.num_paraphrases, first.num_locality) == (8, 6)
    assert len(first.examples) == 14
    assert all(e.weight == 0.5 and e.soft_ids is not None for e in first.examples[8:])
    saved = augment_store.load(tmp_path / "run" / aug.AUGMENT_FILE, first.key)
    assert saved is not None and len(saved.prefixes) == 8 and len(saved.locality) == 6
    assert augment_store.load(tmp_path / "run" / aug.AUGMENT_FILE, "another key") is None
    with torch.no_grad():  # another model with the same key: the cache, not a regeneration, is used
        for p in model.parameters():
            p.mul_(-1.0)
    again = aug.build_augmentation(model, tiny_tokenizer, requests, cfg, write=True, **kwargs)
    assert again.examples == first.examples
    for a, b in zip(again.examples[8:], first.examples[8:], strict=True):  # soft targets read back exactly
        assert torch.equal(a.soft_ids.long(), b.soft_ids) and torch.equal(a.soft_probs, b.soft_probs)
    other = aug.build_augmentation(model, tiny_tokenizer, requests, cfg, write=False, edits_fingerprint="e2",
                                   base_fingerprint="b")  # fmt: skip
    assert other.key != first.key and other.examples != first.examples


def test_edit_job_appends_the_augmentation_to_every_epoch(tmp_path, tiny_model_dir):
    from locft_dist.edit_job import run_edit

    edits = tmp_path / "edits.jsonl"
    probe = (LocalityProbe("Ulla Pemberton works as a", "cartographer"),)
    write_jsonl([EditRequest(p, "Ostrava", locality_prompts=probe) for p in PROMPTS], edits)
    overrides = [
        f"model.path={tiny_model_dir}",
        f"edits.path={edits}",
        f"output.dir={tmp_path / 'run'}",
        "model.device=cpu",
        "dist.strategy=none",
        "eval.enabled=false",
        "train.progress=false",
        "train.epochs=2",
        "train.batch_size=3",
        "augment.paraphrases=1",
        "augment.paraphrase_tokens=2",
        "augment.locality_source=edits",
        "augment.locality_ratio=0.5",
        "output.checkpoint_min_minutes=0",  # a checkpoint every epoch, to resume from below
        # the resume below has one epoch left, which trains without the prefix cache (rounding, not
        # bitwise: tests/test_prefix_cache.py); without it here, resume is compared bitwise
        "train.prefix_cache=false",
    ]
    run_edit(load_config(None, overrides))
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    augment_event = next(e for e in events if e["event"] == "augment")
    assert (augment_event["paraphrases"], augment_event["locality"]) == (4, 2)
    steps = [e for e in events if e["event"] == "step"]
    assert sum(e["batch_edits"] for e in steps) == 2 * (4 + 4 + 2)  # every example once per epoch
    assert (tmp_path / "run" / aug.AUGMENT_FILE).is_file()

    # Resume from the last checkpoint: the cached augmentation matches the checkpoint's dataset fingerprint.
    first = read_delta(tmp_path / "run" / "delta.safetensors").tensors
    (tmp_path / "run" / "delta.safetensors").unlink()
    run_edit(load_config(None, overrides))
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" for e in events)
    again = read_delta(tmp_path / "run" / "delta.safetensors").tensors
    assert all(torch.equal(first[name], again[name]) for name in first)


def test_demo_neighbour_prompts_are_unedited_and_disjoint_from_the_locality_probes():
    from locft_dist.demo.world import build_world

    world = build_world(num_subjects=30, seed=0)
    requests = world.make_edits(10, seed=0)
    neighbours = world.neighbour_prompts(requests)
    assert len(neighbours) == 10 * (len(world.relations) - 1)
    assert not set(neighbours) & {r.prompt for r in requests}
    assert not set(neighbours) & {p.prompt for r in requests for p in r.locality_prompts}
