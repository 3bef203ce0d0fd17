"""Augmentation under FSDP2 (2 gloo ranks): every rank generates the same examples as one process does."""

import json

import torch

from locft_dist.edits import write_jsonl
from tests.test_distributed import delta, edit_args, run

AUGMENT = [
    "augment.paraphrases=1",
    "augment.paraphrase_tokens=4",
    "augment.locality_source=edits",
    "augment.locality_ratio=0.5",
    "augment.locality_loss=kl",
    "augment.locality_top_k=8",
    "eval.enabled=false",
]


def test_two_ranks_with_augmentation_equal_one_process(world_model, tmp_path):
    edits = tmp_path / "edits.jsonl"
    write_jsonl(world_model.world.make_edits(21, seed=3), edits)
    args = [*edit_args(world_model.model_dir, edits), *AUGMENT]
    run(1, tmp_path / "single", args)
    run(2, tmp_path / "double", args)
    cached = [json.loads((tmp_path / d / "augment.json").read_text()) for d in ("single", "double")]
    assert cached[0] == cached[1] and len(cached[0]["prefixes"]) == 21 and len(cached[0]["locality"]) == 10
    single, double = delta(tmp_path / "single"), delta(tmp_path / "double")
    for name, tensor in single.items():
        assert tensor.abs().max() > 1e-3
        torch.testing.assert_close(double[name], tensor, atol=1e-5, rtol=0)
