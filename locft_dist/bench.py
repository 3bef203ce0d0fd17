"""``locft bench``: the same edits on the same model through a naive loop and through locft-dist, timed.

    locft bench                                   # tiny 8-layer Llama on CPU, last layer's down_proj
    locft bench --layer 4                         # a middle layer
    locft bench --device cuda --shape llama3-8b --dtype bfloat16 --layer 22 --num-edits 2000 --batch-size 100
    locft bench --model /path/to/hf_model --num-edits 200 --epochs 5   # a real model directory

With ``--shape`` the model is randomly initialized with the named shape (``cost_model.SHAPES``; nothing is
downloaded); with ``--model`` it is loaded from a Hugging Face directory. The edits are random token
sequences (prompt 8-32 tokens, target 2-6 and EOS) over the model's vocabulary, or with ``--edits FILE``
real edits encoded by the model's tokenizer, so only the compute is measured. The naive loop is the LocFT
authors' computation: every global batch padded to its longest edit, the whole model run forward, logits at
every position over the whole vocabulary in float32, per-edit mean target cross-entropy, Adam; it visits the
batches in the same seeded order as locft-dist, so both end with the same weights up to rounding and their
final metrics must agree. With ``--dtype bfloat16`` both train float32 master weights of the edited tensors,
as ``locft edit`` does in one process (matmuls in bf16 from a cast of the master on a GPU).

The FLOP floor is the time the unavoidable work takes at the device's measured matmul peak: per real token,
the forward of the layers that must run (the frozen prefix once per edit, layers k..L and the norm every
epoch) plus the backward from the loss down to the trainable parameters (input gradients of the layers
above, weight gradients of the trainable tensors), and the output layer forward and backward at the target
positions. Attention score FLOPs are counted at the mean length.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from locft_dist.config import TrainConfig
from locft_dist.cost_model import SHAPES
from locft_dist.edits.encode import IGNORE_INDEX, EncodedExample, collate
from locft_dist.errors import ConfigError
from locft_dist.locate import find_decoder_layers, freeze_all_but, resolve_location
from locft_dist.logits import final_hidden, head_logits, target_positions
from locft_dist.losses import losses_from_hidden
from locft_dist.model import DTYPES
from locft_dist.parallel.master_weights import casts_for_matmul, keep_fp32_master
from locft_dist.parallel.memory import peak_host_bytes
from locft_dist.parallel.single import SingleProcess
from locft_dist.sampler import BreadthFirstSampler
from locft_dist.trainer import train_breadth_first


@dataclass(kw_only=True)
class BenchConfig:
    device: str = "cpu"
    shape: str = "tiny"
    num_layers: int | None = None
    layer: int = -1
    modules: list[str] = field(default_factory=lambda: ["mlp.down_proj"])
    dtype: str = "float32"
    num_edits: int = 400
    epochs: int = 10
    batch_size: int = 50
    lr: float = 1e-3
    seed: int = 0
    naive: bool = True
    compile: bool = False
    """``train.compile`` for locft-dist's loop (the naive loop stays eager)."""
    fused_norm: bool | None = None
    """``train.fused_norm`` for locft-dist's loop (null: on a GPU; the naive loop runs the model's own)."""
    repeats: int = 1
    """Run locft-dist's loop this many times in the process, from the same initial weights: the first run
    pays the process's one-time GPU costs (kernel loading, memory pool growth), later ones do not."""
    micro_batch_tokens: int | None = TrainConfig().micro_batch_tokens
    micro_batch_pass_cost: int | None = None
    model_dir: str | None = None
    """A Hugging Face model directory to edit instead of a random ``shape``."""
    edits: str | None = None
    """An edit file (any supported format) encoded by ``model_dir``'s tokenizer, instead of random tokens."""
    skip_invalid: bool = False
    """Skip the edit file's invalid records (e.g. one prompt with two targets) instead of failing."""


