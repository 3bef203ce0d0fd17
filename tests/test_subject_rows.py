"""locate.subject_embeddings: the input-embedding rows of the edited subjects' tokens are the only weights
that move, prompts without those tokens compute exactly the base model, and the delta stores the rows."""

import json

import pytest
import torch
from safetensors import safe_open

from locft_dist import common_text_store, outputs
from locft_dist.config import load_config
from locft_dist.delta import ROWS_PREFIX, apply_delta_to_model, read_delta, write_delta
from locft_dist.edit_job import run_edit
from locft_dist.edits import EditRequest, write_jsonl
from locft_dist.errors import ConfigError, DeltaError, EditDataError
from locft_dist.model import load_model, load_tokenizer
from locft_dist.run import model_fingerprint
from locft_dist.subject_rows import choose_subject_rows, subject_token_ids, tied_to_output, untied_output

EDITS = [
    EditRequest("Vorin Talbeck lives in the city of", "Baltholm", subject="Vorin Talbeck"),
    EditRequest("The profession of Ulla Pemberton is", "glassblower", subject="Ulla Pemberton"),
    EditRequest("Dorn Asket plays the", "amber", subject="Dorn Asket"),
]
UNRELATED = ["The favourite colour of Rina Sol is", "Kesso Varn works as a", "The home city of Mira Quell is"]


def _rows(tokenizer, requests=EDITS, reference=UNRELATED, share=0.0):
    return choose_subject_rows(tokenizer, requests, reference, max_share=share, source="edits.jsonl")


def _subject_run(model_dir, edits, common, out, *settings: str) -> list[str]:
    """Overrides of a one-process subject-row run on CPU (every common token tuned), plus ``settings``."""
    return [
        f"model.path={model_dir}",
        f"edits.path={edits}",
        f"output.dir={out}",
        "locate.subject_embeddings=true",
        f"locate.common_text_path={common}",
        "locate.common_token_share=0",
        "train.progress=false",
        "dist.strategy=none",
        "model.device=cpu",
        *settings,
    ]


def test_rows_are_subject_tokens_not_common_in_the_reference(tiny_tokenizer):
    chosen = _rows(tiny_tokenizer)
    subject_ids = {t for e in EDITS for t in subject_token_ids(tiny_tokenizer, e.prompt, e.subject)}
    reference_ids = {t for p in UNRELATED for t in tiny_tokenizer(p, add_special_tokens=False)["input_ids"]}
    template_ids = set(tiny_tokenizer("lives in the city of", add_special_tokens=False)["input_ids"])
    assert set(chosen.rows) <= subject_ids
    assert not set(chosen.rows) & reference_ids - {min(subject_ids)}  # only a rarest fallback may be common
    assert not set(chosen.rows) & (template_ids - subject_ids)
    # a subject made only of common tokens keeps its rarest one
    common_subject = EditRequest("Kesso Varn works as a", "cartographer", subject="Kesso Varn")
    with_common = _rows(tiny_tokenizer, [*EDITS, common_subject], [*UNRELATED, "Kesso Varn sings"])
    assert with_common.edits_on_rarest == 1
    assert len(set(with_common.rows) - set(chosen.rows)) == 1
    # a share that counts everything as rare keeps every subject token
    assert set(_rows(tiny_tokenizer, share=1.0).rows) == subject_ids


def test_edits_without_a_usable_subject_are_refused_by_name(tiny_tokenizer):
    with pytest.raises(EditDataError, match=r"edits\.jsonl: edit 1 .*field 'subject' is missing"):
        _rows(tiny_tokenizer, [EDITS[0], EditRequest("Kesso Varn works as a", "poet")])
    absent = EditRequest("Kesso Varn works as a", "poet", subject="Mira Quell")
    with pytest.raises(EditDataError, match=r"edit 0: field 'subject' \('Mira Quell'\) does not occur"):
        _rows(tiny_tokenizer, [absent])


