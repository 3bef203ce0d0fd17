"""Build (or reuse) the demo world: a synthetic world, its tokenizer and a tiny Llama that knows it.

Layout of ``out_dir`` written here (the demo runner adds its own files beside them)::

    base_model/   Hugging Face model directory + tokenizer (AutoModelForCausalLM / AutoTokenizer, offline)
    world.json    the world (``World.from_json``) plus a "demo" record: spec, seed, pretraining report

``world.json`` is written last and acts as the commit marker: a build is reused only when it exists, its
spec and seed match, and ``base_model/`` is complete. Outputs are staged in a temporary directory inside
``out_dir`` and moved into place with renames, so an interrupted build never looks valid.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from locft_dist.demo.pretrain import PretrainReport, pretrain
from locft_dist.demo.tokenizer import train_tokenizer
from locft_dist.demo.world import World, build_world

logger = logging.getLogger(__name__)

BUILD_VERSION = 1
"""Bump when world generation or pretraining changes, so older cached builds are rebuilt."""
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True, kw_only=True)
class DemoSpec:
    """Everything that determines a built world and model (besides the seed); part of the cache key."""

    name: str
    """Label for logs only."""
    num_subjects: int
    """Subjects in the world; each has one fact per relation (4 relations x 4 templates)."""
    vocab_size: int = 2048
    """Upper bound on the BPE vocabulary."""
    num_layers: int = 4
    """Decoder layers; four leave room to choose which layer an editor localizes to."""
    hidden_size: int = 128
    intermediate_size: int = 512
    """Width of the MLP, i.e. of ``mlp.down_proj``'s input, where edits usually go."""
    num_heads: int = 4
    batch_size: int = 64
    """Pretraining sentences per optimizer step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (warmup, then cosine to 10% over ``max_epochs``)."""
    max_epochs: int = 12
    """Upper bound on epochs; pretraining normally stops earlier, at ``target_accuracy``."""
    target_accuracy: float = 0.99
    """Stop once this fraction of facts is known under the edit template (template 0)."""


# Measured with torch.set_num_threads(2) on a 2-core machine shared with other jobs (seeds 0 and 1):
# QUICK pretrains in 42-54 s (6-7 epochs, 99.1-99.8% of template-0 facts known), FULL in ~84 s (7 epochs,
# 99.7%). QUICK leaves 100 subjects for locality probes after 300 edits on distinct subjects; FULL 100
# after 500.
QUICK = DemoSpec(name="quick", num_subjects=400, max_epochs=9)
FULL = DemoSpec(name="full", num_subjects=600, max_epochs=10)
# For tests: 8-12 s on 2 cores, >= 98% knowledge (seeds 0-2). Four layers so layer-selection tests have room.
TINY = DemoSpec(
    name="tiny",
    num_subjects=80,
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=256,
    batch_size=16,
    max_epochs=14,
    target_accuracy=0.98,
)


@dataclass
class DemoWorld:
    """A built demo world: where it lives, what it contains and what building it cost."""

    out_dir: Path
    model_dir: Path
    """``base_model/``: model + tokenizer, loadable with ``from_pretrained``."""
    world_path: Path
    world: World
    spec: DemoSpec
    seed: int
    report: PretrainReport
    seconds: float
    """Wall time of this call (building or reusing)."""
    reused: bool
    model: Any = field(default=None, repr=False)
    """The freshly trained model (eval mode); None when the build was reused (use ``load()``)."""

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer) from ``model_dir``, model in eval mode."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(self.model_dir, use_safetensors=True)
        return model.eval(), AutoTokenizer.from_pretrained(self.model_dir)


def _cache_key(spec: DemoSpec, seed: int) -> dict[str, Any]:
    return {"version": BUILD_VERSION, "spec": asdict(spec), "seed": seed}