@dataclass
class LoopStats:
    name: str
    seconds: float
    epoch_seconds: list[float]
    num_edit_passes: int
    num_tokens: int
    peak_memory_gib: float
    final_loss: float
    final_accuracy: float

    @property
    def edits_per_second(self) -> float:
        return self.num_edit_passes / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds


def build_model(bench: BenchConfig) -> nn.Module:
    """The model to edit: ``bench.model_dir`` loaded as stored (cast to ``bench.dtype``), else a randomly
    initialized Llama of ``bench.shape``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(bench.device)
    if bench.model_dir:
        from locft_dist.model import load_model

        return load_model(bench.model_dir, dtype=bench.dtype).to(device).eval()
    shape = SHAPES[bench.shape]
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=bench.num_layers or shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=shape.tied_embeddings,
    )
    torch.manual_seed(bench.seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[bench.dtype])  # built in its dtype: a 72B slice has no room for fp32
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def synthetic_examples(
    num_edits: int, vocab: int, seed: int, *, bos: int = 1, eos: int = 2
) -> list[EncodedExample]:
    """Random prompts (8-32 tokens after BOS) and targets (2-6 tokens + EOS) over the vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_edits):
        prompt = [bos] + [rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))]
        target = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))] + [eos]
        out.append(EncodedExample(tuple(prompt + target), len(prompt)))
    return out


def bench_examples(bench: BenchConfig, model: nn.Module) -> list[EncodedExample]:
    """``bench.num_edits`` edits: from ``bench.edits`` (encoded as ``locft edit`` does), else random."""
    if bench.edits:
        from locft_dist.edits import load_edits
        from locft_dist.edits.encode import encode_pairs
        from locft_dist.model import load_tokenizer

        if not bench.model_dir:
            raise ConfigError("--edits needs --model: the edits are encoded by the model's tokenizer")
        requests = load_edits(bench.edits, skip_invalid=bench.skip_invalid, limit=bench.num_edits).requests
        tokenizer = load_tokenizer(bench.model_dir)
        return encode_pairs(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else (2 if eos is None else eos)
    return synthetic_examples(bench.num_edits, model.config.vocab_size, bench.seed, eos=int(eos))


def naive_target_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The authors' per-edit loss: logits at every position, upcast to float32 over the whole vocabulary,
    cross-entropy masked to the target tokens, averaged per edit (``[batch]``)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).float()
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def naive_loop(
    model: nn.Module, examples: Sequence[EncodedExample], train: TrainConfig, device: torch.device
) -> list[float]:
    """The authors' computation: whole global batch, whole model forward, every step; epoch seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=train.lr)
    sampler = BreadthFirstSampler(len(examples), train.batch_size, train.seed)
    seconds = []
    for _ in range(train.epochs):
        start = time.perf_counter()
        for batch in sampler.epoch_batches():
            inputs = {k: v.to(device) for k, v in collate([examples[i] for i in batch.indices], 0).items()}
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            loss = naive_target_loss(logits, inputs["labels"]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


@torch.no_grad()
def final_metrics(model: nn.Module, examples: Sequence[EncodedExample], device: torch.device) -> tuple:
    """Mean target cross-entropy and the fraction of target tokens predicted exactly (teacher forcing),
    from the output layer at the target positions."""
    losses, correct, total = [], 0, 0
    for begin in range(0, len(examples), 64):
        inputs = {k: v.to(device) for k, v in collate(list(examples[begin : begin + 64]), 0).items()}
        hidden = final_hidden(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        losses.append(losses_from_hidden(model, hidden, inputs).double().cpu())
        rows, cols = target_positions(inputs["labels"])
        predicted = head_logits(model, hidden[rows, cols]).argmax(-1)
        correct += int((predicted == inputs["labels"][rows, cols + 1]).sum())
        total += len(rows)
    return float(torch.cat(losses).mean()), correct / total


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Sustained matmul FLOP/s on this device: a square matmul timed after a warm-up, best of 5 rounds."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    repeats = 50 if device.type == "cuda" else 10
    best = 0.0
    for _ in range(5):  # the best of a few rounds: other load on the machine only slows a round down
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_flops(model: nn.Module, first_layer: int, examples: Sequence[EncodedExample], epochs: int) -> float:
    """FLOPs of the unavoidable work over the run (see the module docstring)."""
    prefix, per_epoch = floor_flops_parts(model, first_layer, examples)
    return prefix + epochs * per_epoch


def floor_flops_parts(
    model: nn.Module, first_layer: int, examples: Sequence[EncodedExample]
) -> tuple[float, float]:
    """(the frozen prefix once, one epoch) of ``floor_flops``."""
    layers = model.get_submodule(find_decoder_layers(model).layers_path)
    hidden_size = model.config.hidden_size
    num_tokens = sum(len(e.input_ids) for e in examples)
    num_targets = sum(e.num_target_tokens for e in examples)
    mean_len = num_tokens / len(examples)

    def layer_flops(layer: nn.Module) -> float:  # forward, per token: weights + attention scores
        return 2 * sum(p.numel() for p in layer.parameters()) + 4 * mean_len * hidden_size

    head = 2 * model.get_output_embeddings().weight.numel()
    prefix = sum(layer_flops(layer) for layer in layers[:first_layer])
    suffix = sum(layer_flops(layer) for layer in layers[first_layer:])
    above = sum(layer_flops(layer) for layer in layers[first_layer + 1 :])
    trainable = 2 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_epoch = num_tokens * (suffix + above + trainable) + num_targets * 2 * head  # head: fwd + input grad
    return num_tokens * prefix, per_epoch


def _restore(model: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    """The trainable tensors back to ``initial``, no gradients: the next loop starts where the first did."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in initial:
                param.copy_(initial[name])
    model.zero_grad(set_to_none=True)


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_host_bytes() / 2**30


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def train_config(bench: BenchConfig) -> TrainConfig:
    """locft-dist's settings for the bench: every epoch runs (no early stop), no progress bar."""
    return TrainConfig(
        epochs=bench.epochs,
        batch_size=bench.batch_size,
        lr=bench.lr,
        early_stop_loss=None,
        progress=False,
        seed=bench.seed,
        micro_batch_tokens=bench.micro_batch_tokens,
        micro_batch_pass_cost=bench.micro_batch_pass_cost,
        compile=bench.compile,
        fused_norm=bench.fused_norm,
    )


