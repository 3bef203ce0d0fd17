"""Turn a location spec (decoder layers + module names) into the exact parameters LocFT trains.

LocFT edits knowledge by tuning a few localized weights, e.g. the MLP down projection of one layer. Users
name them the same way for every architecture and this module finds the concrete modules by structure
(shapes of the linears), so GPT-2's ``Conv1D`` ``mlp.c_proj`` and NeoX's ``mlp.dense_4h_to_h`` are both
``mlp.down_proj``. Only shapes are read, so it works on meta-device models before weights are loaded.

Module entries are relative to a decoder block:

* an exact module path (``mlp.c_proj``, ``self_attn.o_proj``) or parameter path (``mlp.c_proj.weight``);
* ``mlp.down_proj`` (intermediate -> hidden), ``mlp.up_proj`` (hidden -> intermediate, not the gate),
  ``mlp.gate_proj`` (gated MLPs only), ``mlp`` (the whole MLP), matched exactly first, by structure otherwise;
* ``*`` or ``layer``: the whole decoder block.
"""

from __future__ import annotations

import copy
import difflib
import logging
import operator
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from locft_dist.errors import LocateError

logger = logging.getLogger(__name__)

WHOLE_BLOCK = ("*", "layer")
ALIASES = ("mlp", "mlp.down_proj", "mlp.up_proj", "mlp.gate_proj")
_MLP_CHILD_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block", "feedforward", "ff", "block_sparse_moe")
_ATTENTION_HINTS = ("attn", "attention")
_LISTING_DEPTH = 3

_REFERENCE = {
    "train.batch_size": 100,
    "train.epochs": 25,
    "train.optimizer": "adam",
    "train.early_stop_loss": 0.01,
}
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": {"locate.layers": [22], "locate.modules": ["mlp.down_proj"], "train.lr": 5e-4, **_REFERENCE},
    "qwen2.5-7b": {"locate.layers": [6], "locate.modules": ["mlp.down_proj"], "train.lr": 5e-4, **_REFERENCE},
    "mistral-7b": {"locate.layers": [23], "locate.modules": ["*"], "train.lr": 5e-5, **_REFERENCE},
}
"""The LocFT authors' reference settings for 7-8B models, as dotted config overrides."""

PRESETS["smollm2-135m"] = {
    "locate.layers": [2, 3, 4, 5, 6],
    "locate.modules": ["mlp.down_proj"],
    "train.lr": 5e-3,
    "train.batch_size": 20,
    "train.epochs": 10,
    "train.optimizer": "adam",
    "train.early_stop_loss": 0.01,
    "augment.locality_source": "file",
    "augment.locality_loss": "kl",
    "augment.locality_ratio": 1.0,
    "augment.locality_weight": 1.0,
    "augment.paraphrases": 2,
}
"""SmolLM2-135M(-Instruct), measured on real CounterFact edits (docs/editing_quality.md): early-mid layers,
where the subject's last token has a subject-specific key, KL locality supervision on random unedited
facts, which the user provides as ``augment.locality_path``, and two pseudo-paraphrases per edit (the
unedited model's own text before the prompt: generalization 0.31 -> 0.52 on 100 edits)."""


PRESETS["smollm2-135m-subjects"] = {
    "locate.subject_embeddings": True,
    "locate.common_token_share": 0.001,
    "locate.common_generated_tokens": 24,
    "locate.tune_sequence_start": False,
    "train.lr": 1e-1,
    "train.batch_size": 20,
    "train.epochs": 25,
    "train.optimizer": "adam",
    "train.early_stop_loss": 0.01,
    "train.focus_epochs": 20,
    "train.focus_loss": 0.1,
    "augment.paraphrases": 2,
    "augment.paraphrase_tokens": 10,
    "augment.wordings": 2,
}
"""SmolLM2-135M(-Instruct) when unrelated prompts must keep their answers (docs/editing_quality.md): the
input-embedding rows of the edited subjects' tokens (prompts without them compute exactly as before),
trained in two other wordings of each edit's relation (``augment.wordings_path``: records such as
CounterFact's) and under two pseudo-paraphrase prefixes; common tokens are told from a subject's own by
``locate.common_text_path`` (default ``augment.locality_path``) and the unedited model's 24-token
continuations of those prompts (digits and nationalities it writes would carry edits into its answers);
a token that opens the sequence keeps its row where the subject has another (the first position is where
attention sinks: tuning it broke most of the edits that still failed); twenty focus epochs after the 25
train the examples still above loss 0.1. One process."""


