"""``locft import-gguf`` on tiny GGUF files written here: exact round trip, quantized weights, bad input."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from locft_dist.cli import main
from locft_dist.edits.encode import Encoding, encode_pairs
from locft_dist.errors import ModelImportError
from locft_dist.gguf_import import IMPORT_RECORD, import_gguf
from locft_dist.model import load_model, load_tokenizer
from tests.gguf_files import dequantized, write_llama_gguf
from tests.tokenizer_families import CHATML_TEMPLATE, CORPUS, byte_level_tokenizer, with_chat_template

pytest.importorskip("gguf", reason="the gguf extra is part of the dev install")


def _tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def original():
    tokenizer = with_chat_template(byte_level_tokenizer(add_bos=False), CHATML_TEMPLATE)
    return _tiny_llama(tokenizer), tokenizer


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, original) -> Path:
    model, tokenizer = original
    return write_llama_gguf(
        tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", model, tokenizer, chat_template=CHATML_TEMPLATE
    )


def test_import_round_trips_weights_tokenizer_and_chat_template(gguf_file, original, tmp_path):
    model, tokenizer = original
    report = import_gguf(gguf_file, tmp_path / "imported", progress=False)
    out = Path(report.out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported"]  # no temporary left beside it
    assert (report.architecture, report.model_type, report.vocab_size) == (
        "LlamaForCausalLM",
        "llama",
        len(tokenizer),
    )
    assert report.chat_template and report.num_parameters == sum(p.numel() for p in model.parameters())
    assert (out / "model.safetensors").is_file() and (out / IMPORT_RECORD).is_file()
    assert "quantization_config" not in (out / "config.json").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}  # not safetensors' 0600

    imported = load_model(out)
    expected = model.state_dict()
    got = imported.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    ids = torch.tensor([tokenizer("The capital of France is Paris")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(imported(input_ids=ids).logits, model(input_ids=ids).logits)

    tok = load_tokenizer(out)
    assert tok.chat_template == tokenizer.chat_template
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    texts = [*CORPUS, "<|im_start|>user\nhi<|im_end|>\n", " leading space", "naïve café 12345"]
    assert (
        tok(texts, add_special_tokens=False)["input_ids"]
        == tokenizer(texts, add_special_tokens=False)["input_ids"]
    )
    chat = Encoding(chat_template="auto")
    pairs = (["The capital of France is"], ["Paris"])
    assert encode_pairs(tok, *pairs, chat) == encode_pairs(tokenizer, *pairs, chat)


def test_quantized_weights_import_as_their_dequantized_values(original, tmp_path):
    model, tokenizer = original
    path = write_llama_gguf(tmp_path / "tiny-q8.gguf", model, tokenizer, chat_template=None, quantize=True)
    report = import_gguf(path, tmp_path / "q8", progress=False)
    assert not report.chat_template
    got = load_model(report.out_dir).state_dict()
    for name, tensor in model.state_dict().items():
        want = tensor.numpy()
        if want.ndim == 2:
            want = dequantized(want)
            assert not np.array_equal(want, tensor.numpy()), "Q8_0 must change the weights"
        np.testing.assert_array_equal(got[name].numpy(), want, err_msg=name)


def test_bad_input_is_refused_with_a_clear_error(gguf_file, tmp_path, monkeypatch):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    with pytest.raises(ModelImportError, match=r"notes\.gguf is not a GGUF file"):
        import_gguf(text, tmp_path / "a")
    with pytest.raises(ModelImportError, match="no such file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "a")
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ModelImportError, match="taken exists"):
        import_gguf(gguf_file, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]

    import locft_dist.gguf_import as module

    real_find_spec = module.importlib.util.find_spec
    monkeypatch.setattr(
        module.importlib.util, "find_spec", lambda n: None if n == "gguf" else real_find_spec(n)
    )
    with pytest.raises(ModelImportError, match=r"needs the gguf package.*pip install 'locft-dist\[gguf\]'"):
        import_gguf(gguf_file, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_failed_write_leaves_nothing_behind(gguf_file, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        import_gguf(gguf_file, tmp_path / "out" / "model", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_prints_what_it_wrote_and_the_next_command(gguf_file, original, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["import-gguf", str(gguf_file), str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        f"wrote {out}" in printed
        and "LlamaForCausalLM" in printed
        and f"{len(original[1])} tokens" in printed
    )
    assert "chat        yes" in printed and f"locft edit model.path={out}" in printed
    assert main(["import-gguf", str(gguf_file), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
