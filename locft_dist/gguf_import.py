"""``locft import-gguf``: a GGUF file (llama.cpp's format) as a float32 safetensors Hugging Face directory.

Users of the llama.cpp ecosystem hold GGUF files, often quantized (Q4, Q8). transformers reads them
(``from_pretrained(dir, gguf_file=...)``, with the ``gguf`` package) and dequantizes every tensor; this
saves the result as an ordinary model directory (config, ``model.safetensors``, tokenizer with its chat
template) that every ``locft`` command loads. The dequantized weights are what the quantized model
computes with, so the imported model generates what the GGUF file does, in float32 (4 bytes a parameter).

The directory is written under a temporary name beside ``OUT_DIR`` and renamed at the end: a failed or
interrupted import leaves nothing that looks like a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from locft_dist.errors import ModelImportError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
IMPORT_RECORD = "locft-import.json"
"""Written into the imported directory: the source file's name and sha256, and what was imported."""
INSTALL_HINT = "pip install 'locft-dist[gguf]'  (or: pip install 'gguf>=0.10' 'accelerate>=0.30')"


@dataclass(frozen=True)
class ImportReport:
    """What ``import_gguf`` wrote."""

    out_dir: str
    source: str
    source_sha256: str
    architecture: str
    model_type: str
    num_parameters: int
    vocab_size: int
    chat_template: bool
    seconds: float

    def summary(self) -> str:
        chat = "yes (edits.chat_template=auto renders prompts as user turns)" if self.chat_template else "no"
        return "\n".join(
            [
                f"wrote {self.out_dir}",
                f"  from        {self.source}",
                f"  model       {self.architecture} ({self.model_type}), "
                f"{self.num_parameters / 1e6:.1f}M parameters, float32 safetensors",
                f"  vocabulary  {self.vocab_size} tokens",
                f"  chat        {chat}",
                f"  took        {self.seconds:.0f}s",
                "next:",
                f"  locft edit model.path={self.out_dir} edits.path=EDITS.jsonl output.dir=runs/first",
            ]
        )


def check_gguf_file(path: str | Path) -> Path:
    """``path`` as a readable GGUF file, else a ModelImportError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ModelImportError(f"{path}: no such file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as err:
        raise ModelImportError(f"{path}: cannot read it: {err.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelImportError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    return path


def check_gguf_support() -> None:
    """transformers reads GGUF files only with the ``gguf`` package (and loads them with ``accelerate``)."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelImportError(
            f"reading GGUF files needs the {' and '.join(missing)} package(s): {INSTALL_HINT}"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def import_gguf(gguf_path: str | Path, out_dir: str | Path, *, progress: bool = True) -> ImportReport:
    """Convert ``gguf_path`` into the new directory ``out_dir`` (which must not exist)."""
    start = time.perf_counter()
    source = check_gguf_file(gguf_path)
    out = Path(out_dir)
    if out.exists():
        raise ModelImportError(f"{out} exists: give a new directory (an import never overwrites)")
    check_gguf_support()
    model, tokenizer = _load(source, progress=progress)
    vocab_size = len(tokenizer)
    report = ImportReport(
        out_dir=str(out),
        source=str(source),
        source_sha256=file_sha256(source),
        architecture=type(model).__name__,
        model_type=str(model.config.model_type),
        num_parameters=sum(p.numel() for p in model.parameters()),
        vocab_size=vocab_size,
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        seconds=0.0,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.import-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        report = ImportReport(**{**asdict(report), "seconds": round(time.perf_counter() - start, 1)})
        (tmp / IMPORT_RECORD).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
        _readable(tmp)
        os.rename(tmp, out)  # fails if another process created out meanwhile: never merge two imports
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and out.exists():
            raise ModelImportError(f"{out} was created by another process during the import") from err
        raise
    logger.info("imported %s into %s in %.1fs", source, out, report.seconds)
    return report


def _readable(directory: Path) -> None:
    """Files as the umask allows (safetensors writes 0600 through a temporary file): a model is shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _load(source: Path, *, progress: bool):
    """The model dequantized to float32 and its tokenizer, as plain (unquantized) transformers objects."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not progress:
        transformers.utils.logging.disable_progress_bar()
    kwargs = {"gguf_file": source.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32, local_files_only=True
        )
    except (ValueError, KeyError, NotImplementedError) as err:
        raise ModelImportError(f"{source}: transformers cannot load this GGUF file: {err}") from err
    # The weights are plain float32 tensors now; without this the saved config would claim a GGUF
    # quantization that no loader can apply to safetensors.
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    return model.eval(), tokenizer
