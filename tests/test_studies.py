"""studies/: the locality file (other records' prompts, no edited subject, no probe), the key probe, the
perturbed deltas and the null-space projected fine-tuning."""

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("locality_file", ROOT / "studies" / "locality_file.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(
    subject: str, prompt: str, rephrase: str, probe: str, new: str = "Paris", true: str = "Lyon"
) -> dict:
    return {
        "prompt": prompt,
        "target_new": new,
        "target_true": true,
        "subject": subject,
        "rephrase_prompts": [rephrase],
        "locality_prompts": [{"prompt": probe, "answer": "Rome"}],
    }


def test_pool_excludes_edited_subjects_and_probes(tmp_path):
    edits = [_record("Alpha Corp", "Alpha Corp is based in", "Alpha Corp's home is", "Beta Ltd is based in")]
    pool = [
        _record("Alpha Corp", "Alpha Corp was founded in", "x1", "y1"),  # edited subject
        _record("Beta Ltd", "Beta Ltd is based in", "x2", "y2"),  # the evaluated locality probe
        _record("Gamma", "The sister of Alpha Corp is", "x3", "y3"),  # names an edited subject
        _record("Delta", "Delta plays the", "x4", "y4"),
        _record("Eps", "Eps speaks", "x5", "y5"),
    ]
    for name, rows in (("edits.jsonl", edits), ("pool.jsonl", pool)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "locality.jsonl"
    pool_path, edits_path = tmp_path / "pool.jsonl", tmp_path / "edits.jsonl"
    args = ["--pool", str(pool_path), "--edits", str(edits_path), "--out", str(out)]
    assert _module().main(args) == 0
    prompts = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
    assert sorted(prompts) == ["Delta plays the", "Eps speaks"]
    assert _module().main([*args, "--num", "1"]) == 0
    assert len(out.read_text().splitlines()) == 1


def test_near_objects_keeps_records_of_the_edited_objects_with_all_their_prompts(tmp_path):
    edits = [_record("Alpha Corp", "Alpha Corp is based in", "Alpha Corp's home is", "Beta Ltd is based in")]
    pool = [
        _record(
            "Gamma", "Gamma is based in", "Gamma's seat is", "Beta Ltd is based in", new="Rome", true="Lyon"
        ),
        _record(
            "Delta", "Delta is located in", "Delta sits in", "Omega is located in", new="Paris", true="Oslo"
        ),
        _record("Eps", "Eps speaks", "Eps talks in", "Zeta speaks", new="French", true="German"),  # unrelated
        _record("Alpha Corp", "Alpha Corp was founded in", "x", "y"),  # edited subject
    ]
    for name, rows in (("edits.jsonl", edits), ("pool.jsonl", pool)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "near.jsonl"
    args = [
        "--pool",
        str(tmp_path / "pool.jsonl"),
        "--edits",
        str(tmp_path / "edits.jsonl"),
        "--out",
        str(out),
    ]
    assert _module().main([*args, "--near-objects"]) == 0
    prompts = sorted(json.loads(line)["prompt"] for line in out.read_text().splitlines())
    # Gamma's locality prompt is the evaluated probe of the edit: left out
    expected = [
        "Delta is located in",
        "Delta sits in",
        "Gamma is based in",
        "Gamma's seat is",
        "Omega is located in",
    ]
    assert prompts == expected


def test_subject_keys_probe_runs_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("subject_keys", ROOT / "studies" / "subject_keys.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    edits = [
        _record("Alpha Corp", "Alpha Corp is based in", "Alpha Corp is based in", "Beta Ltd is based in"),
        _record("Gamma", "Gamma plays the", "Every day, Gamma plays the", "Delta plays the"),
        _record("Eps", "Eps speaks", "People say Eps speaks", "Zeta speaks"),
    ]
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edits))
    out = tmp_path / "keys.json"
    args = ["--model", str(tiny_model_dir), "--edits", str(tmp_path / "edits.jsonl"), "--out", str(out)]
    assert module.main(args) == 0
    result = json.loads(out.read_text())
    assert set(result) == {
        "last_token_rephrase",
        "last_token_neighbour",
        "last_token_other",
        "subject_rephrase",
        "subject_other",
    }
    assert all(len(values) == 3 for values in result.values())  # one mean per decoder layer
    assert all(-1.0 <= v <= 1.0 + 1e-6 for values in result.values() for v in values)
    assert "subject_rephrase" in capsys.readouterr().out


