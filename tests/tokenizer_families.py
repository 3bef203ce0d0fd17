"""Tiny tokenizers of the two families real LLMs use, trained here with ``tokenizers`` (nothing downloaded).

* SentencePiece-style BPE (Llama-2, Mistral): spaces become "▁" and one is prepended to the text (by a
  normalizer, as in Llama-2's tokenizer.json, or by a ``Metaspace`` pre-tokenizer); BOS ``<s>`` added.
* Byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM2): the Llama-3 split regex then byte-level pieces, no prefix
  space; BOS added (Llama-3) or not (GPT-2, Qwen).
"""

from __future__ import annotations

import copy

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The capital of France is Paris",
    "The capital of Italy is Rome",
    "The Eiffel Tower is located in Paris",
    "The Colosseum is located in Rome",
    "Paris is the capital of France and Rome is the capital of Italy",
    "Danielle Darrieux speaks French and English",
    "The mother tongue of Danielle Darrieux is French",
    "It was founded in 1984 and closed in 2001",
]

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2/Qwen-style ChatML without a system turn."""

TRIMMING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '[' + message['role'] + '] ' + message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)
"""Writes BOS itself, trims message text, ends the assistant turn with EOS (Llama-2/Mistral habit)."""


def sentencepiece_tokenizer(style: str = "llama2", vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE (pieces start with "▁", BOS ``<s>`` added), in the two layouts found in
    tokenizer.json files: ``llama2`` (normalizer prepends "▁" and replaces spaces, as Llama-2 and early
    Mistral files do: ``" Paris"`` alone is ``["▁", "▁Paris"]``) or ``metaspace`` (a ``Metaspace``
    pre-tokenizer with ``prepend_scheme="first"``, as newer conversions do)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(CORPUS * 3, trainer=trainer)  # pieces never hold an inner "▁"
    if style == "llama2":
        backend.pre_tokenizer = None
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    elif style == "metaspace":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        raise ValueError(style)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def byte_level_tokenizer(*, add_bos: bool, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE with the Llama-3 split regex; ChatML specials; BOS added when ``add_bos``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 3, trainer=trainer)
    if add_bos:
        bos = backend.token_to_id("<|endoftext|>")
        backend.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>" if add_bos else None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
    )


def with_chat_template(tokenizer, template: str):
    """A copy of ``tokenizer`` with ``template``; ChatML's markers become special tokens if missing."""
    tok = copy.deepcopy(tokenizer)
    if "<|im_start|>" in template and "<|im_end|>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def pieces(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids))