@dataclass(frozen=True)
class DecoderLayout:
    """Where the decoder blocks live: parameters of layer ``i`` are named ``f"{layers_path}.{i}.…"``."""

    layers_path: str
    num_layers: int


@dataclass(frozen=True)
class Location:
    """The resolved spec; ``parameter_names`` are exactly as ``model.named_parameters()`` yields them."""

    layers: tuple[int, ...]
    modules: tuple[str, ...]
    parameter_names: tuple[str, ...]

    @property
    def first_layer(self) -> int:
        """Hidden states entering this layer never change during training, so they can be cached."""
        return min(self.layers)


@dataclass(frozen=True)
class _Mlp:
    """An MLP found by structure; paths are relative to the decoder block."""

    path: str  # "" when the block itself holds the MLP linears (OPT's fc1/fc2)
    linears: tuple[str, ...]
    down: str
    ups: tuple[str, ...]  # hidden -> intermediate projections: up, or gate and up, in declaration order
    fused: bool  # one hidden -> 2*intermediate projection holding gate and up (Phi-3's gate_up_proj)


def describe_model(model: nn.Module) -> str:
    """Class name and model_type, for error messages."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type={model_type})" if model_type else type(model).__name__


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a dense projection. GPT-2's Conv1D stores its weight transposed, as [in, out]."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(getattr(module, "nx", module.weight.shape[0])), int(module.nf)
    return None


def _under_attention(path: str) -> bool:
    return any(hint in part.lower() for part in path.split(".") for hint in _ATTENTION_HINTS)


def _has_attention(block: nn.Module) -> bool:
    return any(
        _under_attention(name) or "Attention" in type(child).__name__
        for name, child in block.named_children()
    )


def _mlp_child(block: nn.Module) -> str | None:
    """The block's MLP child when it is named or typed as one (mlp, feed_forward, *MLP, *FeedForward)."""
    for name, child in block.named_children():
        kind = type(child).__name__
        if name in _MLP_CHILD_NAMES or "MLP" in kind or "FeedForward" in kind:
            return name
    return None


def _block_linears(block: nn.Module) -> list[tuple[str, int, int]]:
    """(path, in, out) of every dense projection in the block, in declaration order."""
    return [(name, *dims) for name, module in block.named_modules() if (dims := _linear_dims(module))]


def _hidden_size(block: nn.Module) -> int | None:
    """The residual width: most projections read it (q/k/v, up, gate, and the attention output)."""
    counts = Counter(fan_in for _, fan_in, _ in _block_linears(block))
    return counts.most_common(1)[0][0] if counts else None


def _analyse_mlp(block: nn.Module) -> _Mlp | str:
    """The block's MLP by structure, or a sentence saying why it was not found."""
    hidden = _hidden_size(block)
    if hidden is None:
        return "the block has no linear layers"
    block_linears = [item for item in _block_linears(block) if not _under_attention(item[0])]
    named = _mlp_child(block)
    if named is not None:
        candidates = [named]
    else:  # the smallest non-attention submodule holding a down and an up projection; the block last
        paths = [name for name, _ in block.named_modules() if name and not _under_attention(name)]
        candidates = [*sorted(paths, key=lambda p: -p.count(".")), ""]
    reason = "no submodule has linears mapping hidden -> intermediate -> hidden"
    for path in candidates:
        linears = [item for item in block_linears if not path or item[0].startswith(f"{path}.")]
        downs = [(name, fan_in) for name, fan_in, out in linears if out == hidden and fan_in != hidden]
        if len(downs) != 1:
            if downs:
                names = ", ".join(name for name, _ in downs)
                reason = f"'{path}' has {len(downs)} intermediate -> hidden linears ({names}; experts?)"
            elif path == named:
                reason = f"'{path}' has no linear mapping intermediate -> hidden (fused experts?)"
            continue
        down, intermediate = downs[0]
        widths = (intermediate, 2 * intermediate)
        ups = [(name, out) for name, fan_in, out in linears if fan_in == hidden and out in widths]
        if not ups:
            continue
        fused = len(ups) == 1 and ups[0][1] == 2 * intermediate
        return _Mlp(path, tuple(name for name, _, _ in linears), down, tuple(name for name, _ in ups), fused)
    return reason