def test_config_needs_common_text_and_one_breadth_first_process(tmp_path):
    with pytest.raises(ConfigError, match=r"locate\.common_text_path"):
        load_config(None, ["locate.subject_embeddings=true"])
    ok = ["locate.subject_embeddings=true", f"locate.common_text_path={tmp_path / 'common.txt'}"]
    assert load_config(None, ok).locate.subject_embeddings
    for bad in ("dist.strategy=fsdp", "lora.rank=4", "train.pipeline=depth_first", "train.weight_decay=0.1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [*ok, bad])


def test_row_sparse_delta_round_trips_and_dense_matrices_stay_dense(tmp_path):
    sparse = torch.zeros(50, 4)
    sparse[[3, 17]] = torch.randn(2, 4)
    dense = torch.randn(6, 4)
    path = write_delta(
        tmp_path / "d.safetensors",
        {"emb.weight": sparse, "mlp.weight": dense, "bias": torch.randn(4)},
        base_model="m",
        base_fingerprint="f",
        config_json="{}",
    )
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("emb.weight").shape == (2, 4)
        assert handle.get_tensor(ROWS_PREFIX + "emb.weight").tolist() == [3, 17]
        assert handle.get_tensor("mlp.weight").shape == (6, 4)
        assert json.loads(handle.metadata()["locft.row_sparse"]) == {"emb.weight": [50, 4]}
    delta = read_delta(path)
    assert sorted(delta.tensors) == ["bias", "emb.weight", "mlp.weight"]
    assert torch.equal(delta.tensors["emb.weight"], sparse) and torch.equal(
        delta.tensors["mlp.weight"], dense
    )

    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors[ROWS_PREFIX + "emb.weight"] = torch.tensor([3, 99])
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(DeltaError, match=r"bad\.safetensors: row-sparse tensor 'emb.weight' does not fit"):
        read_delta(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_edit_job_moves_only_subject_rows_and_leaves_other_prompts_exact(
    tied, tiny_model_dir, tiny_tokenizer, tmp_path
):
    model_dir = tiny_model_dir
    if tied:  # as SmolLM2: the output layer shares the embedding's weight
        model = load_model(tiny_model_dir)
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
        model_dir = tmp_path / "tied"
        model.save_pretrained(model_dir)
        tiny_tokenizer.save_pretrained(model_dir)
    edits, common = tmp_path / "edits.jsonl", tmp_path / "common.txt"
    write_jsonl(EDITS, edits)
    common.write_text("\n".join(UNRELATED) + "\n")
    outcome = run_edit(
        load_config(
            None,
            _subject_run(
                model_dir,
                edits,
                common,
                tmp_path / "run",
                "train.lr=5e-2",
                "train.batch_size=3",
                "train.epochs=15",
                "eval.enabled=false",
            ),
        )
    )
    assert tied_to_output(load_model(model_dir)) == tied
    tokenizer = load_tokenizer(model_dir)
    chosen = _rows(tokenizer)
    delta = read_delta(outcome.delta_path)
    assert list(delta.tensors) == ["model.embed_tokens.weight"]
    untied = {"input": "model.embed_tokens.weight", "output": "lm_head.weight"}
    assert untied_output(delta.metadata) == (untied if tied else None)
    moved = delta.tensors["model.embed_tokens.weight"].ne(0).any(dim=1).nonzero().flatten().tolist()
    assert moved and set(moved) <= set(chosen.rows)
    with safe_open(str(outcome.delta_path), framework="pt") as handle:  # stored as rows, not the matrix
        assert handle.get_tensor("model.embed_tokens.weight").shape[0] == len(moved)

    base, edited = load_model(model_dir).eval(), load_model(model_dir).eval()
    apply_delta_to_model(edited, delta, source=str(model_dir))
    assert not tied_to_output(edited)  # a tied model is untied as the run was: the output layer kept the base
    untouched = [p for p in UNRELATED if not set(tokenizer(p)["input_ids"]) & set(moved)]
    assert untouched
    with torch.no_grad():
        for prompt in untouched:  # every logit of a prompt without a tuned token is the base's, bit for bit
            ids = tokenizer(prompt, return_tensors="pt")
            assert torch.equal(base(**ids).logits, edited(**ids).logits)
        edit_ids = tokenizer(EDITS[0].prompt, return_tensors="pt")
        target = tokenizer(" " + EDITS[0].target_new, add_special_tokens=False)["input_ids"][0]
        assert (
            edited(**edit_ids).logits[0, -1].log_softmax(-1)[target]
            > base(**edit_ids).logits[0, -1].log_softmax(-1)[target]
        )


def test_a_subject_row_run_killed_mid_way_resumes_bitwise(world_model, tmp_path):
    """SIGKILL at a random checkpointed step, rerun: the masked embedding and its Adam state come back, the
    gradient mask is set again, and the delta is the uninterrupted run's to the bit."""
    import random

    from tests.test_distributed import delta, edit_args, kill9, run, start, wait_for_step

    edits, common = tmp_path / "edits.jsonl", tmp_path / "common.txt"
    requests = world_model.world.make_edits(12, seed=3)
    write_jsonl(requests, edits)
    common.write_text("\n".join(p.prompt for r in requests for p in r.locality_prompts) + "\n")
    args = [
        *edit_args(world_model.model_dir, edits, batch_size=4, epochs=4),
        "locate.subject_embeddings=true",
        f"locate.common_text_path={common}",
        "eval.enabled=false",
    ]
    run(1, tmp_path / "reference", args)
    kill_at = random.Random().randint(2, 8)  # 3 steps an epoch, 12 in all, each checkpointed
    proc = start(1, tmp_path / "killed", args)
    wait_for_step(tmp_path / "killed", kill_at, proc)
    kill9(proc)
    run(1, tmp_path / "killed", args)
    log = (tmp_path / "killed" / "log.jsonl").read_text()
    assert '"event": "resume"' in log
    expected, resumed = delta(tmp_path / "reference"), delta(tmp_path / "killed")
    assert (
        sorted(expected)
        == sorted(resumed)
        == ["locft.rows:model.embed_tokens.weight", "model.embed_tokens.weight"]
    )
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs after a kill at step {kill_at}"


def test_a_bfloat16_tied_model_trains_float32_rows_and_moves_only_them(tiny_model_dir, tmp_path):
    """bf16 weights keep a float32 master of the embedding (shared with the output layer when tied)."""
    model = load_model(tiny_model_dir)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied")
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "tied")
    edits, common = tmp_path / "edits.jsonl", tmp_path / "common.txt"
    write_jsonl(EDITS, edits)
    common.write_text("\n".join(UNRELATED) + "\n")
    overrides = _subject_run(
        tmp_path / "tied",
        edits,
        common,
        tmp_path / "run",
        "model.dtype=bfloat16",
        "train.lr=5e-2",
        "train.batch_size=3",
        "train.epochs=5",
    )
    outcome = run_edit(load_config(None, overrides))
    moved = read_delta(outcome.delta_path).tensors["model.embed_tokens.weight"].ne(0).any(dim=1)
    assert int(moved.sum()) > 0 and set(moved.nonzero().flatten().tolist()) <= set(
        _rows(load_tokenizer(tmp_path / "tied")).rows
    )
    assert outcome.metrics is not None and outcome.metrics.reliability_tf is not None  # evaluated too


def test_an_untied_delta_applies_to_a_directory_evaluates_and_exports_as_it_trained(world_model, tmp_path):
    """`locft apply` writes the output layer's base weight and ``tie_word_embeddings: false``; the written
    model, `locft eval --delta` and `locft export` all see what the run trained: an untied output layer."""
    from locft_dist.delta import apply_delta_to_dir
    from locft_dist.eval.job import run_eval
    from locft_dist.run.export import export_delta

    model_dir = world_model.model_dir  # tied, as SmolLM2
    assert tied_to_output(load_model(model_dir))
    edits, common = tmp_path / "edits.jsonl", tmp_path / "common.txt"
    requests = world_model.world.make_edits(12, seed=3)
    write_jsonl(requests, edits)
    unrelated = [p.prompt for r in requests for p in r.locality_prompts]
    common.write_text("\n".join(unrelated) + "\n")
    overrides = _subject_run(
        model_dir,
        edits,
        common,
        tmp_path / "run",
        "train.lr=1e-1",
        "train.batch_size=4",
        "train.epochs=10",
        "eval.generation=false",
    )
    outcome = run_edit(load_config(None, overrides))
    delta = read_delta(outcome.delta_path)

    in_memory = load_model(model_dir).eval()
    apply_delta_to_model(in_memory, delta, source=str(model_dir))
    written = apply_delta_to_dir(model_dir, outcome.delta_path, tmp_path / "edited")
    assert json.loads((written / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(written / "model.safetensors"), framework="pt") as handle:
        base_embedding = load_model(model_dir).get_input_embeddings().weight
        assert torch.equal(handle.get_tensor("lm_head.weight"), base_embedding.detach())
    from_disk = load_model(written).eval()
    assert not tied_to_output(from_disk)
    tokenizer = load_tokenizer(model_dir)
    with torch.no_grad():
        for prompt in [r.prompt for r in requests] + unrelated:
            ids = tokenizer(prompt, return_tensors="pt")
            assert torch.equal(in_memory(**ids).logits, from_disk(**ids).logits), prompt

    # the plain transformers + safetensors recipe of docs/formats.md gives the same model
    snippet = _formats_md_recipe().replace('"base_model"', repr(str(model_dir)))
    namespace: dict = {}
    exec(snippet.replace('"run/delta.safetensors"', repr(str(outcome.delta_path))), namespace)
    by_recipe = namespace["model"].eval()
    with torch.no_grad():
        for prompt in [r.prompt for r in requests] + unrelated:
            ids = tokenizer(prompt, return_tensors="pt")
            assert torch.equal(in_memory(**ids).logits, by_recipe(**ids).logits), prompt

    # locft eval: the delta on the tied base, and the applied directory against its base, score alike
    by_delta = run_eval(str(model_dir), str(edits), delta_path=str(outcome.delta_path), generation=False)
    by_dir = run_eval(str(written), str(edits), generation=False)
    assert by_delta["edited"].reliability_tf == outcome.metrics.reliability_tf
    assert by_delta["edited"].to_dict() == by_dir["edited"].to_dict()
    assert by_delta["edited"].reliability_tf > by_delta["unedited"].reliability_tf

    exported = read_delta(export_delta(tmp_path / "run", out=tmp_path / "exported.safetensors"))
    assert untied_output(exported.metadata) == untied_output(delta.metadata) is not None
    assert torch.equal(
        exported.tensors["model.embed_tokens.weight"], delta.tensors["model.embed_tokens.weight"]
    )


def _formats_md_recipe() -> str:
    """The Python block of docs/formats.md that applies a delta without locft."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "formats.md").read_text(encoding="utf-8")
    after = text[text.index("Applying it with nothing but transformers and safetensors:") :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```", start)]


def test_tokens_the_model_writes_count_as_common_with_generated_continuations(world_model):
    """A subject token that the unedited model writes in its answers (a year, a nationality) is common
    once the reference counts the model's continuations, though no reference prompt contains it."""
    from locft_dist.subject_rows import with_continuations

    model, tokenizer = world_model.load()
    facts = world_model.world.facts[:6]
    prompts = [world_model.world.prompt(f) for f in facts]
    texts = with_continuations(model, tokenizer, prompts, 3, batch_size=4)
    for prompt, text in zip(prompts, texts, strict=True):  # left-padded batches decode as one prompt alone
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            for _ in range(3):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        assert text == prompt + tokenizer.decode(ids[0, -3:], skip_special_tokens=True)
    answer = facts[0].object  # the model knows its facts: its continuation names the object
    assert answer in texts[0]
    request = EditRequest(f"The founder of {answer} is", "Ulla Pemberton", subject=answer)
    from_prompts = _rows(tokenizer, [request], prompts)
    from_texts = _rows(tokenizer, [request], texts)
    answer_ids = set(subject_token_ids(tokenizer, request.prompt, answer))
    assert from_prompts.edits_on_rarest == 0 and set(from_prompts.rows) == answer_ids
    assert from_texts.edits_on_rarest == 1, "every token of the answer is in the model's continuations"


def test_a_run_with_generated_common_text_tunes_the_rows_it_leaves(world_model, tmp_path):
    """``locft edit`` with locate.common_generated_tokens: the rows it logs and moves are those the model's
    continuations leave uncommon (a subject the model writes about keeps only its rarest token)."""
    from locft_dist.subject_rows import with_continuations

    model, tokenizer = world_model.load()
    facts = world_model.world.facts[:8]
    common_prompts = [world_model.world.prompt(f) for f in facts]
    answer = facts[0].object
    requests = [EditRequest(f"The founder of {answer} is", "Ulla Pemberton", subject=answer), *EDITS]
    edits, common = tmp_path / "edits.jsonl", tmp_path / "common.txt"
    write_jsonl(requests, edits)
    common.write_text("\n".join(common_prompts) + "\n")
    settings = ("train.epochs=2", "train.batch_size=4", "eval.enabled=false", "augment.batch_size=3")
    run_dir = tmp_path / "run"

    def run_and_read_setup(out):
        overrides = _subject_run(world_model.model_dir, edits, common, out, *settings)
        run_edit(load_config(None, [*overrides, "locate.common_generated_tokens=3"]))
        lines = (out / "log.jsonl").read_text().splitlines()
        return next(json.loads(line) for line in lines if '"setup"' in line)

    setup = run_and_read_setup(run_dir)
    texts = with_continuations(model, tokenizer, common_prompts, 3)
    expected = _rows(tokenizer, requests, texts)
    assert setup["subject_rows"]["rows"] == len(expected.rows)
    assert setup["subject_rows"]["edits_on_rarest"] == expected.edits_on_rarest >= 1
    moved = read_delta(run_dir / "delta.safetensors").tensors["model.embed_tokens.weight"]
    assert set(moved.ne(0).any(dim=1).nonzero().flatten().tolist()) <= set(expected.rows)
    assert expected.rows != _rows(tokenizer, requests, common_prompts).rows
    assert (
        common_text_store.load(run_dir / common_text_store.FILE, _common_key(world_model, common_prompts))
        == texts
    )

    # A run that finds the continuations in its directory (a resume) reads them instead of generating: here
    # a file under the right key that holds the bare prompts, so the rows are the prompts' own choice.
    reread = tmp_path / "reread"
    outputs.write_json(
        reread / common_text_store.FILE,
        {
            "format": common_text_store.FORMAT,
            "key": _common_key(world_model, common_prompts),
            "texts": common_prompts,
        },
    )
    setup = run_and_read_setup(reread)
    assert setup["subject_rows"]["rows"] == len(_rows(tokenizer, requests, common_prompts).rows)


def _common_key(world_model, prompts) -> str:
    return common_text_store.cache_key(
        model=model_fingerprint(world_model.model_dir),
        dtype=load_config(None, []).model.dtype,
        prompts=prompts,
        num_tokens=3,
    )


def test_the_common_text_cache_is_read_only_under_its_key(tmp_path):
    """A matching file is read without generating; another key, another format or a damaged file is
    generated again and rewritten."""
    path, calls = tmp_path / "run" / common_text_store.FILE, []

    def compute(texts):
        return lambda: calls.append(1) or list(texts)

    assert common_text_store.cached(path, "k1", compute(["a b"])) == (["a b"], False)
    assert common_text_store.cached(path, "k1", compute(["other"])) == (["a b"], True)
    assert common_text_store.cached(path, "k2", compute(["c"])) == (["c"], False)
    path.write_text('{"format": "locft-common-text/1", "key": "k2", "texts": [1]}')
    assert common_text_store.cached(path, "k2", compute(["d"])) == (["d"], False)
    path.write_text("{not json")
    assert common_text_store.cached(path, "k2", compute(["e"])) == (["e"], False)
    assert len(calls) == 4 and common_text_store.load(path, "k2") == ["e"]


def test_a_token_that_opens_a_prompt_is_left_alone_where_the_subject_has_another(tiny_tokenizer):
    """locate.tune_sequence_start=false: the first position (where attention sinks) keeps its row unless
    the subject has nothing else to tune."""
    opening = [EDITS[0], EDITS[2]]  # subjects that open their prompts
    first = {tiny_tokenizer(e.prompt, add_special_tokens=False)["input_ids"][0] for e in opening}
    tuned = set(_rows(tiny_tokenizer, opening).rows)
    assert first <= tuned  # by default they are tuned (they are not common in the reference)
    avoided = choose_subject_rows(
        tiny_tokenizer, opening, UNRELATED, max_share=0.0, avoid_sequence_start=True
    )
    assert set(avoided.rows) == tuned - first and avoided.sequence_start_tokens == len(first)
    # a subject of one token that opens its prompt keeps that token: the edit needs a row
    opener = tiny_tokenizer.decode(tiny_tokenizer(EDITS[0].prompt, add_special_tokens=False)["input_ids"][:1])
    alone = EditRequest(EDITS[0].prompt, "Baltholm", subject=opener)
    assert len(subject_token_ids(tiny_tokenizer, alone.prompt, opener)) == 1
    kept = choose_subject_rows(tiny_tokenizer, [alone], UNRELATED, max_share=0.0, avoid_sequence_start=True)
    assert kept.rows == tuple(subject_token_ids(tiny_tokenizer, alone.prompt, opener))
    assert kept.sequence_start_tokens == 0


def test_prompts_open_the_sequence_in_plain_completion_only(real_model_dir):
    from locft_dist.edits.encode import Encoding
    from locft_dist.subject_rows import prompts_open_the_sequence

    tokenizer = load_tokenizer(real_model_dir)  # SmolLM2: no BOS in plain completion
    assert prompts_open_the_sequence(tokenizer, Encoding())
    assert not prompts_open_the_sequence(tokenizer, Encoding(chat_template="auto"))  # a user turn first


def test_a_run_that_leaves_the_sequence_start_alone_moves_only_the_rows_it_logs(world_model, tmp_path):
    from locft_dist.edits.encode import Encoding
    from locft_dist.subject_rows import prompts_open_the_sequence

    _, tokenizer = world_model.load()
    assert prompts_open_the_sequence(tokenizer, Encoding())  # this tokenizer adds no BOS
    edits, common = tmp_path / "edits.jsonl", tmp_path / "common.txt"
    write_jsonl(EDITS, edits)
    common.write_text("\n".join(UNRELATED) + "\n")
    settings = (
        "locate.tune_sequence_start=false",
        "train.epochs=2",
        "train.batch_size=4",
        "eval.enabled=false",
    )
    run_dir = tmp_path / "run"
    run_edit(load_config(None, _subject_run(world_model.model_dir, edits, common, run_dir, *settings)))
    setup = next(
        json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if '"setup"' in line
    )
    expected = choose_subject_rows(tokenizer, EDITS, UNRELATED, max_share=0.0, avoid_sequence_start=True)
    assert setup["subject_rows"]["sequence_start_tokens"] == expected.sequence_start_tokens == 2
    assert setup["subject_rows"]["rows"] == len(expected.rows)
    moved = read_delta(run_dir / "delta.safetensors").tensors["model.embed_tokens.weight"]
    assert set(moved.ne(0).any(dim=1).nonzero().flatten().tolist()) <= set(expected.rows)
