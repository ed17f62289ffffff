"""The transformers tokenizer of a GGUF file, converted once per machine and kept on disk.

transformers builds a fast tokenizer from GGUF metadata by re-parsing the file and converting
the vocabulary and merges: 15-20 s on a 2-core machine for the default model, paid by every
worker process at start-up. The converted tokenizer is saved (`save_pretrained`) under the
cache directory, keyed by the sha256 of the file's header (its metadata, so a changed vocabulary
or template is a new entry) and the transformers version; later loads take well under a second.

Cache directory: `$PDSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/pdserve`, else `~/.cache/pdserve`;
`PDSERVE_CACHE_DIR=off` turns the cache off. A directory that cannot be written only costs the
conversion again: the cache is an optimisation, never a requirement.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)
_LAYOUT_VERSION = 1  # bump when what is stored changes


def cache_root() -> Path | None:
    """Where pdserve keeps derived files, or None when the cache is off."""
    configured = os.environ.get("PDSERVE_CACHE_DIR")
    if configured is not None:
        return None if configured.strip().lower() in ("", "off") else Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "pdserve"
    try:
        return Path.home() / ".cache" / "pdserve"
    except RuntimeError:  # no home directory to be found: run without a cache
        return None


def gguf_tokenizer(path: Path, metadata_digest: str) -> PreTrainedTokenizerBase:
    """The tokenizer that `path` describes: from the cache when there, else converted (and
    stored for the next process)."""
    folder = entry_folder(metadata_digest)
    if folder is not None and (folder / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as error:  # noqa: BLE001 (a damaged entry: convert again, replace it)
            logger.warning("cached tokenizer %s unreadable (%s); converting again", folder, error)
            shutil.rmtree(folder, ignore_errors=True)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if folder is not None:
        _store(hf_tokenizer, folder)
    return hf_tokenizer


def entry_folder(metadata_digest: str) -> Path | None:
    """Where the tokenizer of a file with this header digest is (or would be) cached."""
    root = cache_root()
    if root is None:
        return None
    key = f"{metadata_digest[:32]}-tf{transformers.__version__}-v{_LAYOUT_VERSION}"
    return root / "tokenizers" / key


def _store(hf_tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save into a private folder, then rename it into place: a reader sees a whole entry or
    none, and of two processes converting at once, the second's rename loses harmlessly."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    except OSError as error:
        logger.info("tokenizer cache %s not writable (%s); not cached", folder.parent, error)
        return
    try:
        hf_tokenizer.save_pretrained(str(staging))
        os.rename(staging, folder)
    except OSError:  # another process stored it first, or the disk refused
        shutil.rmtree(staging, ignore_errors=True)