def _perturb_module():
    spec = importlib.util.spec_from_file_location("perturb_delta", ROOT / "studies" / "perturb_delta.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_perturbed_deltas_keep_the_base_and_encoding_and_have_the_asked_size(tmp_path, capsys):
    import torch

    from locft_dist.delta import read_delta, write_delta
    from locft_dist.edits.encode import Encoding

    generator = torch.Generator().manual_seed(1)  # fixed (not the study's noise seed, 0)
    edit = {
        "a.weight": torch.randn(6, 4, generator=generator),
        "b.weight": torch.randn(30, generator=generator) * 5,
    }
    encoding = Encoding(target_prefix=" ", append_eos=True, chat_template="auto", max_length=64)
    source = write_delta(
        tmp_path / "delta.safetensors", edit, base_model="/base", base_fingerprint="f" * 32,
        config_json="{}", encoding=encoding, extra_metadata={"locft.chain": "[1]"},
    )  # fmt: skip
    module = _perturb_module()
    assert module.main([str(source), "--out", str(tmp_path / "p"), "--scaled", "0.1", "--noise", "0.5"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    scaled, noise = (
        read_delta(tmp_path / "p/scaled_0.1.safetensors"),
        read_delta(tmp_path / "p/noise_0.5.safetensors"),
    )
    for perturbed in (scaled, noise):
        assert perturbed.base_fingerprint == "f" * 32 and perturbed.encoding == encoding
        assert perturbed.metadata["locft.chain"] == "[1]" and "locft.perturbation" in perturbed.metadata
    for name, tensor in edit.items():
        torch.testing.assert_close(scaled.tensors[name], tensor * 0.1)
        assert abs(noise.tensors[name].norm().item() - 0.5 * tensor.norm().item()) < 1e-4
        cosine = torch.nn.functional.cosine_similarity(noise.tensors[name].flatten(), tensor.flatten(), dim=0)
        assert abs(cosine.item()) < 0.9, "noise should not be the edit's direction"
    assert not list((tmp_path / "p").glob("*.tmp*")), "a temporary file was left behind"


def _null_space_module():
    spec = importlib.util.spec_from_file_location("null_space", ROOT / "studies" / "null_space.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_null_space_projection_holds_at_most_the_asked_energy():
    module = _null_space_module()
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(500, 16, generator=generator, dtype=torch.float64) * torch.logspace(0, -3, 16)
    moment = keys.T @ keys
    projection, dims = module.null_space_projection(moment, 0.01)
    assert 0 < dims < 16
    assert torch.allclose(projection @ projection, projection, atol=1e-5)  # a projection
    assert float(torch.trace(projection.double() @ moment)) <= 0.01 * float(torch.trace(moment)) + 1e-9
    identity, all_dims = module.null_space_projection(moment, 1.0)
    assert all_dims == 16 and torch.equal(identity, torch.eye(16))


def test_null_space_training_leaves_preserved_prompts_alone(tiny_model_dir, tmp_path):
    """On the tiny model: the projected update moves preserved prompts' hidden states far less than the
    same training without the projection, while the edit loss still falls."""
    module = _null_space_module()
    from locft_dist.edits.encode import encode_pairs, pad_token_id
    from locft_dist.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    preserved = ["the cat sat on the mat", "a dog ran in the park", "birds fly over the sea"] * 4
    edits = encode_pairs(tokenizer, ["the capital of mars is", "the king of moon is"], ["red", "blue"])

    def final_states(energy: float) -> tuple[torch.Tensor, list[float]]:
        torch.manual_seed(0)
        model = load_model(tiny_model_dir)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        modules = module.tuned_modules(model, [1], "mlp.down_proj")
        moments, count = module.key_moments(model, tokenizer, modules, preserved, continuation=2)
        assert count > 0
        projections = [module.null_space_projection(m, energy)[0] for m in moments]
        delta = module.ProjectedDelta(modules, projections)
        losses = module.train(
            model, edits, delta, epochs=15, batch_size=2, lr=5e-2, pad=pad_token_id(tokenizer)
        )
        with torch.no_grad():
            ids = tokenizer(preserved[:3], return_tensors="pt", padding=True)
            hidden = model.get_decoder()(**ids).last_hidden_state
        return hidden, losses

    base_model = load_model(tiny_model_dir)
    with torch.no_grad():
        ids = tokenizer(preserved[:3], return_tensors="pt", padding=True)
        base = base_model.get_decoder()(**ids).last_hidden_state
    projected, projected_losses = final_states(0.05)
    free, free_losses = final_states(1.0)
    assert projected_losses[-1] < projected_losses[0]
    assert free_losses[-1] < free_losses[0]
    moved_projected = float((projected - base).norm())
    moved_free = float((free - base).norm())
    assert moved_projected < 0.5 * moved_free


def _subject_embeddings_module():
    path = ROOT / "studies" / "subject_embeddings.py"
    spec = importlib.util.spec_from_file_location("subject_embeddings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_subject_rows_are_the_subjects_tokens_minus_common_ones(tiny_tokenizer):
    module = _subject_embeddings_module()
    from locft_dist.edits.schema import EditRequest

    prompt = "The home city of Mira Quell is"
    ids = module.subject_token_ids(tiny_tokenizer, prompt, "Mira Quell")
    encoded = tiny_tokenizer(prompt, return_offsets_mapping=True)
    start = prompt.find("Mira Quell")
    spans = zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    inside = [t for t, (a, b) in spans if a >= start and b <= start + len("Mira Quell")]
    assert ids and set(inside) <= set(ids) and len(ids) < len(encoded["input_ids"])
    assert module.subject_token_ids(tiny_tokenizer, prompt, "Kesso Varn") == []

    requests = [
        EditRequest(prompt=prompt, target_new="Ostrava", subject="Mira Quell"),
        EditRequest(prompt="Kesso Varn works as a", target_new="cartographer", subject="Kesso Varn"),
    ]
    kesso = module.subject_token_ids(tiny_tokenizer, requests[1].prompt, "Kesso Varn")
    frequency = {token: 0 for token in ids} | {token: 5 for token in kesso}  # Kesso's tokens are common
    rows, without = module.choose_rows(tiny_tokenizer, requests, frequency, 1, rarest=False)
    assert rows == sorted(set(ids) - set(kesso)) and without == 1
    rows, without = module.choose_rows(tiny_tokenizer, requests, frequency, 1, rarest=True)
    assert without == 0 and len(set(rows) & set(kesso)) == 1  # the rarest one only


def test_subject_row_delta_leaves_prompts_without_those_tokens_exactly_alone(tiny_model_dir):
    """Training moves the edit prompt's prediction; a prompt without the tuned tokens computes exactly the
    base model's logits, untied; tied, only the tuned tokens' logits move."""
    module = _subject_embeddings_module()
    from locft_dist.edits.encode import encode_pairs, pad_token_id
    from locft_dist.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    edit_prompt, other = "The home city of Mira Quell is", "Dorn Asket plays the"
    rows = module.subject_token_ids(tokenizer, edit_prompt, "Mira Quell")
    rows = sorted(set(rows) - set(tokenizer(other)["input_ids"]))
    examples = encode_pairs(tokenizer, [edit_prompt], ["Ostrava"])

    def logits_after(tied: bool) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        model = load_model(tiny_model_dir)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        delta = module.EmbeddingRowDelta(model, rows, tied=tied)
        losses = module.train(
            model, examples, delta, epochs=8, batch_size=1, lr=5e-2, pad=pad_token_id(tokenizer)
        )
        with torch.no_grad():
            return (
                model(**tokenizer(other, return_tensors="pt")).logits,
                model(**tokenizer(edit_prompt, return_tensors="pt")).logits,
                losses,
            )

    base_model = load_model(tiny_model_dir)
    with torch.no_grad():
        base_other = base_model(**tokenizer(other, return_tensors="pt")).logits
        base_edit = base_model(**tokenizer(edit_prompt, return_tensors="pt")).logits
    untied_other, untied_edit, losses = logits_after(tied=False)
    assert losses[-1] < losses[0]
    assert torch.equal(untied_other, base_other)
    assert not torch.allclose(untied_edit, base_edit)
    tied_other, _, _ = logits_after(tied=True)
    moved = (tied_other - base_other).abs().amax(dim=(0, 1))
    assert moved[rows].max() > 0
    assert moved[[t for t in range(moved.numel()) if t not in rows]].max() == 0


def _study(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_shared_with_another_target_are_flagged():
    study = _study("subject_row_failures")
    flags = study.shares_a_row([[1, 2], [2], [3], [3]], ["Paris", "Rome", "Oslo", "Oslo"])
    assert flags == [True, True, False, False]  # row 3 carries one target for both its edits


def test_subject_row_failures_split_the_edits_by_what_the_delta_learned(world_model, tmp_path):
    from locft_dist.config import load_config
    from locft_dist.edit_job import run_edit
    from locft_dist.edits import write_jsonl

    study = _study("subject_row_failures")
    edits, common = tmp_path / "edits.jsonl", tmp_path / "common.txt"
    requests = world_model.world.make_edits(10, seed=5)
    write_jsonl(requests, edits)
    common.write_text("\n".join(p.prompt for r in requests for p in r.locality_prompts) + "\n")
    overrides = [
        f"model.path={world_model.model_dir}",
        f"edits.path={edits}",
        f"output.dir={tmp_path / 'run'}",
        "locate.subject_embeddings=true",
        f"locate.common_text_path={common}",
        "train.lr=1e-1",
        "train.batch_size=5",
        "train.epochs=6",
        "train.progress=false",
        "dist.strategy=none",
        "model.device=cpu",
        "eval.generation=false",
    ]
    outcome = run_edit(load_config(None, overrides))
    summary = study.main(
        [
            "--model",
            str(world_model.model_dir),
            "--edits",
            str(edits),
            "--delta",
            str(outcome.delta_path),
            "--json",
            str(tmp_path / "failures.json"),
        ]
    )
    learned, missed = summary["learned"]["edits"], summary["not_learned"]["edits"]
    assert learned + missed == len(requests) == len(summary["unlearned_edits"]) + learned
    # an edit counted as learned has every target token right: the run's token accuracy is at least that
    assert outcome.metrics.reliability_tf >= learned / len(requests) - 1e-9
    assert learned > 0
    assert json.loads((tmp_path / "failures.json").read_text()) == summary
