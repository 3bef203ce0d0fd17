"""A small byte-level BPE tokenizer trained offline on the demo world's corpus.

Conventions that the rest of the package relies on:

* No special tokens are added automatically (no BOS, no EOS): ``tok(text)`` is exactly the text's tokens.
  Pretraining appends ``</s>`` itself and never uses ``<s>``, so prompts are encoded the same way at
  pretraining, editing and evaluation time.
* Byte-level pre-tokenization without a prefix space splits text before each space, and BPE merges never
  cross such a split: the tokens of ``" " + answer`` alone equal the answer's tokens inside
  ``prompt + " " + answer``, and ``decode(encode(x)) == x``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3 in this order


def train_tokenizer(
    corpus: list[str], out_dir: str | Path | None = None, *, vocab_size: int = 2048
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus``; save it with ``save_pretrained`` when ``out_dir`` is given.

    Deterministic for a given corpus (the BPE trainer breaks ties by order). ``vocab_size`` is an upper
    bound: a small world's corpus runs out of merges earlier.
    """
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
