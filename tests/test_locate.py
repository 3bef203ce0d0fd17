"""locate.py on tiny random models of every supported family: layouts, aliases, errors, freezing, presets."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from torch import nn

from locft_dist import locate
from locft_dist.errors import LocateError
from locft_dist.locate import (
    PRESETS,
    DecoderLayout,
    find_decoder_layers,
    freeze_all_but,
    layer_of_parameter,
    preset_overrides,
    resolve_location,
)

HIDDEN, INTERMEDIATE, NUM_LAYERS, VOCAB = 32, 48, 3, 64
_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _decoder(model_name: str, config_name: str, **config: object) -> Callable[[], nn.Module]:
    """A builder of a tiny random model with Llama-style config keys; a None value drops a key."""
    defaults = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **_IDS,
    }

    def build() -> nn.Module:
        torch.manual_seed(0)
        config_class = getattr(transformers, config_name)
        kwargs = {key: value for key, value in {**defaults, **config}.items() if value is not None}
        return getattr(transformers, model_name)(config_class(**kwargs))

    return build


_GPT_STYLE = {
    "n_embd": HIDDEN,
    "n_layer": NUM_LAYERS,
    "n_head": 4,
    "n_positions": 64,
    "n_inner": INTERMEDIATE,
}


def _gpt(model_name: str, config_name: str, **config: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        kwargs = {"vocab_size": VOCAB, **_IDS, **_GPT_STYLE, **config}
        return getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))

    return build


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    layers_path: str
    down: str
    up: str
    gate: str | None
    conv1d: bool = False  # weights stored [in, out]
    fused: bool = False  # up has width 2 * intermediate (gate and up in one)
    mlp: str = "mlp"


_GATED = {
    "layers_path": "model.layers",
    "down": "mlp.down_proj",
    "up": "mlp.up_proj",
    "gate": "mlp.gate_proj",
}
FAMILIES = [
    Family("llama", _decoder("LlamaForCausalLM", "LlamaConfig"), **_GATED),
    Family("mistral", _decoder("MistralForCausalLM", "MistralConfig"), **_GATED),
    Family("qwen2", _decoder("Qwen2ForCausalLM", "Qwen2Config"), **_GATED),
    Family("qwen3", _decoder("Qwen3ForCausalLM", "Qwen3Config", head_dim=8), **_GATED),
    Family("gemma", _decoder("GemmaForCausalLM", "GemmaConfig", head_dim=8), **_GATED),
    Family("gemma2", _decoder("Gemma2ForCausalLM", "Gemma2Config", head_dim=8), **_GATED),
    Family(
        "gpt2",
        _gpt("GPT2LMHeadModel", "GPT2Config"),
        "transformer.h",
        "mlp.c_proj",
        "mlp.c_fc",
        None,
        conv1d=True,
    ),
    Family(
        "gptj",
        _gpt("GPTJForCausalLM", "GPTJConfig", rotary_dim=4),
        "transformer.h",
        "mlp.fc_out",
        "mlp.fc_in",
        None,
    ),
    Family(
        "gpt_neox",
        _decoder("GPTNeoXForCausalLM", "GPTNeoXConfig"),
        "gpt_neox.layers",
        "mlp.dense_4h_to_h",
        "mlp.dense_h_to_4h",
        None,
    ),
    Family("phi", _decoder("PhiForCausalLM", "PhiConfig"), "model.layers", "mlp.fc2", "mlp.fc1", None),
    Family(
        "phi3",
        _decoder("Phi3ForCausalLM", "Phi3Config"),
        "model.layers",
        "mlp.down_proj",
        "mlp.gate_up_proj",
        "mlp.gate_up_proj",
        fused=True,
    ),
    # The MLP linears sit in the block itself, so "mlp" and its aliases are found by shapes alone.
    Family(
        "opt",
        _decoder("OPTForCausalLM", "OPTConfig", ffn_dim=INTERMEDIATE, num_key_value_heads=None),
        "model.decoder.layers",
        "fc2",
        "fc1",
        None,
        mlp="",
    ),
]
family_params = pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)


def _under(model: nn.Module, prefix: str) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.startswith(prefix)]


@family_params
def test_find_decoder_layers(family: Family) -> None:
    assert find_decoder_layers(family.build()) == DecoderLayout(family.layers_path, NUM_LAYERS)


@family_params
def test_down_and_up_aliases_resolve_by_structure(family: Family, caplog: pytest.LogCaptureFixture) -> None:
    model = family.build()
    params = dict(model.named_parameters())
    prefix = f"{family.layers_path}.1."
    down = resolve_location(model, [1], ["mlp.down_proj"])
    assert down.parameter_names == tuple(_under(model, prefix + family.down + "."))
    with caplog.at_level(logging.WARNING, logger="locft_dist.locate"):
        up = resolve_location(model, [1, 2], ["mlp.up_proj"])
    expected = [
        name for layer in (1, 2) for name in _under(model, f"{family.layers_path}.{layer}.{family.up}.")
    ]
    assert up.parameter_names == tuple(expected)
    assert caplog.text.count("fused") == int(family.fused)  # once, not per layer

    width = 2 * INTERMEDIATE if family.fused else INTERMEDIATE
    down_shape, up_shape = (HIDDEN, INTERMEDIATE), (width, HIDDEN)
    if family.conv1d:
        down_shape, up_shape = down_shape[::-1], up_shape[::-1]
    assert params[prefix + family.down + ".weight"].shape == down_shape
    assert params[prefix + family.up + ".weight"].shape == up_shape


@family_params
def test_gate_alias(family: Family) -> None:
    model = family.build()
    if family.gate is None:
        with pytest.raises(LocateError, match="not gated"):
            resolve_location(model, [0], ["mlp.gate_proj"])
        return
    location = resolve_location(model, [0], ["mlp.gate_proj"])
    assert location.parameter_names == tuple(_under(model, f"{family.layers_path}.0.{family.gate}."))


@family_params
def test_negative_layers_whole_block_and_mlp(family: Family) -> None:
    model = family.build()
    path = family.layers_path
    location = resolve_location(model, [-1, 0, -NUM_LAYERS, 2], ["mlp.down_proj"])
    assert location.layers == (0, NUM_LAYERS - 1) and location.first_layer == 0
    assert location.parameter_names == tuple(
        _under(model, f"{path}.0.{family.down}.") + _under(model, f"{path}.{NUM_LAYERS - 1}.{family.down}.")
    )
    for whole in ("*", "layer"):
        block = resolve_location(model, [-2], [whole])
        assert block.layers == (NUM_LAYERS - 2,)
        assert block.parameter_names == tuple(_under(model, f"{path}.{NUM_LAYERS - 2}."))
    mlp = resolve_location(model, [1], ["mlp"])
    expected = [f"{path}.1.{family.up}.", f"{path}.1.{family.down}."]
    if family.mlp:
        expected = [f"{path}.1.{family.mlp}."]
    assert set(mlp.parameter_names) == {name for prefix in expected for name in _under(model, prefix)}


@family_params
def test_bad_layer_and_module_errors(family: Family) -> None:
    model = family.build()
    model_type = model.config.model_type
    for bad in (NUM_LAYERS, -NUM_LAYERS - 1):
        with pytest.raises(LocateError) as error:
            resolve_location(model, [0, bad], ["mlp.down_proj"])
        message = str(error.value)
        assert f"layer index {bad}" in message and f"{NUM_LAYERS} decoder layers" in message
        assert model_type in message and type(model).__name__ in message
    with pytest.raises(LocateError, match="no layers"):
        resolve_location(model, [], ["mlp.down_proj"])
    with pytest.raises(LocateError, match="no modules"):
        resolve_location(model, [0], [])
    with pytest.raises(LocateError) as error:
        resolve_location(model, [0], ["mlp.dwn_proj"])
    message = str(error.value)
    assert "unknown module 'mlp.dwn_proj'" in message and model_type in message
    assert family.down in message and message.index("linear modules:") < message.index("other modules:")


@family_params
def test_freeze_all_but_and_layer_of_parameter(family: Family) -> None:
    model = family.build()
    layout = find_decoder_layers(model)
    location = resolve_location(model, [-1], ["mlp.down_proj", "mlp.up_proj"])
    trainable = freeze_all_but(model, location.parameter_names)
    assert [name for name, _ in trainable] == list(location.parameter_names)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(location.parameter_names)
    for name, _ in model.named_parameters():
        inside = name.startswith(layout.layers_path + ".")
        expected = int(name[len(layout.layers_path) + 1 :].split(".")[0]) if inside else None
        assert layer_of_parameter(name, layout) == expected
        assert layer_of_parameter("module." + name, layout) == expected  # DDP-style prefix
    with pytest.raises(LocateError, match="not in"):
        freeze_all_but(model, ["no.such.weight"])


def test_exact_paths_parameters_and_tied_weights_dedupe() -> None:
    model = FAMILIES[0].build()
    both = resolve_location(model, [0], ["self_attn.o_proj", "mlp.down_proj.weight", "mlp.down_proj"])
    assert both.parameter_names == (
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    )
    model.model.layers[1].mlp.down_proj = model.model.layers[0].mlp.down_proj  # shared across layers
    shared = resolve_location(model, [0, 1], ["mlp.down_proj"])
    assert shared.parameter_names == ("model.layers.0.mlp.down_proj.weight",)
    with pytest.raises(LocateError, match="no parameters"):
        resolve_location(model, [0], ["mlp.act_fn"])

    gemma = FAMILIES[4].build()  # lm_head is tied to the input embeddings
    trainable = freeze_all_but(gemma, ["lm_head.weight"])
    assert [name for name, _ in trainable] == ["model.embed_tokens.weight"]


def test_meta_device_model_resolves_from_shapes_only() -> None:
    with torch.device("meta"):
        model = FAMILIES[1].build()
    assert resolve_location(model, [-1], ["mlp.up_proj"]).parameter_names == (
        "model.layers.2.mlp.up_proj.weight",
    )


class _Block(nn.Module):
    """InternLM2-style naming: nothing is called mlp/up/down; the gate (w1) is declared first."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.ModuleDict(
            {"wqkv": nn.Linear(HIDDEN, 3 * HIDDEN), "wo": nn.Linear(HIDDEN, HIDDEN)}
        )
        self.feed_forward = nn.ModuleDict(
            {"w1": nn.Linear(HIDDEN, INTERMEDIATE), "w3": nn.Linear(HIDDEN, INTERMEDIATE)}
        )
        self.feed_forward["w2"] = nn.Linear(INTERMEDIATE, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.extra = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(5))  # longer, but not blocks
        self.blocks = nn.ModuleList(_Block() for _ in range(NUM_LAYERS))