def run_bench(bench: BenchConfig) -> dict:
    """Both loops on the same initial weights and edits; returns the numbers the table shows."""
    device = torch.device(bench.device)
    model = build_model(bench)
    location = resolve_location(model, [bench.layer], bench.modules)
    freeze_all_but(model, location.parameter_names)
    # As `locft edit` runs one process: fp32 master weights for a bf16/fp16 model, matmuls in the model's
    # dtype on a GPU. Both loops train them, so they stay comparable (a bf16 weight stepped directly
    # rounds most editing updates away).
    keep_fp32_master(model, cast_for_matmul=casts_for_matmul(device))
    examples = bench_examples(bench, model)
    num_tokens = sum(len(e.input_ids) for e in examples)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train = train_config(bench)
    loops: list[LoopStats] = []
    if bench.naive:
        _reset_peak(device)
        _sync(device)  # the timer starts once the model's construction has run on the device
        start = time.perf_counter()
        epoch_seconds = naive_loop(model, examples, train, device)
        seconds = time.perf_counter() - start
        loops.append(
            LoopStats(
                "naive",
                seconds,
                epoch_seconds,
                bench.num_edits * bench.epochs,
                num_tokens * bench.epochs,
                _peak_memory(device),
                *final_metrics(model, examples, device),
            )
        )
    for repeat in range(bench.repeats):
        _restore(model, initial)
        _reset_peak(device)
        _sync(device)
        start = time.perf_counter()
        result = train_breadth_first(model, examples, SingleProcess(device), copy.copy(train), pad_id=0)
        _sync(device)
        seconds = time.perf_counter() - start
        later = [e.seconds for e in result.epochs[1:]]
        loops.append(
            LoopStats(
                "locft-dist" if repeat == 0 else f"run {repeat + 1}",
                seconds,
                [seconds - sum(later), *later],  # the first epoch includes filling the prefix cache
                result.num_edit_passes,
                num_tokens * bench.epochs,
                _peak_memory(device),
                *final_metrics(model, examples, device),
            )
        )
    peak = measured_peak_flops(device, DTYPES[bench.dtype])
    prefix_flops, epoch_flops = floor_flops_parts(model, location.first_layer, examples)
    floor_seconds = (prefix_flops + bench.epochs * epoch_flops) / peak
    return {
        "config": asdict(bench),
        "first_layer": location.first_layer,
        "num_layers": model.config.num_hidden_layers,
        "num_tokens": num_tokens,
        "peak_flops": peak,
        "floor_seconds": floor_seconds,
        "floor_epoch_seconds": epoch_flops / peak,
        "loops": [{**asdict(s), "edits_per_second": s.edits_per_second} for s in loops],
        "speedup": loops[0].seconds / loops[1].seconds if bench.naive else None,
    }