def _split_gate_up(ups: tuple[str, ...], where: str) -> tuple[str | None, str]:
    """(gate, up): the gate is the one named so, or else the one declared first, as in HF's gated MLPs."""
    if len(ups) == 1:
        return None, ups[0]
    if len(ups) != 2:
        raise LocateError(f"cannot tell gate from up among {', '.join(ups)} in {where}; name one exactly")
    gates = [name for name in ups if "gate" in name.rsplit(".", 1)[-1]]
    gate = gates[0] if len(gates) == 1 else ups[0]
    if len(gates) != 1:
        logger.info("taking '%s' as the MLP gate by declaration order", gate)
    return gate, next(name for name in ups if name != gate)


def find_decoder_layers(model: nn.Module) -> DecoderLayout:
    """The longest ModuleList of same-type blocks that hold attention and an MLP, found by structure.

    A tie (e.g. equally deep vision and text towers) goes to the first in module order.
    """
    best: tuple[str, int] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1 or (best and len(module) <= best[1]):
            continue
        block = module[0]
        if _has_attention(block) and (_mlp_child(block) is not None or isinstance(_analyse_mlp(block), _Mlp)):
            best = (name, len(module))
    if best is None:
        raise LocateError(
            f"cannot find the decoder layers of {describe_model(model)}: no nn.ModuleList of identical "
            "blocks holding both attention and an MLP"
        )
    return DecoderLayout(layers_path=best[0], num_layers=best[1])


def layer_of_parameter(name: str, layout: DecoderLayout) -> int | None:
    """The decoder layer a parameter name belongs to, or None (embeddings, final norm, head).

    The layers path may follow a wrapper prefix such as ``module.`` or ``_orig_mod.``.
    """
    parts, path = name.split("."), layout.layers_path.split(".")
    for start in range(len(parts) - len(path)):
        if parts[start : start + len(path)] == path and parts[start + len(path)].isdigit():
            return int(parts[start + len(path)])
    return None


def _resolve_layers(layers: Sequence[int] | int, layout: DecoderLayout, arch: str) -> tuple[int, ...]:
    requested = [layers] if isinstance(layers, int) else list(layers)
    if not requested:
        raise LocateError(f"no layers given; {arch} has {layout.num_layers} decoder layers (e.g. [-1])")
    count, resolved = layout.num_layers, set()
    for raw in requested:
        try:
            if isinstance(raw, bool):
                raise TypeError
            index = operator.index(raw)
        except TypeError:
            raise LocateError(f"layer index {raw!r} is not an integer") from None
        if not -count <= index < count:
            raise LocateError(
                f"layer index {index} is out of range for {arch}, which has {count} decoder layers at "
                f"'{layout.layers_path}' (valid: 0..{count - 1}, or -{count}..-1 counting from the end)"
            )
        resolved.add(index % count)
    return tuple(sorted(resolved))


def _block_listing(block: nn.Module) -> str:
    """What exists in a block, linears first, for 'unknown module' errors."""
    linears, others, fused = [], [], []
    for name, module in block.named_modules():
        if not name or name.count(".") >= _LISTING_DEPTH:
            continue
        if _linear_dims(module):
            linears.append(name)
            continue
        others.append(name)
        fused += [f"{name}.{p}" for p, param in module.named_parameters(recurse=False) if param.dim() >= 2]
    parts = [f"linear modules: {', '.join(linears) or '-'}", f"other modules: {', '.join(others) or '-'}"]
    if fused:
        parts.append(f"other weights: {', '.join(fused)}")
    return "; ".join(parts) + f"; aliases: {', '.join(WHOLE_BLOCK + ALIASES)}"


def _resolve_alias(block: nn.Module, entry: str, where: str, notes: set[tuple[str, str]]) -> str | list[str]:
    """An alias -> a module path relative to the block (or the MLP's linears for a block-level MLP).

    ``notes`` records what was already logged in this call, so a note is given once, not per layer.
    """
    named = _mlp_child(block)
    if entry == "mlp" and named is not None:
        return named
    mlp = _analyse_mlp(block)
    if not isinstance(mlp, _Mlp):
        raise LocateError(f"cannot resolve '{entry}' by structure in {where}: {mlp}. {_block_listing(block)}")
    if entry == "mlp":
        return list(mlp.linears)
    if entry == "mlp.down_proj":
        return mlp.down
    gate, up = _split_gate_up(mlp.ups, where)
    if mlp.fused:
        if (entry, up) not in notes:
            notes.add((entry, up))
            logger.warning("%s: '%s' resolves to the fused '%s' (gate and up in one)", where, entry, up)
        return up
    if entry == "mlp.up_proj":
        return up
    if gate is None:
        raise LocateError(
            f"'mlp.gate_proj' does not exist in {where}: its MLP is not gated (one hidden -> intermediate "
            f"projection, '{up}'). {_block_listing(block)}"
        )
    return gate


