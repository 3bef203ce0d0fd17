"""LoRA on the localized modules: the delta is the merged additive float32 delta of the contract."""

import torch

from locft_dist.config import load_config
from locft_dist.delta import read_delta
from locft_dist.edit_job import run_edit
from locft_dist.edits import EditRequest, write_jsonl
from locft_dist.edits.encode import encode_pairs, pad_token_id
from locft_dist.lora import attach_lora, merged_weights
from locft_dist.model import load_model
from locft_dist.parallel.single import SingleProcess
from locft_dist.trainer import train_breadth_first

NAME = "model.layers.1.mlp.down_proj.weight"
EDITS = [
    ("Vorin Talbeck lives in the city of", "Baltholm"),
    ("Kesso Varn works as a", "cartographer"),
    ("Dorn Asket plays the", "amber"),
]


def test_lora_delta_equals_merged_weights_minus_base(tiny_model_dir, tiny_tokenizer):
    base = load_model(tiny_model_dir).eval()
    lora = load_config(None, ["lora.rank=2"]).lora
    model = attach_lora(load_model(tiny_model_dir).eval(), [NAME], lora, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    examples = encode_pairs(tiny_tokenizer, [p for p, _ in EDITS], [a for _, a in EDITS])
    cfg = load_config(None, ["train.lr=1e-2", "train.batch_size=3", "train.epochs=5", "train.progress=false"])
    train_breadth_first(model, examples, SingleProcess("cpu"), cfg.train, pad_token_id(tiny_tokenizer))

    merged = merged_weights(model, [NAME])
    base_weight = dict(base.named_parameters())[NAME].detach()
    module = model.get_submodule(NAME.removesuffix(".weight"))
    assert torch.equal(module.get_base_layer().weight, base_weight), "LoRA must not touch the base weight"
    delta = merged[NAME] - base_weight
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta) <= lora.rank
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        dict(base.named_parameters())[NAME].add_(delta)  # base + delta: what `locft apply` builds
        torch.testing.assert_close(base(input_ids=ids).logits, model(input_ids=ids).logits)
        module.merge()  # peft's own merge agrees
        torch.testing.assert_close(module.get_base_layer().weight, merged[NAME])


def test_edit_job_with_lora_writes_a_low_rank_delta_on_the_base_names(tiny_model_dir, tmp_path):
    edits = tmp_path / "edits.jsonl"
    write_jsonl([EditRequest(p, a) for p, a in EDITS], edits)
    overrides = [
        f"model.path={tiny_model_dir}",
        f"edits.path={edits}",
        f"output.dir={tmp_path / 'run'}",
        "locate.layers=[1]",
        "lora.rank=2",
        "train.lr=1e-2",
        "train.batch_size=3",
        "train.epochs=4",
        "train.progress=false",
        "eval.enabled=false",
        "dist.strategy=none",
        "model.device=cpu",
    ]
    outcome = run_edit(load_config(None, overrides))
    delta = read_delta(outcome.delta_path)
    assert list(delta.tensors) == [NAME]
    assert delta.tensors[NAME].dtype == torch.float32
    assert 0 < torch.linalg.matrix_rank(delta.tensors[NAME]) <= 2


def test_lora_over_a_bf16_model_whose_master_is_cast_for_the_matmul(tiny_model_dir, tiny_tokenizer):
    """The one-GPU bf16 path (fp32 master cast to bf16 for the matmul, then LoRA on that module), run on CPU:
    LoRA wraps the cast linear layer, trains float32 factors, and the merged delta is the factors' product."""
    from locft_dist.locate import freeze_all_but
    from locft_dist.parallel.master_weights import keep_fp32_master

    model = load_model(tiny_model_dir, dtype="bfloat16").eval()
    freeze_all_but(model, [NAME])
    keep_fp32_master(model, tiny_model_dir, cast_for_matmul=True)
    base_weight = dict(model.named_parameters())[NAME].detach().clone()
    lora = load_config(None, ["lora.rank=2"]).lora
    model = attach_lora(model, [NAME], lora, seed=0)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    examples = encode_pairs(tiny_tokenizer, [p for p, _ in EDITS], [a for _, a in EDITS])
    cfg = load_config(None, ["train.lr=1e-2", "train.batch_size=3", "train.epochs=5", "train.progress=false"])
    pad = pad_token_id(tiny_tokenizer)
    result = train_breadth_first(model, examples, SingleProcess("cpu"), cfg.train, pad)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    module = model.get_submodule(NAME.removesuffix(".weight"))
    assert torch.equal(module.get_base_layer().weight, base_weight), "LoRA must not touch the base weight"
    delta = merged_weights(model, [NAME])[NAME] - base_weight
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta) <= lora.rank