def format_table(report: dict) -> str:
    """The comparison as a plain-text table."""
    cfg = report["config"]
    head = (
        f"{cfg['model_dir'] or cfg['shape']} ({report['num_layers']} layers, {cfg['dtype']}, "
        f"{cfg['device']}), "
        f"editing layer {report['first_layer']} {','.join(cfg['modules'])}: {cfg['num_edits']} edits x "
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, {report['num_tokens']} tokens/epoch, "
        f"locft-dist micro_batch_tokens={cfg['micro_batch_tokens']}"
    )
    rows = [("", *[loop["name"] for loop in report["loops"]])]

    def row(label: str, fmt, key) -> None:
        rows.append((label, *[fmt(key(loop)) for loop in report["loops"]]))

    row("edits/s", "{:.1f}".format, lambda s: s["num_edit_passes"] / s["seconds"])
    row("tokens/s", "{:.0f}".format, lambda s: s["num_tokens"] / s["seconds"])
    row("first epoch s", "{:.2f}".format, lambda s: s["epoch_seconds"][0])
    row(
        "later epoch s (mean)",
        "{:.2f}".format,
        lambda s: sum(s["epoch_seconds"][1:]) / max(1, len(s["epoch_seconds"]) - 1),
    )
    row("total s", "{:.2f}".format, lambda s: s["seconds"])
    row("peak memory GiB", "{:.2f}".format, lambda s: s["peak_memory_gib"])
    row("final target loss", "{:.4f}".format, lambda s: s["final_loss"])
    row("final token accuracy", "{:.3f}".format, lambda s: s["final_accuracy"])
    row("fraction of FLOP floor", "{:.1%}".format, lambda s: report["floor_seconds"] / s["seconds"])

    def later_fraction(loop: dict) -> float:  # the steady state, past start-up costs
        later = loop["epoch_seconds"][1:]
        return report["floor_epoch_seconds"] * len(later) / sum(later)

    if len(report["loops"][0]["epoch_seconds"]) > 1:
        row("  later epochs", "{:.1%}".format, later_fraction)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head]
    for r in rows:
        cells = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells))
    floor = report["floor_seconds"]
    lines.append(
        f"FLOP floor {floor:.3f} s at a measured peak of {report['peak_flops'] / 1e12:.2f} TFLOP/s"
        + (f"; speedup {report['speedup']:.2f}x" if report["speedup"] else "")
    )
    return "\n".join(lines)


def main(bench: BenchConfig, json_out: str | None = None) -> dict:
    if bench.model_dir is None and bench.shape not in SHAPES:
        raise ConfigError(f"--shape {bench.shape!r} is not one of {', '.join(SHAPES)}")
    if bench.model_dir is not None:
        from locft_dist.model import check_model_dir

        check_model_dir(bench.model_dir)
    torch.set_grad_enabled(True)
    report = run_bench(bench)
    print(format_table(report))
    if json_out:
        tmp = f"{json_out}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        os.replace(tmp, json_out)
    return report
