"""What a wave needs from the waves before it: their current facts and the chain of runs.

A run that later waves can follow keeps, in its own directory, ``facts.jsonl`` (every edit in force after
it, one canonical record per line with the ``wave`` that made it) and ``continual.json`` (the chain: each
wave's run directory, edit-file fingerprint, counts and delta sha256). The next wave reads only these and
the delta, so a chain survives moved or deleted edit files. A new edit to a prompt an earlier wave edited
supersedes it: the old target leaves the facts and is never replayed again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locft_dist import outputs
from locft_dist.delta import Delta, read_delta
from locft_dist.edits.encode import Encoding
from locft_dist.edits.schema import EditRequest
from locft_dist.errors import ConfigError
from locft_dist.run.layout import RunDir

FACTS_FILE = "facts.jsonl"
CHAIN_FILE = "continual.json"
CHAIN_FORMAT = "locft-continual/1"


@dataclass(frozen=True)
class Fact:
    """An edit in force, and the wave (1-based) that made it."""

    request: EditRequest
    wave: int


@dataclass
class Previous:
    """The run a continual run follows: its delta, current facts and chain."""

    run_dir: Path
    delta: Delta
    delta_sha256: str
    facts: list[Fact]
    chain: list[dict[str, Any]]
    model_fingerprint: str | None

    @property
    def wave(self) -> int:
        return len(self.chain)


@dataclass
class Waves:
    """The facts after this wave: the earlier ones still in force (the replay pool), then the new edits."""

    pool: list[Fact]
    new: list[Fact]
    num_superseded: int

    @property
    def facts(self) -> list[Fact]:
        return [*self.pool, *self.new]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_facts(path: Path) -> list[Fact]:
    """``facts.jsonl``; a malformed line is an error naming the file, the line and the field."""
    facts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the earlier waves' facts: {err.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: line {number}: not JSON ({err.msg})") from None
        for key, kind in (("prompt", str), ("target_new", str), ("wave", int)):
            if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
                raise ConfigError(f"{path}: line {number}: field '{key}' must be a {kind.__name__}")
        facts.append(Fact(EditRequest.from_json(record), record["wave"]))
    return facts


def write_facts(path: Path, facts: Sequence[Fact]) -> None:
    lines = [
        json.dumps({**fact.request.to_json(), "wave": fact.wave}, ensure_ascii=False, sort_keys=True)
        for fact in facts
    ]
    outputs.write_text(path, "".join(line + "\n" for line in lines))


def load_previous(path: str | Path) -> Previous:
    """The finished run at ``path``; a clear error when it cannot be followed."""
    run_dir = RunDir(path)
    where = f"continual.previous {str(path)!r}"
    if not run_dir.path.is_dir():
        raise ConfigError(f"{where}: no such run directory")
    record = run_dir.load_record()
    if not run_dir.delta_done():
        raise ConfigError(f"{where}: the run has no finished delta.safetensors; finish it first")
    facts_path = run_dir.path / FACTS_FILE
    if not facts_path.is_file():
        raise ConfigError(
            f"{where}: no {FACTS_FILE} (the run was made with continual.keep_facts=false or by an older "
            "version); rerun that wave with continual.keep_facts=true"
        )
    delta = read_delta(run_dir.delta)
    delta_sha = sha256_file(run_dir.delta)
    facts = read_facts(facts_path)
    identity = record.get("identity") or {}
    chain_path = run_dir.path / CHAIN_FILE
    if chain_path.is_file():
        try:
            chain_record = json.loads(chain_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ConfigError(f"{chain_path}: not JSON ({err})") from None
        if chain_record.get("format") != CHAIN_FORMAT or not isinstance(chain_record.get("chain"), list):
            raise ConfigError(f"{chain_path}: not a {CHAIN_FORMAT} record")
        chain = chain_record["chain"]
        if chain and chain[-1].get("delta_sha256") != delta_sha:
            raise ConfigError(
                f"{where}: delta.safetensors (sha256 {delta_sha[:16]}) is not the delta {CHAIN_FILE} records "
                f"({str(chain[-1].get('delta_sha256'))[:16]}); was it replaced?"
            )
    else:  # a plain run: the first wave
        config = run_dir.previous_config() or {}
        chain = [
            chain_entry(
                1,
                run_dir.path,
                edits_path=(config.get("edits") or {}).get("path"),
                edits_fingerprint=identity.get("edits"),
                num_edits=len(facts),
                num_superseded=0,
                num_facts=len(facts),
                delta_sha256=delta_sha,
            )
        ]
    return Previous(run_dir.path, delta, delta_sha, facts, chain, identity.get("model"))


def chain_entry(
    wave: int,
    run_dir: Path,
    *,
    edits_path: str | None,
    edits_fingerprint: str | None,
    num_edits: int,
    num_superseded: int,
    num_facts: int,
    delta_sha256: str | None = None,
) -> dict[str, Any]:
    return {
        "wave": wave,
        "run_dir": str(run_dir),
        "edits_path": edits_path,
        "edits_fingerprint": edits_fingerprint,
        "num_edits": num_edits,
        "num_superseded": num_superseded,
        "num_facts": num_facts,
        "delta_sha256": delta_sha256,
    }


def check_previous(
    previous: Previous,
    *,
    model_fingerprint: str,
    base_fingerprint: str,
    encoding: Encoding,
    parameter_names: Sequence[str],
) -> None:
    """Refuse a previous run whose delta this run cannot continue, naming every difference."""
    problems = []
    theirs, ours = sorted(previous.delta.tensors), sorted(parameter_names)
    if theirs != ours:
        problems.append(f"location (locate.*): it tunes {theirs}, this run {ours}")
    elif previous.delta.base_fingerprint != base_fingerprint:
        problems.append(
            f"base model: its delta was made on tensors with fingerprint {previous.delta.base_fingerprint} "
            f"({previous.delta.metadata.get('locft.base_model', '?')}), this base has {base_fingerprint}"
        )
    elif previous.model_fingerprint and previous.model_fingerprint != model_fingerprint:
        problems.append(
            f"base model: content fingerprint {previous.model_fingerprint}, this run's {model_fingerprint}"
        )
    theirs_encoding = previous.delta.encoding
    if theirs_encoding is not None and theirs_encoding != encoding:
        a, b = theirs_encoding.to_dict(), encoding.to_dict()
        diffs = ", ".join(
            f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(a) if a[k] != b.get(k)
        )
        problems.append(f"encoding (edits.*): {diffs}")
    if problems:
        raise ConfigError(
            f"continual.previous {str(previous.run_dir)!r} cannot be continued by this run:\n  "
            + "\n  ".join(problems)
        )


def supersede(earlier: Sequence[Fact], new: Sequence[EditRequest], wave: int) -> Waves:
    """The facts after wave ``wave``: a new edit of a prompt an earlier fact holds replaces that fact."""
    prompts = {request.prompt for request in new}
    pool = [fact for fact in earlier if fact.request.prompt not in prompts]
    return Waves(pool, [Fact(request, wave) for request in new], len(earlier) - len(pool))


def write_chain(path: Path, chain: list[dict[str, Any]], **info: Any) -> None:
    outputs.write_json(path, {"format": CHAIN_FORMAT, "wave": len(chain), **info, "chain": chain}, indent=1)
