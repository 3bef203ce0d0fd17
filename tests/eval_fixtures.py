"""Hand-made evaluation fixtures: a word-level tokenizer and a scripted LM whose outputs are known exactly."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (  # noqa: SIM905 (a word list reads better as one string)
    "<pad> </s> <unk> the a capital of france italy germany is paris rome berlin city hall center town "
    "what has language spoken in french italian german . , milan"
).split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lowercasing, no BOS: one token per word, so expected values can be counted by hand."""
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


class _ScriptedDecoder(torch.nn.Module):
    def __init__(self, lm: ScriptedLM) -> None:
        super().__init__()
        self.lm = [lm]  # not a submodule: no parameter cycle

    def forward(self, input_ids, attention_mask=None):
        lm = self.lm[0]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden = torch.zeros(*input_ids.shape, lm.vocab_size)
        for b in range(input_ids.size(0)):
            real: list[int] = []
            for t in range(input_ids.size(1)):
                if mask[b, t]:
                    real.append(int(input_ids[b, t]))
                if real:
                    hidden[b, t, lm.next_token(tuple(real))] = 10.0
        return SimpleNamespace(last_hidden_state=hidden)


class ScriptedLM(torch.nn.Module):
    """A causal LM whose greedy continuation of each known prompt is a fixed text, then EOS.

    After a known prompt plus k more tokens (whatever they are) it predicts the k-th continuation token, so
    teacher-forced argmax and greedy decoding are both known exactly. Its final hidden state is the one-hot
    next token and its output layer the identity; it returns no KV cache (decoding re-runs the sequence).
    ``forwards`` counts its forward calls and ``head_rows`` the rows its output layer saw.
    """

    def __init__(self, tokenizer, continuations: dict[str, str]):
        super().__init__()
        self.vocab_size = len(tokenizer)
        self.config = SimpleNamespace(vocab_size=self.vocab_size)
        self.unk = tokenizer.unk_token_id
        eos = tokenizer.eos_token_id
        self.scripts = sorted(
            (
                (tuple(tokenizer(p)["input_ids"]), [*tokenizer(c)["input_ids"], eos])
                for p, c in continuations.items()
            ),
            key=lambda item: -len(item[0]),
        )
        self.decoder = _ScriptedDecoder(self)
        self.lm_head = torch.nn.Linear(self.vocab_size, self.vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(self.vocab_size))
        self.forwards = 0
        self.head_rows = 0
        self.lm_head.register_forward_hook(self._count_head)

    def _count_head(self, _module, args, _output) -> None:
        self.head_rows += args[0].reshape(-1, self.vocab_size).shape[0]

    def next_token(self, prefix: tuple[int, ...]) -> int:
        for prompt, continuation in self.scripts:
            if prefix[: len(prompt)] == prompt:
                k = len(prefix) - len(prompt)
                return continuation[k] if k < len(continuation) else continuation[-1]
        return self.unk

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0, **kwargs):
        self.forwards += 1
        hidden = self.decoder(input_ids, attention_mask).last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.lm_head(hidden))


def tiny_llama(tokenizer, *, seed: int = 0, num_layers: int = 2) -> LlamaForCausalLM:
    """A random Llama over ``tokenizer``, logits well separated (no argmax ties float noise could flip)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()
