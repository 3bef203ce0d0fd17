"""Continual editing: waves that start from the previous delta, replay earlier edits and supersede them.

The sampler's replay draw is checked as a unit; the rest runs ``locft edit`` as typed on the tiny world:
wave 1, then wave 2 (one edit re-edits a wave-1 prompt; wave 1's edit file is gone by then) on one process
and on two FSDP ranks, killed mid-wave and rerun, applied with plain transformers, and refused when the
previous run was made with another location or encoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from locft_dist.config import load_config
from locft_dist.continual import read_facts, supersede
from locft_dist.continual.history import Fact
from locft_dist.continual.settings import continued_wave_config
from locft_dist.edits import write_jsonl
from locft_dist.edits.encode import Encoding
from locft_dist.edits.schema import EditRequest
from locft_dist.errors import ConfigError
from locft_dist.eval.evaluate import compute_reference, evaluate_edits
from locft_dist.eval.metrics import METRIC_KEYS
from locft_dist.model import load_tokenizer
from locft_dist.sampler import BreadthFirstSampler, Replay, rank_slice
from tests.conftest import REPO
from tests.test_distributed import delta, edit_args, kill9, run, start, wait_for_step

NUM_WAVE1, NUM_WAVE2, BATCH, EPOCHS = 12, 12, 6, 4
# Wave 2: 12 new + 11 replayed (the 12th wave-1 edit is superseded) = 23 a epoch, 4 steps: 16 in all.


# -- the replay draw, as a unit ---------------------------------------------------------------------------


def all_batches(sampler: BreadthFirstSampler, epochs: int) -> list[list[int]]:
    batches = []
    while sampler.epoch < epochs:
        batches.append(sampler.next_batch().indices)
    return batches


def flat(lists: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


def test_replay_is_part_of_the_seeded_order():
    replay = Replay(num_new=10, pool_size=40, per_epoch=10, seed=3, epochs=5)
    assert replay.epoch_size == 20 and len(replay.used) <= 40
    num_examples = 10 + len(replay.used)
    sampler = BreadthFirstSampler(num_examples, 6, seed=3, replay=replay)
    batches = all_batches(sampler, 5)
    again = all_batches(BreadthFirstSampler(num_examples, 6, seed=3, replay=replay), 5)
    assert batches == again, "same seed, same order"
    per_epoch = [flat(batches[e * 4 : (e + 1) * 4]) for e in range(5)]  # 4 steps of <= 6 a epoch
    draws = []
    for epoch_samples in per_epoch:
        assert sorted(i for i in epoch_samples if i < 10) == list(range(10)), "every new edit once"
        replayed = sorted(i for i in epoch_samples if i >= 10)
        assert len(replayed) == len(set(replayed)) == 10, "ten distinct earlier edits"
        draws.append(replayed)
    assert len({tuple(d) for d in draws}) > 1, "each epoch draws anew"
    assert set(flat(draws)) == set(range(10, num_examples)), "only drawn pool edits are laid out"
    other_seed = Replay(num_new=10, pool_size=40, per_epoch=10, seed=4, epochs=5)
    assert other_seed.epoch_examples(0) != replay.epoch_examples(0)


def test_resume_mid_wave_on_any_world_size_continues_the_same_batches():
    replay = Replay(num_new=7, pool_size=30, per_epoch=7, seed=0, epochs=3)
    size = 7 + len(replay.used)
    whole = all_batches(BreadthFirstSampler(size, 4, seed=0, dataset_fingerprint="f", replay=replay), 3)
    first = BreadthFirstSampler(size, 4, seed=0, dataset_fingerprint="f", replay=replay)
    head = [first.next_batch().indices for _ in range(5)]  # into epoch 1
    resumed = BreadthFirstSampler(size, 4, seed=0, dataset_fingerprint="f", replay=replay)
    resumed.load_state(first.state())
    assert head + all_batches(resumed, 3) == whole
    for world_size in (1, 2, 3):  # a rank's share is a slice of the same global batch
        shares = [rank_slice(whole[6], rank, world_size) for rank in range(world_size)]
        assert flat(shares) == whole[6]


def test_a_new_edit_of_an_earlier_prompt_supersedes_it():
    earlier = [Fact(EditRequest(f"p{i}", f"old{i}"), 1) for i in range(4)]
    new = [EditRequest("p2", "new2"), EditRequest("q", "x")]
    waves = supersede(earlier, new, 2)
    assert waves.num_superseded == 1
    assert [f.request.prompt for f in waves.pool] == ["p0", "p1", "p3"]
    assert [(f.request.target_new, f.wave) for f in waves.facts if f.request.prompt == "p2"] == [("new2", 2)]


# -- waves as `locft edit` runs them ----------------------------------------------------------------------


def wave_args(model_dir, edits, **extra) -> list[str]:
    args = edit_args(model_dir, edits, batch_size=BATCH, epochs=EPOCHS)
    return [*args, *(f"{k}={v}" for k, v in extra.items())]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def waves(world_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("continual")
    edits = world_model.world.make_edits(NUM_WAVE1 + NUM_WAVE2 - 1, seed=2)
    wave1, wave2 = edits[:NUM_WAVE1], edits[NUM_WAVE1:]
    superseding = dataclasses.replace(wave1[0], target_new=wave1[1].target_new)
    assert superseding.target_new != wave1[0].target_new
    wave2 = [*wave2, superseding]
    (tmp / "data").mkdir()
    write_jsonl(wave1, tmp / "data" / "wave1.jsonl")
    write_jsonl(wave2, tmp / "data" / "wave2.jsonl")
    run(1, tmp / "r1", wave_args(world_model.model_dir, tmp / "data" / "wave1.jsonl"))
    (tmp / "data" / "wave1.jsonl").unlink()  # the chain needs only the run directory
    args2 = wave_args(
        world_model.model_dir, tmp / "data" / "wave2.jsonl", **{"continual.previous": tmp / "r1"}
    )
    run(1, tmp / "r2", args2)
    return {
        "tmp": tmp,
        "model": world_model.model_dir,
        "wave1": wave1,
        "superseding": superseding,
        "args2": args2,
    }


def test_the_second_wave_supersedes_replays_and_records_its_chain(waves):
    r1, r2 = waves["tmp"] / "r1", waves["tmp"] / "r2"
    metrics = json.loads((r2 / "metrics.json").read_text())
    assert metrics["continual"] == {
        "wave": 2,
        "previous": str(r1),
        "num_new": NUM_WAVE2,
        "num_superseded": 1,
        "num_in_force": NUM_WAVE1 + NUM_WAVE2 - 1,
        "num_replay_pool": NUM_WAVE1 - 1,
        "replay_per_epoch": NUM_WAVE1 - 1,
        "replay_used": NUM_WAVE1 - 1,
    }
    assert metrics["all_waves"]["edited"]["num_edits"] == NUM_WAVE1 + NUM_WAVE2 - 1
    facts = read_facts(r2 / "facts.jsonl")
    prompt = waves["superseding"].prompt
    assert [(f.request.target_new, f.wave) for f in facts if f.request.prompt == prompt] == [
        (waves["superseding"].target_new, 2)
    ]
    assert sorted(f.wave for f in facts) == [1] * (NUM_WAVE1 - 1) + [2] * NUM_WAVE2
    chain = json.loads((r2 / "continual.json").read_text())["chain"]
    assert [e["wave"] for e in chain] == [1, 2] and [e["run_dir"] for e in chain] == [str(r1), str(r2)]
    assert chain[0]["delta_sha256"] == sha256(r1 / "delta.safetensors")
    assert chain[1]["delta_sha256"] == sha256(r2 / "delta.safetensors")
    assert (chain[1]["num_edits"], chain[1]["num_superseded"]) == (NUM_WAVE2, 1)
    with safe_open(str(r2 / "delta.safetensors"), framework="pt") as handle:
        recorded = json.loads(handle.metadata()["locft.chain"])
    assert [e["edits_fingerprint"] for e in recorded] == [e["edits_fingerprint"] for e in chain]
    # The delta is cumulative: it starts where wave 1 ended, so it moved away from zero and from wave 1's.
    for name, tensor in delta(r2).items():
        assert not torch.equal(tensor, delta(r1)[name])
    # After wave 2 the model holds the edits of both waves (the earlier ones replayed).
    assert (
        metrics["all_waves"]["edited"]["reliability_tf"] > metrics["all_waves"]["unedited"]["reliability_tf"]
    )


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_two_ranks_run_a_wave_as_one_process_does(waves, backend):
    """The previous delta is loaded into FSDP2 shards or ZeRO-3 partitions (fp32 masters included)."""
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
        config = REPO / "deepspeed_configs" / "zero3.json"
        extra = ["dist.strategy=deepspeed", f"dist.deepspeed_config={config}"]
    else:
        extra = ["dist.strategy=fsdp"]
    double = waves["tmp"] / f"r2_two_ranks_{backend}"
    run(2, double, [*waves["args2"], *extra])
    for name, tensor in delta(waves["tmp"] / "r2").items():
        torch.testing.assert_close(delta(double)[name], tensor, atol=1e-5, rtol=0)
    single = json.loads((waves["tmp"] / "r2" / "metrics.json").read_text())
    two = json.loads((double / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert two["all_waves"]["edited"][key] == pytest.approx(single["all_waves"]["edited"][key], abs=1e-6)


def test_a_wave_killed_mid_way_resumes_exactly(waves):
    """Bitwise where the resumed start rebuilds the prefix cache; a kill in the last epoch leaves fewer
    passes than edits, the resumed start trains without the cache (it would not pay) and the delta
    matches up to rounding (as in tests/test_prefix_cache_dist.py)."""
    run_dir = waves["tmp"] / "r2_killed"
    kill_at = int(os.environ.get("KILL_AT", 0)) or random.Random().randint(3, 10)  # 4 steps an epoch
    proc = start(1, run_dir, waves["args2"])
    wait_for_step(run_dir, kill_at, proc)
    kill9(proc)
    assert not (run_dir / "delta.safetensors").exists()
    run(1, run_dir, waves["args2"])
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    resumed = [i for i, e in enumerate(events) if e["event"] == "resume"]
    assert resumed
    rebuilt = any(e["event"] == "prefix_cache" for e in events[resumed[0] :])
    for name, tensor in delta(waves["tmp"] / "r2").items():
        message = f"{name} differs after a kill at step {kill_at} (cache rebuilt: {rebuilt})"
        if rebuilt:
            assert torch.equal(delta(run_dir)[name], tensor), message
        else:
            torch.testing.assert_close(delta(run_dir)[name], tensor, atol=1e-5, rtol=0, msg=message)


def test_a_waves_augmentation_is_what_the_base_model_says(waves, world_model):
    """Locality references (and paraphrase prefixes) of a continued wave come from the base model, as in a
    plain run on the same edits, not from base + the previous delta (that would keep each wave's drift)."""
    tmp = waves["tmp"]
    probes = tmp / "data" / "keep.txt"
    probes.write_text("\n".join(world_model.world.neighbour_prompts(waves["wave1"])[:8]) + "\n")
    augment = {
        "augment.locality_source": "file",
        "augment.locality_path": probes,
        "augment.locality_loss": "kl",
        "augment.paraphrases": 1,
        "train.epochs": 1,
        "eval.enabled": "false",
    }
    plain = wave_args(waves["model"], tmp / "data" / "wave2.jsonl", **augment)
    continued = [*plain, f"continual.previous={tmp / 'r1'}"]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: run(1, *job), [(tmp / "aug_plain", plain), (tmp / "aug_wave2", continued)]))
    from_base = load_file(tmp / "aug_plain" / "augment.safetensors")
    in_wave = load_file(tmp / "aug_wave2" / "augment.safetensors")
    assert from_base.keys() == in_wave.keys() and len(from_base) > 0
    for name, tensor in from_base.items():
        assert torch.equal(in_wave[name], tensor), name