def _try_reuse(out_dir: Path, spec: DemoSpec, seed: int, start: float) -> DemoWorld | None:
    """The existing build in ``out_dir`` if it is complete and was made with the same spec and seed."""
    world_path, model_dir = out_dir / "world.json", out_dir / "base_model"
    if not world_path.is_file() or not all((model_dir / f).is_file() for f in MODEL_FILES):
        return None
    try:
        data = json.loads(world_path.read_text("utf-8"))
        demo = data["demo"]
        if {k: demo.get(k) for k in ("version", "spec", "seed")} != _cache_key(spec, seed):
            logger.info("existing demo world in %s has another spec or seed: rebuilding", out_dir)
            return None
        world, report = World.from_json(data), PretrainReport(**demo["report"])
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring unreadable %s (%s): rebuilding", world_path, error)
        return None
    logger.info("reusing the %s demo world in %s (seed %d)", spec.name, out_dir, seed)
    return DemoWorld(
        out_dir=out_dir,
        model_dir=model_dir,
        world_path=world_path,
        world=world,
        spec=spec,
        seed=seed,
        report=report,
        seconds=time.perf_counter() - start,
        reused=True,
    )


def build_from_spec(
    out_dir: str | Path, spec: DemoSpec, *, seed: int = 0, progress: bool = True
) -> DemoWorld:
    """Build the world for ``spec`` into ``out_dir``, or reuse a matching earlier build."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reused = _try_reuse(out_dir, spec, seed, start)
    if reused is not None:
        return reused

    logger.info(
        "building the %s demo world (%d subjects, seed %d) in %s", spec.name, spec.num_subjects, seed, out_dir
    )
    world = build_world(num_subjects=spec.num_subjects, seed=seed)
    tokenizer = train_tokenizer(world.pretraining_corpus(), vocab_size=spec.vocab_size)
    model, report = pretrain(
        world,
        tokenizer,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_heads=spec.num_heads,
        seed=seed,
        max_epochs=spec.max_epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        target_accuracy=spec.target_accuracy,
        progress=progress,
    )
    if not report.reached_target:
        logger.warning(
            "the %s base model knows only %.1f%% of the facts (target %.1f%%)",
            spec.name,
            100 * report.knowledge_template0,
            100 * spec.target_accuracy,
        )

    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    try:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging / "base_model", safe_serialization=True)
        tokenizer.save_pretrained(staging / "base_model")
        record = world.to_json() | {"demo": _cache_key(spec, seed) | {"report": asdict(report)}}
        (staging / "world.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", "utf-8")
        # world.json goes first (un-commit), base_model is swapped, world.json comes back last (commit).
        (out_dir / "world.json").unlink(missing_ok=True)
        if (out_dir / "base_model").exists():
            os.replace(out_dir / "base_model", staging / "old_base_model")
        os.replace(staging / "base_model", out_dir / "base_model")
        os.replace(staging / "world.json", out_dir / "world.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    seconds = time.perf_counter() - start
    logger.info("built the %s demo world in %.1fs", spec.name, seconds)
    return DemoWorld(
        out_dir=out_dir,
        model_dir=out_dir / "base_model",
        world_path=out_dir / "world.json",
        world=world,
        spec=spec,
        seed=seed,
        report=report,
        seconds=seconds,
        reused=False,
        model=model.eval(),
    )


def build_demo_world(out_dir: str | Path, *, quick: bool, seed: int = 0, progress: bool = True) -> DemoWorld:
    """The world `locft demo` edits: QUICK (``--quick``) or FULL, cached in ``out_dir``."""
    return build_from_spec(out_dir, QUICK if quick else FULL, seed=seed, progress=progress)


def build_tiny_world_model(out_dir: str | Path, seed: int = 0, *, progress: bool = False) -> DemoWorld:
    """A small world (80 subjects) and a 4-layer, 64-wide Llama that knows >= 98% of it; for tests."""
    return build_from_spec(out_dir, TINY, seed=seed, progress=progress)


def main() -> None:
    """``python -m locft_dist.demo.build [--quick|--tiny] OUT``: build a world without editing it."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--tiny", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = TINY if args.tiny else QUICK if args.quick else FULL
    demo = build_from_spec(args.out, spec, seed=args.seed)
    r = demo.report
    print(
        f"{spec.name}: {len(demo.world.facts)} facts, {r.num_parameters / 1e6:.2f}M parameters, "
        f"{r.epochs} epochs in {r.seconds:.1f}s; knowledge {r.knowledge_template0:.4f} (template 0), "
        f"{r.knowledge_all_templates:.4f} (all templates); total {demo.seconds:.1f}s, reused={demo.reused}"
    )


if __name__ == "__main__":
    main()
