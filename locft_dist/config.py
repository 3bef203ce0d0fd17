"""One tree of dataclasses for a run: YAML file + dotted overrides, validated with messages that name the key.

``locft edit --config run.yaml train.lr=1e-4 locate.layers=[-1]``: override values are parsed as YAML.
An unknown key is an error that suggests the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from locft_dist.errors import ConfigError


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """Hugging Face model directory (local; nothing is downloaded)."""
    dtype: str = "float32"
    """Weights dtype: float32 | bfloat16 | float16. The delta is always written in float32."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust the directory."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (single process; distributed strategies pick the local rank's device)."""


@dataclass(kw_only=True)
class EditsConfig:
    path: str = ""
    """Edit file: canonical JSONL, ZsRE, CounterFact (EasyEdit) or WikiBigEdit (LocFT) JSON/JSONL."""
    format: str = "auto"
    """auto | zsre | counterfact | wikibigedit | jsonl."""
    limit: int | None = None
    """Keep only the first N valid edits."""
    skip_invalid: bool = False
    """Skip and count invalid records instead of failing on the first one."""
    max_length: int = 256
    """Maximum prompt+target tokens; prompts are cut from the left; a target that does not fit is an error."""
    target_prefix: str = " "
    """Prepended to every answer unless the prompt ends with it ("" to disable); plain completion only."""
    append_eos: bool = True
    """End every training target with the stop token (EOS; in chat, the template's end-of-turn token)."""
    chat_template: str = "none"
    """none (plain completion) | auto (the tokenizer's chat template: prompt = user turn, target = the
    assistant's reply, no leading space); an error for a tokenizer without a chat template."""
    token_cache: bool = True
    """Keep the tokenized edits in a memory-mapped file keyed by the file's sha256, tokenizer and settings."""
    token_cache_dir: str | None = None
    """Token cache directory; null: $XDG_CACHE_HOME/locft-dist/tokens (default ~/.cache/locft-dist/tokens)."""


@dataclass(kw_only=True)
class LocateConfig:
    preset: str | None = None
    """Settings by name: the authors' (llama3-8b, qwen2.5-7b, mistral-7b), smollm2-135m (needs
    augment.locality_path) and smollm2-135m-subjects (needs locate.common_text_path or
    augment.locality_path, and augment.wordings_path); explicit keys override a preset."""
    layers: list[int] = field(default_factory=lambda: [-1])
    """Decoder layer indices to tune; negative counts from the end."""
    modules: list[str] = field(default_factory=lambda: ["mlp.down_proj"])
    """Modules per chosen layer: mlp.down_proj, mlp.up_proj, mlp.gate_proj, mlp, * (whole layer), a path."""
    subject_embeddings: bool = False
    """Tune the input-embedding rows of the edited subjects' tokens instead of layers x modules: prompts
    without those tokens compute exactly as before (one process; edits need a "subject"; a tied output
    layer is untied and keeps the base weight)."""
    common_token_share: float = 0.001
    """subject_embeddings: a token in more than this share of the common-text prompts is not tuned."""
    common_text_path: str | None = None
    """subject_embeddings: prompts of unrelated text that tell common tokens from a subject's own (JSONL
    with a "prompt" field, or plain text); default augment.locality_path."""
    common_generated_tokens: int = 0
    """subject_embeddings: count as common text also the unedited model's greedy continuation of each
    common-text prompt, this many tokens (0: prompts only); catches tokens it writes often (digits)."""
    tune_sequence_start: bool = True
    """subject_embeddings: tune a subject token that opens the model's input (a prompt starting with the
    subject, no BOS or chat turn before it) even where the subject has another uncommon token. false:
    leave that first position, where attention sinks, alone then (docs/editing_quality.md)."""


@dataclass(kw_only=True)
class TrainConfig:
    pipeline: str = "breadth_first"
    """breadth_first (epochs over the whole shuffled set) | depth_first (one edit at a time, FT-M)."""
    epochs: int = 25
    """Passes over the whole edit set (breadth_first)."""
    batch_size: int = 100
    """Global batch: edits per optimizer step, summed over ranks and accumulation."""
    micro_batch_size: int | None = None
    """Edits per forward/backward on one rank; the rest is gradient accumulation. Default: rank's share."""
    micro_batch_tokens: int | None = 4096
    """Padded tokens (edits x longest) per forward/backward on one rank, cut from the length-sorted share."""
    micro_batch_pass_cost: int | None = None
    """Fixed cost of one forward/backward, in padded tokens: a rank's share is cut into the length buckets
    that minimize passes x this + padded tokens. Default by device: 64 on CPU, 4096 on GPU."""
    lr: float = 5e-4
    """Peak learning rate."""
    optimizer: str = "adam"
    """adam | adamw."""
    weight_decay: float = 0.0
    """Decoupled for adamw, L2 for adam."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    adam_eps: float = 1e-8
    """Adam/AdamW epsilon, added to the root of the second moment (torch's default)."""
    lr_schedule: str = "constant"
    """constant | linear | cosine (decay to 0 over the run after warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm of the trainable parameters; null disables."""
    skip_loss_below: float | None = None
    """Skip the optimizer step when a batch's loss is already below this (LocFT's loop uses 0.01)."""
    early_stop_loss: float | None = 0.01
    """Stop when an epoch's mean loss falls below this; null disables."""
    focus_epochs: int = 0
    """breadth_first: after the epochs, up to this many more over only the examples whose loss is still
    above focus_loss (measured at each focus epoch's start; at train.lr): edits a low mean hides."""
    focus_loss: float = 0.1
    """focus_epochs: an example whose loss is above this is trained again."""
    seed: int = 0
    """Seed for the per-epoch shuffle and anything random in training."""
    depth_first_max_steps: int = 25
    """depth_first: optimizer steps per edit at most."""
    depth_first_stop_loss: float = 0.01
    """depth_first: move on to the next edit once its loss is below this."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    prefix_cache: bool = True
    """Run the frozen layers below the first trainable one once per edit and cache their output (exact)."""
    prefix_cache_device_gib: float | None = None
    """Per-rank GPU memory for the prefix cache; the rest goes to pinned host memory. null: half the device
    memory free when the cache is filled."""
    prefix_cache_offload_prefix: bool = False
    """Single process: free the frozen layers below the cache (and the embedding) during training; reloaded
    from the model's safetensors afterwards. FSDP/DeepSpeed: ignored (ranks hold shards of them)."""
    prefix_cache_host_gib: float | None = 0.25
    """Per-rank host memory for prefix-cache rows (all rows on CPU; the overflow of the device budget on GPU);
    rows beyond it go to a spill file read back with plain reads. null: no limit."""
    prefix_cache_spill_dir: str | None = None
    """Directory of the (unlinked, per-run) prefix-cache spill file; null: the system temp dir."""
    compile: bool = False
    """torch.compile the decoder layers training runs (the first trainable one and above), one compile for
    all: fuses each block's elementwise work (norms, rotary, SwiGLU). A one-time compile of tens of seconds,
    repaid on long GPU runs (docs/performance.md). One process (dist.strategy none) only."""
    fused_norm: bool | None = None
    """Run Llama-family RMSNorms (Llama, Mistral, Qwen2/3, Phi-3) as one fused kernel each during training,
    same formula (docs/performance.md: 7% of an 8B step on a GPU). null: on a GPU, off on CPU."""


@dataclass(kw_only=True)
class AugmentConfig:
    paraphrases: int = 0
    """Pseudo-paraphrases per edit: prefixes the unedited model samples, put before the prompt (0: off)."""
    paraphrase_tokens: int = 8
    """Length of each sampled prefix, in tokens."""
    paraphrase_seed: int = 0
    """Seed of the prefix sampling (same seed, same model: same prefixes)."""
    locality_source: str = "none"
    """none | file (augment.locality_path) | edits (the edit file's locality prompts: then not held out)."""
    locality_path: str | None = None
    """Prompts of unedited facts to keep: JSONL with a "prompt" field, or plain text, one per line."""
    locality_ratio: float = 1.0
    """Locality examples per edit, drawn by train.seed from the source (repeated when it has too few)."""
    locality_loss: str = "ce"
    """ce (cross-entropy on the unedited model's greedy tokens) | kl (KL to its top-k distribution)."""
    locality_tokens: int = 4
    """Tokens of the unedited model's continuation kept per locality prompt."""
    locality_top_k: int = 32
    """kl: tokens of the unedited distribution stored per position (renormalized over them)."""
    locality_weight: float = 1.0
    """Loss weight of a locality example relative to an edit."""
    batch_size: int = 64
    """Rows per generation forward; the batches are spread over the ranks and the results gathered."""
    wordings: int = 0
    """Other wordings of each edit's relation trained beside its prompt (0: off): the wordings that
    augment.wordings_path's records pair most often with the edit's, its own rephrase probes' excluded."""
    wordings_path: str | None = None
    """Records (any edit-file format) whose prompts and rephrasings teach which wordings a relation has."""
    wordings_min_count: int = 2
    """A wording is another's only when at least this many records pair them."""


@dataclass(kw_only=True)
class LoraConfig:
    rank: int = 0
    """LoRA rank on the localized modules (through peft; single process); 0 tunes their full weights."""
    alpha: float = 16.0
    """LoRA scale numerator: the update is alpha / rank * B @ A. The delta file holds it merged."""


@dataclass(kw_only=True)
class DistConfig:
    strategy: str = "auto"
    """auto | none | fsdp | deepspeed. auto: none for one process."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON config (deepspeed strategy)."""
    param_dtype: str | None = None
    """fsdp compute dtype (bfloat16 keeps fp32 master weights sharded, reduces in fp32); null: model.dtype."""
    timeout_minutes: float = 30.0
    """Collective timeout: if a rank dies mid-step, the others fail after this long instead of hanging."""


@dataclass(kw_only=True)
class EvalConfig:
    enabled: bool = True
    """Evaluate before and after editing and write metrics.json."""
    batch_size: int = 256
    """Probes per batch (one forward, then greedy decoding with the batch's KV cache)."""
    generation: bool = True
    """Also compute the generation metrics (_em and _wild: docs/metrics.md); slower than teacher forcing."""
    max_new_tokens: int = 40
    """WILD: greedy tokens generated per probe at most (cut at the first ".", newline or EOS)."""
    prefix_reuse_gib: float | None = None
    """Host memory for the unedited pass's states below the edited layer, reused after editing (0: off;
    null: a quarter of the host memory available when the pass starts, shared by this node's ranks)."""
    limit: int | None = None
    """Evaluate only the first N edits (all by default)."""
    heldout_path: str | None = None
    """Text file (one passage per line) or JSONL with a "text" field, for perplexity."""


@dataclass(kw_only=True)
class ContinualConfig:
    previous: str | None = None
    """Run directory of the previous wave: start from its delta, replay its edits; the new delta is
    cumulative against the base (docs/continual.md). null: a first wave (or a plain run)."""
    replay_ratio: str = "1"
    """Earlier edits replayed per new edit per epoch, drawn by train.seed and the epoch; all: every one."""
    eval_limit: int | None = None
    """Evaluate at most N edits of all waves so far (a seeded sample; null: all of them)."""
    keep_facts: bool = True
    """Write facts.jsonl (the run's current edits, each with its wave) so that a later wave can follow it."""
    epochs: int | None = None
    """A continued wave (previous set) trains this many epochs instead of train.epochs (null: the same)."""
    locality_ratio: float | None = None
    """A continued wave's augment.locality_ratio (null: the same); it trains replayed edits too, so it needs
    more locality examples per new edit than a first wave (docs/continual.md: the continued-wave recipe)."""
    locality_weight: float | None = None
    """A continued wave's augment.locality_weight (null: the same)."""


@dataclass(kw_only=True)
class OutputConfig:
    dir: str = "runs/locft"
    """Run directory: config.yaml, run.json, delta.safetensors, metrics.json, log.jsonl, checkpoints/."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: at the end of an epoch, see below)."""
    checkpoint_min_minutes: float = 10.0
    """With checkpoint_every=0: save at an epoch's end only when the last save (or the start) is at least
    this old (0: every epoch). The last step and preemption always save."""
    keep_last: int = 2
    """Checkpoints to keep."""
    overwrite: bool = False
    """Replace a run directory that holds another run (deleting its checkpoints). The same run is continued
    either way (resume is exact), so a requeued command with overwrite=true resumes."""


@dataclass(kw_only=True)
class LoggingConfig:
    wandb_project: str | None = None
    """Weights & Biases project; null: no wandb (log.jsonl is always written). Needs the wandb extra."""
    wandb_entity: str | None = None
    """wandb team or user; null: your default entity."""
    wandb_run_name: str | None = None
    """Display name of the wandb run; null: the run directory's name."""
    wandb_run_id: str | None = None
    """Fixed wandb run id, so a requeued job continues the same wandb run; null: a new id."""
    wandb_mode: str = "auto"
    """auto (online with an API key, else offline; WANDB_MODE wins) | online | offline | disabled."""
    wandb_log_delta: bool = True
    """Upload delta.safetensors as a wandb artifact at the end of the run."""


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    edits: EditsConfig = field(default_factory=EditsConfig)
    locate: LocateConfig = field(default_factory=LocateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "edits.format": ("auto", "zsre", "counterfact", "wikibigedit", "jsonl"),
    "edits.chat_template": ("none", "auto"),
    "train.pipeline": ("breadth_first", "depth_first"),
    "train.optimizer": ("adam", "adamw"),
    "train.lr_schedule": ("constant", "linear", "cosine"),
    "dist.strategy": ("auto", "none", "fsdp", "deepspeed"),
    "augment.locality_source": ("none", "file", "edits"),
    "augment.locality_loss": ("ce", "kl"),
    "dist.param_dtype": (None, "float32", "bfloat16", "float16"),
    "logging.wandb_mode": ("auto", "online", "offline", "disabled"),
}


def all_keys(section: Any = None, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted leaf key of the config tree with its dataclass field."""
    cls = RunConfig if section is None else section
    keys: dict[str, dataclasses.Field] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys.update(all_keys(hint, name + "."))
        else:
            keys[name] = f
    return keys


def _unknown_key(key: str, source: str) -> ConfigError:
    known = list(all_keys())
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Check ``value`` against the field's type, converting the lossless cases (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], source)
    if origin is list:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(f"{key}[{i}]", v, args[0], source) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    return value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and name not in all_keys():
            flat.update(_flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``locate.layers=[-1]``, ``train.lr=5e-4``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.lr=5e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML: {err}") from None
    return key, value  # YAML 1.1 reads 5e-4 as a string: _coerce accepts it where a number is wanted


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a validated ``RunConfig`` from an optional YAML file and dotted overrides (later wins)."""
    values: dict[str, tuple[Any, str]] = {}
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config: {err.strerror}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: invalid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections (model:, edits:, ...)")
        for key, value in _flatten(tree).items():
            values[key] = (value, source)
    for text in overrides:
        key, value = parse_override(text)
        values[key] = (value, f"override '{text}'")
    return build_config(values)


def build_config(values: dict[str, tuple[Any, str]]) -> RunConfig:
    """Apply (value, source) per dotted key onto the defaults, then a preset underneath, then validate."""
    keys = all_keys()
    for key, (_, source) in values.items():
        if key not in keys:
            raise _unknown_key(key, source)
    preset_value = values.get("locate.preset", (None, ""))[0]
    merged: dict[str, tuple[Any, str]] = {}
    if preset_value:
        from locft_dist.locate import preset_overrides

        for key, value in preset_overrides(str(preset_value)).items():
            merged[key] = (value, f"preset '{preset_value}'")
    merged.update(values)
    if (
        merged.get("augment.locality_source", ("none", ""))[0] == "file"
        and merged["augment.locality_source"][1].startswith("preset")
        and not merged.get("augment.locality_path", (None, ""))[0]
    ):
        raise ConfigError(
            f"preset '{preset_value}' trains with locality supervision: set 'augment.locality_path' to a "
            "file of random unedited facts (other records' prompts, never the evaluated probes; see "
            "docs/editing_quality.md), or 'augment.locality_source=none' to train without it"
        )
    config = RunConfig()
    hints_cache: dict[type, dict[str, Any]] = {}
    for key, (value, source) in merged.items():
        section_name, leaf = key.split(".", 1)
        section = getattr(config, section_name)
        hints = hints_cache.setdefault(type(section), typing.get_type_hints(type(section)))
        setattr(section, leaf, _coerce(key, value, hints[leaf], source))
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Range and choice checks; each message names the key."""
    for key, choices in _CHOICES.items():
        section, leaf = key.split(".")
        value = getattr(getattr(config, section), leaf)
        if value not in choices:
            raise ConfigError(f"'{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
    positive = {
        "train.epochs": config.train.epochs,
        "train.batch_size": config.train.batch_size,
        "edits.max_length": config.edits.max_length,
        "eval.batch_size": config.eval.batch_size,
        "eval.max_new_tokens": config.eval.max_new_tokens,
        "train.depth_first_max_steps": config.train.depth_first_max_steps,
        "output.keep_last": config.output.keep_last,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be positive; got {value}")
    if config.train.lr <= 0:
        raise ConfigError(f"'train.lr' must be positive; got {config.train.lr}")
    if config.train.adam_eps <= 0:
        raise ConfigError(f"'train.adam_eps' must be positive; got {config.train.adam_eps}")
    if config.train.focus_epochs < 0:
        raise ConfigError(f"'train.focus_epochs' must be >= 0; got {config.train.focus_epochs}")
    if config.train.focus_loss <= 0:
        raise ConfigError(f"'train.focus_loss' must be positive; got {config.train.focus_loss}")
    if config.train.focus_epochs and config.train.pipeline != "breadth_first":
        raise ConfigError(
            "'train.focus_epochs' follows the breadth-first epochs: use train.pipeline=breadth_first"
        )
    for key in ("prefix_cache_device_gib", "prefix_cache_host_gib"):
        cache_gib = getattr(config.train, key)
        if cache_gib is not None and cache_gib < 0:
            raise ConfigError(f"'train.{key}' must be >= 0 or null; got {cache_gib}")
    for key in ("micro_batch_size", "micro_batch_tokens", "micro_batch_pass_cost"):
        value = getattr(config.train, key)
        if value is not None and value <= 0:
            raise ConfigError(f"'train.{key}' must be positive; got {value}")
    if config.train.compile and config.dist.strategy in ("fsdp", "deepspeed"):
        raise ConfigError(f"'train.compile' runs in one process; dist.strategy is {config.dist.strategy}")
    if len(config.train.betas) != 2 or not all(0 <= b < 1 for b in config.train.betas):
        raise ConfigError(f"'train.betas' must be two numbers in [0, 1); got {config.train.betas}")
    if config.eval.prefix_reuse_gib is not None and config.eval.prefix_reuse_gib < 0:
        raise ConfigError(f"'eval.prefix_reuse_gib' must be >= 0 or null; got {config.eval.prefix_reuse_gib}")
    replay_ratio(config.continual.replay_ratio)  # raises naming the key
    for key, value in (
        ("edits.limit", config.edits.limit),
        ("eval.limit", config.eval.limit),
        ("continual.eval_limit", config.continual.eval_limit),
        ("continual.epochs", config.continual.epochs),
    ):
        if value is not None and value <= 0:
            raise ConfigError(f"'{key}' must be positive or null; got {value}")
    for key in ("locality_ratio", "locality_weight"):
        value = getattr(config.continual, key)
        if value is not None and value < 0:
            raise ConfigError(f"'continual.{key}' must be >= 0 or null; got {value}")
    if config.output.checkpoint_min_minutes < 0:
        raise ConfigError(
            f"'output.checkpoint_min_minutes' must be >= 0; got {config.output.checkpoint_min_minutes}"
        )
    if config.output.checkpoint_every < 0:
        raise ConfigError(f"'output.checkpoint_every' must be >= 0; got {config.output.checkpoint_every}")
    aug = config.augment
    for key, value in (
        ("augment.paraphrases", aug.paraphrases),
        ("augment.wordings", aug.wordings),
        ("augment.locality_ratio", aug.locality_ratio),
        ("augment.locality_weight", aug.locality_weight),
    ):
        if value < 0:
            raise ConfigError(f"'{key}' must be >= 0; got {value}")
    for key, value in (
        ("augment.paraphrase_tokens", aug.paraphrase_tokens),
        ("augment.locality_tokens", aug.locality_tokens),
        ("augment.locality_top_k", aug.locality_top_k),
        ("augment.batch_size", aug.batch_size),
        ("augment.wordings_min_count", aug.wordings_min_count),
    ):
        if value <= 0:
            raise ConfigError(f"'{key}' must be positive; got {value}")
    if config.lora.rank < 0 or config.lora.alpha <= 0:
        raise ConfigError(f"'lora.rank' must be >= 0 and 'lora.alpha' positive; got {config.lora}")
    if aug.locality_source == "file" and not aug.locality_path:
        raise ConfigError("'augment.locality_source' is file but 'augment.locality_path' is not set")
    if aug.wordings and not aug.wordings_path:
        raise ConfigError(
            "'augment.wordings' needs records to learn a relation's wordings from: set "
            "'augment.wordings_path' (an edit file whose records have a subject and rephrasings, e.g. "
            "CounterFact's)"
        )
    _validate_subject_embeddings(config)
    if not config.locate.layers:
        raise ConfigError("'locate.layers' must name at least one layer")
    if not config.locate.modules:
        raise ConfigError("'locate.modules' must name at least one module")


def _validate_subject_embeddings(config: RunConfig) -> None:
    """``locate.subject_embeddings`` trains one masked tensor in one process, breadth-first."""
    locate = config.locate
    if locate.common_generated_tokens < 0:
        raise ConfigError(
            f"'locate.common_generated_tokens' must be >= 0; got {locate.common_generated_tokens}"
        )
    if not locate.subject_embeddings:
        return
    if not 0 <= locate.common_token_share <= 1:
        raise ConfigError(f"'locate.common_token_share' must be in [0, 1]; got {locate.common_token_share}")
    if not (locate.common_text_path or config.augment.locality_path):
        raise ConfigError(
            "'locate.subject_embeddings' needs prompts of unrelated text to tell common tokens from a "
            "subject's own: set 'locate.common_text_path' (or 'augment.locality_path')"
        )
    refused = {
        "dist.strategy": config.dist.strategy in ("fsdp", "deepspeed"),
        "lora.rank": config.lora.rank > 0,
        "train.pipeline": config.train.pipeline != "breadth_first",
        "train.weight_decay": config.train.weight_decay != 0,  # would move the rows it must keep
        "continual.previous": bool(config.continual.previous),
    }
    for key, bad in refused.items():
        if bad:
            value = _flatten(config.to_dict())[key]
            raise ConfigError(
                f"'locate.subject_embeddings' runs one process, breadth-first, without LoRA, weight decay "
                f"or continual waves; got {key}={value!r}"
            )


def replay_ratio(value: str) -> float | None:
    """``continual.replay_ratio`` as a number >= 0, or None for ``all``."""
    if str(value).strip().lower() == "all":
        return None
    try:
        ratio = float(value)
    except ValueError:
        ratio = -1.0
    if not ratio >= 0 or ratio == float("inf"):
        raise ConfigError(f"'continual.replay_ratio' must be a number >= 0 or all; got {value!r}")
    return ratio


def describe_keys() -> str:
    """One line per key with its default and docstring (``locft edit --help-config``)."""
    lines = []
    docs = _field_docs()
    defaults = _flatten(RunConfig().to_dict())
    for key in all_keys():
        lines.append(f"{key} = {defaults.get(key)!r}\n    {docs.get(key, '')}")
    return "\n".join(lines)


def _field_docs() -> dict[str, str]:
    """Field docstrings (the string literal after each field) read from this module's source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(__import__(__name__, fromlist=["x"])))
    section_of = {
        f.type if isinstance(f.type, str) else f.type.__name__: f.name for f in dataclasses.fields(RunConfig)
    }
    docs: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in section_of:
            body = node.body
            for i, stmt in enumerate(body[:-1]):
                nxt = body[i + 1]
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    docs[f"{section_of[node.name]}.{stmt.target.id}"] = nxt.value.value
    return docs
