"""``train.compile``: the decoder layers training runs, compiled with ``torch.compile`` while it runs.

On a GPU the matrix products of an 8B layer run near the device's peak, and what keeps a training step
from the FLOP floor is the block's elementwise work (RMSNorm in float32 and its casts, rotary embeddings,
the SwiGLU product, each a separate memory-bound kernel forward and backward). Compiling fuses it.

Regional: each decoder layer from the first trainable one up is compiled on its own. The layers share their
code, and parameters are graph inputs, so one compiled graph serves them all and the compile time does not
grow with depth; shapes are dynamic (micro-batches differ in rows and length), so new lengths do not
recompile. Only training runs compiled: the prefix-cache fill, evaluation and generation (no gradients, KV
caches, other layers) run the model as it is.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from torch import nn

from locft_dist.locate import find_decoder_layers
from locft_dist.prefix_cache import first_trainable_layer

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def compiled_layers(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, the layers from the first trainable one up run compiled (``enabled``)."""
    if not enabled:
        yield
        return
    first = first_trainable_layer(model) or 0
    layers = list(model.get_submodule(find_decoder_layers(model).layers_path))[first:]
    for layer in layers:
        layer.compile(dynamic=True)
    logger.info(
        "train.compile: layers %d..%d compiled (the first steps include the compile)",
        first,
        first + len(layers) - 1,
    )
    began = time.perf_counter()
    try:
        yield
    finally:
        for layer in layers:  # nn.Module.compile's own slot: None runs the module uncompiled again
            layer._compiled_call_impl = None
        logger.debug("train.compile: %.1fs of training ran compiled", time.perf_counter() - began)
