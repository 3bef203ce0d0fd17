import pytest
import torch

from locft_dist.edits.encode import IGNORE_INDEX, collate, encode_pair, pad_token_id
from locft_dist.errors import EncodingError
from locft_dist.losses import forward_losses
from tests.conftest import make_random_llama


def test_prompt_and_target_ids_concatenate_without_boundary_drift(tiny_tokenizer):
    tok = tiny_tokenizer
    example = encode_pair(tok, "Kesso Varn works as a", "glassblower", append_eos=False)
    prompt_ids = tok("Kesso Varn works as a", add_special_tokens=False)["input_ids"]
    target_ids = tok(" glassblower", add_special_tokens=False)["input_ids"]
    assert list(example.input_ids) == prompt_ids + target_ids
    assert example.num_prompt_tokens == len(prompt_ids)
    assert tok.decode(list(example.input_ids)) == "Kesso Varn works as a glassblower"


def test_eos_is_appended_and_prefix_configurable(tiny_tokenizer):
    tok = tiny_tokenizer
    with_eos = encode_pair(tok, "Dorn Asket plays the", "violin")
    assert with_eos.input_ids[-1] == tok.eos_token_id
    no_prefix = encode_pair(tok, "Dorn Asket plays the", "violin", target_prefix="", append_eos=False)
    assert tok.decode(list(no_prefix.input_ids[no_prefix.num_prompt_tokens :])) == "violin"
    already = encode_pair(tok, "Dorn Asket plays the", " violin", append_eos=False)
    assert tok.decode(list(already.input_ids[already.num_prompt_tokens :])) == " violin"


def test_prompt_is_truncated_from_the_left(tiny_tokenizer):
    tok = tiny_tokenizer
    full = encode_pair(tok, "The home city of Mira Quell is", "Baltholm")
    cut = encode_pair(
        tok, "The home city of Mira Quell is", "Baltholm", max_length=full.num_target_tokens + 2
    )
    assert len(cut.input_ids) == full.num_target_tokens + 2
    assert cut.input_ids == full.input_ids[-len(cut.input_ids) :]


def test_target_that_does_not_fit_is_an_error(tiny_tokenizer):
    with pytest.raises(EncodingError, match="does not fit max_length=2"):
        encode_pair(tiny_tokenizer, "Vorin Talbeck lives in the city of", "Ostrava", max_length=2)


def test_pad_falls_back_to_eos(tiny_tokenizer):
    class NoPad:
        pad_token_id = None
        eos_token_id = 7

    assert pad_token_id(tiny_tokenizer) == tiny_tokenizer.pad_token_id
    assert pad_token_id(NoPad()) == 7


def test_labels_cover_target_tokens_only(tiny_tokenizer):
    a = encode_pair(tiny_tokenizer, "Kesso Varn works as a", "glassblower")
    b = encode_pair(tiny_tokenizer, "The favourite colour of Rina Sol is", "amber")
    batch = collate([a, b], pad_id=0)
    for row, ex in enumerate((a, b)):
        labels = batch["labels"][row]
        n = len(ex.input_ids)
        assert (labels[: ex.num_prompt_tokens] == IGNORE_INDEX).all()
        assert labels[ex.num_prompt_tokens : n].tolist() == list(ex.input_ids[ex.num_prompt_tokens :])
        assert (labels[n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == n


def test_padded_batch_loss_equals_each_example_alone(tiny_tokenizer):
    model = make_random_llama(len(tiny_tokenizer))
    pairs = [
        ("Kesso Varn works as a", "glassblower"),
        ("The favourite colour of Rina Sol is", "amber"),
        ("Dorn Asket plays the", "violin"),
    ]
    examples = [encode_pair(tiny_tokenizer, p, t) for p, t in pairs]
    with torch.no_grad():
        batch = collate(examples, pad_id=0)
        together = forward_losses(model, batch)
        for i, ex in enumerate(examples):
            alone = forward_losses(model, collate([ex], pad_id=0))
            torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)