def _resolve_entry(block: nn.Module, entry: str, where: str, notes: set[tuple[str, str]]) -> list[str]:
    """Parameter names relative to the block that one module entry selects."""
    params = dict(block.named_parameters())
    if entry in WHOLE_BLOCK:
        return list(params)
    if entry in params:
        return [entry]
    paths: str | list[str] | None = None
    try:
        if entry:
            block.get_submodule(entry)
            paths = entry
    except AttributeError:
        pass
    if paths is None and entry in ALIASES:
        paths = _resolve_alias(block, entry, where, notes)
    if paths is None:
        known = [name for name, _ in block.named_modules() if name] + list(ALIASES)
        close = difflib.get_close_matches(entry, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise LocateError(f"unknown module '{entry}' in {where}.{hint} {_block_listing(block)}")
    selected = [
        name
        for path in ([paths] if isinstance(paths, str) else paths)
        for name in params
        if name.startswith(f"{path}.")
    ]
    if not selected:
        raise LocateError(f"module '{entry}' in {where} has no parameters to train")
    if paths != entry and (entry, str(paths)) not in notes:
        notes.add((entry, str(paths)))
        logger.info("%s: '%s' -> %s", where, entry, paths)
    return selected


def resolve_location(model: nn.Module, layers: Sequence[int], modules: Sequence[str]) -> Location:
    """Resolve layers x modules to parameter names, deduplicated (tied weights) and in model order."""
    arch = describe_model(model)
    layout = find_decoder_layers(model)
    resolved_layers = _resolve_layers(layers, layout, arch)
    entries = (modules,) if isinstance(modules, str) else tuple(modules)
    if not entries:
        raise LocateError(f"no modules given for {arch}; e.g. ['mlp.down_proj'] or ['*'] for whole layers")
    canonical = {id(param): name for name, param in model.named_parameters()}
    order = {name: position for position, name in enumerate(canonical.values())}
    blocks = model.get_submodule(layout.layers_path)
    chosen: set[str] = set()
    notes: set[tuple[str, str]] = set()
    for index in resolved_layers:
        block = blocks[index]
        where = f"decoder layer {index} ({type(block).__name__}) of {arch}"
        block_params = dict(block.named_parameters())
        for entry in entries:
            selected = _resolve_entry(block, entry, where, notes)
            chosen.update(canonical[id(block_params[name])] for name in selected)
    names = tuple(sorted(chosen, key=order.__getitem__))
    logger.info("location: layers %s, modules %s -> %d tensors", resolved_layers, entries, len(names))
    return Location(layers=resolved_layers, modules=entries, parameter_names=names)


def freeze_all_but(model: nn.Module, parameter_names: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    """Make exactly these parameters trainable, before sharding; returns (name, param) in model order.

    A tied weight may be named by any of its names; the canonical (first) name is returned.
    """
    wanted = [parameter_names] if isinstance(parameter_names, str) else list(parameter_names)
    if not wanted:
        raise LocateError(f"no parameters to train in {describe_model(model)}")
    every = dict(model.named_parameters(remove_duplicate=False))
    missing = [name for name in wanted if name not in every]
    if missing:
        raise LocateError(
            f"{len(missing)} parameter(s) not in {describe_model(model)}: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    keep = {id(every[name]) for name in wanted}
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in keep)
        if id(param) in keep:
            trainable.append((name, param))
    assert len(trainable) == len(keep), "a wanted parameter was not reached by named_parameters()"
    return trainable


def preset_overrides(name: str) -> dict[str, Any]:
    """A copy of a preset's dotted overrides; an unknown name suggests the closest known one."""
    key = name.strip().lower()
    if key in PRESETS:
        return copy.deepcopy(PRESETS[key])
    close = difflib.get_close_matches(key, list(PRESETS), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise LocateError(f"unknown preset '{name}'.{hint} Known presets: {', '.join(sorted(PRESETS))}")