def test_continued_wave_settings_apply_to_continued_waves_only():
    overrides = ["continual.epochs=3", "continual.locality_ratio=2", "continual.locality_weight=4"]
    first = load_config(None, overrides)
    assert continued_wave_config(first) == first  # no previous run: a first wave keeps train.* / augment.*
    wave = load_config(None, [*overrides, "continual.previous=runs/wave1"])
    continued = continued_wave_config(wave)
    assert continued.train.epochs == 3
    assert (continued.augment.locality_ratio, continued.augment.locality_weight) == (2.0, 4.0)
    with pytest.raises(ConfigError, match=r"continual\.locality_ratio"):
        load_config(None, ["continual.locality_ratio=-1"])


def test_a_continued_wave_trains_with_the_continual_settings(waves, world_model):
    """One config for every wave: ``continual.epochs`` and the locality settings take over on a continued
    wave; its run directory keeps the config as given."""
    tmp = waves["tmp"]
    probes = tmp / "data" / "keep_settings.txt"
    probes.write_text("\n".join(world_model.world.neighbour_prompts(waves["wave1"])[:8]) + "\n")
    run_dir = tmp / "r2_settings"
    settings = {
        "augment.locality_source": "file",
        "augment.locality_path": probes,
        "augment.locality_loss": "kl",
        "continual.previous": tmp / "r1",
        "continual.epochs": 1,
        "continual.locality_ratio": 2,
        "continual.locality_weight": 5,
        "eval.enabled": "false",
    }
    run(1, run_dir, wave_args(waves["model"], tmp / "data" / "wave2.jsonl", **settings))
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    (augmented,) = [e for e in events if e["event"] == "augment"]
    assert augmented["locality"] == 2 * NUM_WAVE2
    (trained,) = [e for e in events if e["event"] == "trained"]
    assert trained["epochs_run"] == 1
    recorded = load_config(run_dir / "config.yaml", [])  # as given: a template for the next wave
    assert (recorded.train.epochs, recorded.continual.epochs) == (EPOCHS, 1)
    assert recorded.continual.locality_weight == 5.0


