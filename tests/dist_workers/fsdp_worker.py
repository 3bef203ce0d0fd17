"""Worker for tests/test_fsdp.py: checks the FSDP2 strategy's invariants and writes them as JSON (rank 0).

Launch (2 gloo ranks on CPU)::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/dist_workers/fsdp_worker.py MODEL_DIR EDITS_JSONL OUT_JSON

Each check records what it measured (the test asserts on it) or, if it raised, ``{"error": traceback}``,
so one broken invariant does not hide the others. ``check_training`` is also run by the test on the
single-process reference strategy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from locft_dist.config import DistConfig, LocateConfig, ModelConfig, RunConfig, TrainConfig
from locft_dist.edit_job import encode_edits
from locft_dist.edits import load_edits
from locft_dist.edits.encode import EncodedExample, pad_token_id
from locft_dist.model import load_tokenizer
from locft_dist.parallel.base import Strategy
from locft_dist.parallel.memory import local_bytes, training_state_bytes
from locft_dist.trainer import train_breadth_first

LOCATE = LocateConfig(layers=[1], modules=["mlp.down_proj"])
TRAIN = TrainConfig(epochs=2, batch_size=4, lr=1e-2, early_stop_loss=None, progress=False, seed=0)
"""8 edits -> 2 steps an epoch, 4 optimizer steps in all; lr large enough that every step moves weights."""
TIMEOUT_MINUTES = 1.0
"""Collective timeout: a rank that fails alone makes the others fail soon instead of hanging the test."""


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor (a collective for a DTensor: every rank must call it in the same order)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()


def fixed_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Seeded token ids, the second row right-padded, so the attention mask matters."""
    input_ids = torch.randint(3, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    input_ids[1, 8:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def load_examples(model_dir: str, edits_path: str) -> tuple[list[EncodedExample], int]:
    tokenizer = load_tokenizer(model_dir)
    requests = load_edits(edits_path).requests
    return encode_edits(tokenizer, requests, RunConfig()), pad_token_id(tokenizer)


@torch.no_grad()
def logits_of(model: nn.Module, batch: dict[str, torch.Tensor], *, reshard: bool = True) -> torch.Tensor:
    """Logits as computed (their dtype kept).

    FSDP2 keeps the root group (embeddings, final norm, tied head) unsharded after a forward, expecting
    a backward; without one, ``reshard`` puts it back in its sharded state.
    """
    logits = model(**batch).logits
    if reshard and isinstance(model, FSDPModule):
        model.reshard()
    return logits


def reference_model(model_dir: str) -> nn.Module:
    """The checkpoint loaded whole in this process, the way users load it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def expected_inv_freq(config: Any) -> torch.Tensor:
    """Default RoPE frequencies from the config alone, independent of how any model was built."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def check_loading(
    model: nn.Module, reference: nn.Module, model_dir: str, batch: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Invariant 1: logits, every full parameter and every buffer equal the whole-checkpoint ones."""
    reference_logits = logits_of(reference, batch)
    diff = (logits_of(model, batch) - reference_logits).abs().max().item()
    checkpoint = load_file(str(Path(model_dir) / "model.safetensors"))
    param_mismatches, missing = [], []
    num_params = 0
    for name, param in model.named_parameters():
        value = full(param)  # collective: called for every parameter on every rank
        if name not in checkpoint:
            missing.append(name)
        elif not torch.equal(value.cpu(), checkpoint[name]):
            param_mismatches.append(name)
        num_params += 1
    ref_buffers = dict(reference.named_buffers())
    buffers = {name: full(buffer).cpu() for name, buffer in model.named_buffers()}
    buffer_mismatches = [
        n for n, b in buffers.items() if n not in ref_buffers or not torch.equal(b, ref_buffers[n])
    ]
    formula = expected_inv_freq(reference.config)
    inv_freq_diff = {
        n: (b - formula).abs().max().item() if b.shape == formula.shape else math.inf
        for n, b in buffers.items()
        if n.endswith("inv_freq")
    }
    return {
        "logits_max_abs_diff": diff,
        "logit_scale": reference_logits.abs().max().item(),
        "num_params_checked": num_params,
        "num_checkpoint_tensors": len(checkpoint),
        "params_missing_from_checkpoint": missing,
        "param_mismatches": param_mismatches,
        "buffer_mismatches": buffer_mismatches,
        "inv_freq_max_abs_diff_from_formula": inv_freq_diff,
    }


def check_sharding(model: nn.Module, rank: int, world_size: int) -> dict[str, Any]:
    """Invariant 2: every parameter is a DTensor holding this rank's ``torch.chunk`` share of dim 0 only."""
    not_dtensor, wrong_size = [], []
    local_numel = total_numel = 0
    for name, param in model.named_parameters():
        total_numel += param.numel()
        if not isinstance(param, DTensor):
            not_dtensor.append(name)
            local_numel += param.numel()
            continue
        rows = torch.arange(param.shape[0]).chunk(world_size)
        expected = (len(rows[rank]) if rank < len(rows) else 0) * (param.numel() // max(param.shape[0], 1))
        local = param.to_local().numel()
        local_numel += local
        if local != expected:
            wrong_size.append(f"{name}: {local} != {expected}")
    return {
        "not_dtensor": not_dtensor,
        "wrong_local_size": wrong_size,
        "local_numel": local_numel,
        "total_numel": total_numel,
        "num_params": len(list(model.parameters())),
    }


def unsharded_after_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[str]:
    """Parameters an inference forward leaves unsharded (FSDP2 keeps the root group gathered); reshards."""
    logits_of(model, batch, reshard=False)
    names = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    model.reshard()
    return names


def check_training(
    model: nn.Module,
    strategy: Strategy,
    examples: list[EncodedExample],
    pad_id: int,
    cfg: TrainConfig = TRAIN,
) -> dict[str, Any]:
    """Invariants 3-4 (any strategy): frozen weights stay bitwise; grads and optimizer state are localized."""
    names = {id(p): n for n, p in model.named_parameters()}
    frozen_before = {n: full(p).clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: full(p).clone() for n, p in model.named_parameters() if p.requires_grad}
    params = [p for _, p in strategy.trainable_parameters(model)]
    optimizer = strategy.build_optimizer(model, cfg)
    result = train_breadth_first(model, examples, strategy, cfg, pad_id, optimizer=optimizer)

    frozen_changed = [
        n
        for n, p in model.named_parameters()
        if not p.requires_grad and not torch.equal(full(p), frozen_before[n])
    ]
    trainable_change = {
        n: (full(p) - trainable_before[n]).abs().max().item()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    moment_bytes = step_bytes = 0
    state_keys: set[str] = set()
    for state in optimizer.state.values():
        for key, value in state.items():
            state_keys.add(key)
            if key == "step":
                step_bytes += local_bytes(value)
            elif isinstance(value, torch.Tensor):
                moment_bytes += local_bytes(value)
    return {
        "num_steps": result.num_steps,
        "num_frozen": len(frozen_before),
        "frozen_changed": frozen_changed,
        "trainable_max_abs_change": trainable_change,
        "trainable_names": sorted(trainable_before),
        "optimizer_state_names": sorted(names[id(p)] for p in optimizer.state),
        "optimizer_group_names": sorted(names[id(p)] for g in optimizer.param_groups for p in g["params"]),
        "optimizer_state_keys": sorted(state_keys),
        "moment_bytes": moment_bytes,
        "step_bytes": step_bytes,
        "frozen_with_grad": [
            n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None
        ],
        "trainable_without_grad": [
            n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
        ],
        "trainable_local_dtypes": sorted({str(_local(p).dtype) for p in params}),
        "grad_local_dtypes": sorted({str(_local(p.grad).dtype) for p in params if p.grad is not None}),
        "trainable_full_bytes": sum(p.numel() * p.element_size() for p in params),
        **training_state_bytes(model, optimizer),
    }


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def check_mixed_precision(
    model_dir: str,
    batch: dict[str, torch.Tensor],
    reference_logits: torch.Tensor,
    examples: list[EncodedExample],
    pad_id: int,
) -> dict[str, Any]:
    """Invariant 5: a bfloat16 compute policy runs forward and training; stored trainable shards stay fp32."""
    from locft_dist.parallel.fsdp import FSDPStrategy

    strategy = FSDPStrategy(DistConfig(param_dtype="bfloat16", timeout_minutes=TIMEOUT_MINUTES), "cpu")
    model, _ = strategy.load_model(ModelConfig(path=model_dir), LOCATE)
    stored_before = sorted({str(_local(p).dtype) for p in model.parameters() if p.requires_grad})
    logits = logits_of(model, batch)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-2, early_stop_loss=None, progress=False)
    training = check_training(model, strategy, examples, pad_id, cfg)
    return {
        "logits_dtype": str(logits.dtype),
        "logits_max_abs_diff": (logits.float() - reference_logits).abs().max().item(),
        "logit_scale": reference_logits.abs().max().item(),
        "trainable_local_dtypes_before": stored_before,
        **{
            k: training[k]
            for k in (
                "trainable_local_dtypes",
                "grad_local_dtypes",
                "frozen_changed",
                "num_steps",
                "trainable_max_abs_change",
            )
        },
    }


class GatherCounter:
    """Counts the all-gathers FSDP2 issues for one unit (calls of its param group's ``unshard`` that find
    it sharded)."""

    def __init__(self, module: nn.Module) -> None:
        self.group = module._get_fsdp_state()._fsdp_param_group
        self.count = 0
        original = self.group.unshard

        def counting(*args: Any, **kwargs: Any) -> Any:
            if not self.group.is_unsharded and self.group._all_gather_result is None:
                self.count += 1
            return original(*args, **kwargs)

        self.group.unshard = counting


def check_units_and_cached_path(
    strategy: Strategy, tied_model: nn.Module, vocab_size: int, examples: list[EncodedExample], pad_id: int
) -> dict[str, Any]:
    """Embedding and output layer are FSDP units of their own (one unit when tied); a training pass from
    the prefix cache never all-gathers the embedding; the delta is gathered to rank 0 only."""
    from locft_dist.locate import freeze_all_but, resolve_location
    from locft_dist.prefix_cache import build_prefix_cache
    from tests.conftest import make_random_llama

    tied = {
        "embed_is_unit": isinstance(tied_model.get_input_embeddings(), FSDPModule),
        "head_shares_the_unit": tied_model.get_output_embeddings()._get_fsdp_state()
        is tied_model.get_input_embeddings()._get_fsdp_state(),
    }
    model = make_random_llama(vocab_size, seed=5, num_layers=3)  # untied embedding and head
    freeze_all_but(model, resolve_location(model, [1], ["mlp.down_proj"]).parameter_names)
    model = strategy.wrap_model(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    units = {"embed": isinstance(embed, FSDPModule), "head": isinstance(head, FSDPModule)}
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, early_stop_loss=None, progress=False)
    cache = build_prefix_cache(model, examples, strategy, cfg, pad_id, remaining_passes=2 * len(examples))
    assert cache is not None and cache.first_layer == 1
    counters = {"embed": GatherCounter(embed), "head": GatherCounter(head)}
    owned = cache.owned(len(examples))
    for chunk in (owned[:2], owned[2:4]):  # two cached training passes with backward
        losses, _ = cache.losses(model, chunk, examples, pad_id)
        strategy.backward(losses.sum())
    unsharded = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    gathered = strategy.gather_trainable(model)
    full_values = {n: full(p).float() for n, p in strategy.trainable_parameters(model)}
    return {
        **tied,
        "units": units,
        "gathers": {k: c.count for k, c in counters.items()},
        "unsharded_after_cached_passes": unsharded,
        "gathered_names": sorted(gathered),
        "gathered_equal_full": all(torch.equal(t, full_values[n]) for n, t in gathered.items()),
    }


def guarded(fn: Callable[[], Any]) -> Any:
    """Run one check; a failure becomes ``{"error": traceback}`` instead of ending the worker."""
    try:
        return fn()
    except Exception:
        return {"error": traceback.format_exc()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("edits")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch.distributed as dist

    from locft_dist.parallel.fsdp import FSDPStrategy

    strategy = FSDPStrategy(DistConfig(timeout_minutes=TIMEOUT_MINUTES), "cpu")
    rank, world_size = strategy.rank, strategy.world_size
    model, _ = strategy.load_model(ModelConfig(path=args.model_dir), LOCATE)
    reference = reference_model(args.model_dir)
    batch = fixed_batch(reference.config.vocab_size)
    reference_logits = logits_of(reference, batch)
    examples, pad_id = load_examples(args.model_dir, args.edits)

    local: dict[str, Any] = {}  # in this order: the later checks change the model
    local["sharding"] = guarded(lambda: check_sharding(model, rank, world_size))
    local["loading"] = guarded(lambda: check_loading(model, reference, args.model_dir, batch))
    local["unsharded_after_inference_forward"] = guarded(lambda: unsharded_after_forward(model, batch))
    local["sharding_after_reshard"] = guarded(lambda: check_sharding(model, rank, world_size))
    local["training"] = guarded(lambda: check_training(model, strategy, examples, pad_id))
    local["sharding_after_training"] = guarded(lambda: check_sharding(model, rank, world_size))
    local["units"] = guarded(
        lambda: check_units_and_cached_path(strategy, model, reference.config.vocab_size, examples, pad_id)
    )
    local["mixed_precision"] = guarded(
        lambda: check_mixed_precision(args.model_dir, batch, reference_logits, examples, pad_id)
    )
    per_rank: list[Any] = [None] * world_size
    dist.all_gather_object(per_rank, local)
    if rank == 0:
        out = Path(args.out)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"world_size": world_size, "ranks": per_rank}, indent=1))
        os.replace(tmp, out)
    strategy.barrier()
    strategy.close()
    # Skip interpreter finalization: the process group outlives destroy_process_group (meshes and DTensors
    # still reference it), and a gloo worker thread that releases a finished all-gather's Python-owned
    # tensors while the interpreter finalizes aborts the process ("terminate called without an active
    # exception", about 1 run in 8 here), failing the job after the results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