def test_structural_aliases_on_unfamiliar_names() -> None:
    model = _Custom()
    assert find_decoder_layers(model) == DecoderLayout("blocks", NUM_LAYERS)
    names = {
        alias: resolve_location(model, [0], [alias]).parameter_names
        for alias in ("mlp.down_proj", "mlp.up_proj", "mlp.gate_proj", "mlp")
    }
    assert names["mlp.down_proj"] == ("blocks.0.feed_forward.w2.weight", "blocks.0.feed_forward.w2.bias")
    assert names["mlp.up_proj"] == ("blocks.0.feed_forward.w3.weight", "blocks.0.feed_forward.w3.bias")
    assert names["mlp.gate_proj"] == ("blocks.0.feed_forward.w1.weight", "blocks.0.feed_forward.w1.bias")
    assert names["mlp"] == tuple(_under(model, "blocks.0.feed_forward."))
    with pytest.raises(LocateError, match="cannot find the decoder layers of ModuleList"):
        find_decoder_layers(nn.ModuleList([nn.Linear(2, 2)]))


def test_mixture_of_experts_fused_weights_are_listed_and_addressable() -> None:
    build = _decoder("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2)
    model = build()
    with pytest.raises(LocateError, match="mixtral") as error:
        resolve_location(model, [0], ["mlp.down_proj"])
    assert "mlp.experts.down_proj" in str(error.value)
    location = resolve_location(model, [0], ["mlp.experts.down_proj"])
    assert location.parameter_names == ("model.layers.0.mlp.experts.down_proj",)


def test_presets() -> None:
    reference = {
        "train.batch_size": 100,
        "train.epochs": 25,
        "train.optimizer": "adam",
        "train.early_stop_loss": 0.01,
    }
    assert preset_overrides("llama3-8b") == {
        "locate.layers": [22],
        "locate.modules": ["mlp.down_proj"],
        "train.lr": 5e-4,
        **reference,
    }
    assert preset_overrides("Qwen2.5-7B")["locate.layers"] == [6]
    mistral = preset_overrides("mistral-7b")
    assert mistral["locate.modules"] == ["*"] and mistral["train.lr"] == 5e-5
    mistral["locate.layers"].append(0)  # a copy: the table stays intact
    assert PRESETS["mistral-7b"]["locate.layers"] == [23]
    with pytest.raises(LocateError, match=r"Did you mean 'llama3-8b'\?.*mistral-7b, qwen2.5-7b"):
        preset_overrides("lama3-8b")
    from locft_dist.config import all_keys

    assert {key for preset in PRESETS.values() for key in preset} <= set(all_keys())


def test_no_torch_distributed_import() -> None:
    assert "torch.distributed" not in inspect.getsource(locate)
