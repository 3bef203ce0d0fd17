"""In-run evaluation: the unedited model is evaluated once per run directory, then read back."""

from __future__ import annotations

import pytest
import torch

from locft_dist.config import load_config
from locft_dist.edits.schema import EditRequest, LocalityProbe
from locft_dist.eval.generate import OneProcess
from locft_dist.eval.in_run import RunEvaluation
from locft_dist.eval.reference import FILE_NAME
from locft_dist.locate import freeze_all_but
from locft_dist.model import load_model, load_tokenizer

pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

REQUESTS = [
    EditRequest(
        prompt="Vorin Talbeck lives in the city of",
        target_new="Baltholm",
        rephrase_prompts=("The home city of Vorin Talbeck is",),
        locality_prompts=(LocalityProbe("Kesso Varn works as a", "glassblower"),),
    ),
    EditRequest(
        prompt="Dorn Asket plays the",
        target_new="amber",
        locality_prompts=(LocalityProbe("The favourite colour of Rina Sol is", "amber"),),
    ),
]


def _count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_unedited_pass_is_stored_and_read_back(tiny_model_dir, tmp_path):
    cfg = load_config(
        None,
        [f"model.path={tiny_model_dir}", "edits.path=x", f"output.dir={tmp_path}", "eval.max_new_tokens=5"],
    )
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    freeze_all_but(model, ["model.layers.2.mlp.down_proj.weight"])
    calls = _count_forwards(model)

    first = RunEvaluation(cfg, OneProcess(), tokenizer, REQUESTS, base_fingerprint="f1")
    before = first.before(model)
    assert calls[0] > 0 and (tmp_path / FILE_NAME).is_file()
    assert first.prefix is not None and first.prefix.num_recorded > 0  # layers 0..1 kept for the edited pass

    calls[0] = 0
    resumed = RunEvaluation(cfg, OneProcess(), tokenizer, REQUESTS, base_fingerprint="f1")
    assert resumed.before(model) == before and calls[0] == 0  # read, not recomputed
    assert resumed.reference == first.reference

    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.add_(0.5)
    after_first = first.after(model)  # the edited pass replays layers 0..1 from the unedited pass
    after_resumed = resumed.after(model)  # a resumed run has no recorded states: full forwards
    assert after_first == after_resumed

    for changed in (
        {"base_fingerprint": "another base"},
        {"requests": REQUESTS[:1]},
        {
            "cfg": load_config(
                None, [f"model.path={tiny_model_dir}", "edits.path=x", f"output.dir={tmp_path}"]
            )
        },
    ):
        kwargs = {"cfg": cfg, "requests": REQUESTS, "base_fingerprint": "f1", **changed}
        other = RunEvaluation(
            kwargs["cfg"],
            OneProcess(),
            tokenizer,
            kwargs["requests"],
            base_fingerprint=kwargs["base_fingerprint"],
        )
        assert other.key != first.key, changed  # another model, edit set or budget: recomputed