def test_the_cumulative_delta_with_plain_transformers_reproduces_the_metrics(waves):
    r2 = waves["tmp"] / "r2"
    base = AutoModelForCausalLM.from_pretrained(waves["model"], use_safetensors=True).eval()
    edited = AutoModelForCausalLM.from_pretrained(waves["model"], use_safetensors=True).eval()
    params = dict(edited.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(r2 / "delta.safetensors")).items():
            params[name].add_(value)
    tokenizer = load_tokenizer(waves["model"])
    requests = [fact.request for fact in read_facts(r2 / "facts.jsonl")]
    encoding = Encoding()
    reference = compute_reference(base, tokenizer, requests, encoding=encoding)
    metrics = evaluate_edits(edited, tokenizer, requests, reference, encoding=encoding).to_dict()
    recorded = json.loads((r2 / "metrics.json").read_text())["all_waves"]["edited"]
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(recorded[key], abs=1e-6), key


@pytest.mark.parametrize(
    ("override", "named"),
    [("locate.layers=[2]", "location (locate.*)"), ("edits.append_eos=false", "append_eos")],
)
def test_a_previous_run_made_otherwise_is_refused_naming_what_differs(waves, override, named):
    args = [*waves["args2"], override]
    proc = run(1, waves["tmp"] / f"refused_{override.split('=')[0]}", args, check=False)
    assert proc.returncode != 0
    assert "cannot be continued by this run" in proc.stderr and named in proc.stderr, proc.stderr[-2000:]
