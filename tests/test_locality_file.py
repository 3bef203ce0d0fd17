"""studies/locality_file.py: other records' prompts, never an edited subject's or an evaluated probe."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("locality_file", ROOT / "studies" / "locality_file.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(subject: str, prompt: str, rephrase: str, probe: str) -> dict:
    return {
        "prompt": prompt,
        "target_new": "Paris",
        "subject": subject,
        "rephrase_prompts": [rephrase],
        "locality_prompts": [{"prompt": probe, "answer": "Rome"}],
    }


def test_pool_excludes_edited_subjects_and_probes(tmp_path):
    edits = [_record("Alpha Corp", "Alpha Corp is based in", "Alpha Corp's home is", "Beta Ltd is based in")]
    pool = [
        _record("Alpha Corp", "Alpha Corp was founded in", "x1", "y1"),  # edited subject
        _record("Beta Ltd", "Beta Ltd is based in", "x2", "y2"),  # the evaluated locality probe
        _record("Gamma", "The sister of Alpha Corp is", "x3", "y3"),  # names an edited subject
        _record("Delta", "Delta plays the", "x4", "y4"),
        _record("Eps", "Eps speaks", "x5", "y5"),
    ]
    for name, rows in (("edits.jsonl", edits), ("pool.jsonl", pool)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "locality.jsonl"
    pool_path, edits_path = tmp_path / "pool.jsonl", tmp_path / "edits.jsonl"
    args = ["--pool", str(pool_path), "--edits", str(edits_path), "--out", str(out)]
    assert _module().main(args) == 0
    prompts = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
    assert sorted(prompts) == ["Delta plays the", "Eps speaks"]
    assert _module().main([*args, "--num", "1"]) == 0
    assert len(out.read_text().splitlines()) == 1
