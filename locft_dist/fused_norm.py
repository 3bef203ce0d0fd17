"""``train.fused_norm``: the model's RMSNorms run as one fused kernel each while training runs.

The Llama-family RMSNorm of Hugging Face computes in float32 as separate kernels (cast up, square, mean,
add and reciprocal square root, multiply, cast down, multiply by the weight), and as many again backward.
At Llama-3-8B each is memory-bound work on every token of every layer that runs, and together they are a
visible share of a GPU training step (docs/performance.md). ``torch.nn.functional.rms_norm`` normalizes in
one kernel on a GPU (and one backward), in float32 as the module does; the cast to the model's dtype and the
multiply by the weight stay as the module does them, in the same order. Only the summation order of the mean
of squares can differ, so results agree to float32 rounding of the normalizer.

Only classes known to compute exactly that formula are swapped (``FUSABLE_NORMS``). Others (Gemma's
``1 + weight`` in float32, OLMo-2's weight before the cast) keep their own forward. Training passes only:
evaluation and generation run the model as loaded.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FUSABLE_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})
"""RMSNorm classes whose forward is ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)``."""


def fused_rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The Llama RMSNorm formula with the normalization in one kernel (float32, as the module computes)."""
    normalized = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon)
    return self.weight * normalized.to(hidden_states.dtype)


def fusable_norms(model: nn.Module) -> list[nn.Module]:
    """The model's RMSNorm modules that ``fused_rms_norm_forward`` computes exactly."""
    return [module for module in model.modules() if type(module).__name__ in FUSABLE_NORMS]


def fused_norm_enabled(configured: bool | None, device: torch.device | str) -> bool:
    """``train.fused_norm``, where null means on a GPU (on CPU the fused norm saves nothing measurable)."""
    return torch.device(device).type == "cuda" if configured is None else configured


@contextlib.contextmanager
def fused_rms_norms(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, the model's fusable RMSNorms run ``fused_rms_norm_forward``."""
    norms = fusable_norms(model) if enabled else []
    for norm in norms:
        norm.forward = types.MethodType(fused_rms_norm_forward, norm)
    if norms:
        logger.info("train.fused_norm: %d RMSNorm modules run as fused kernels while training", len(norms))
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward  # the class's own forward again
