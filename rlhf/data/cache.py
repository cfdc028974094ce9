"""A cache of tokenised datasets, as JSON files keyed by a hash of everything that shaped them.

Files live under ``rlhf_home()/cache/tokenized/<sha256>.json``. They are JSON (never pickle: a cache
folder may be shared, and unpickling runs code) and are written to a temporary name then renamed, so a
crash never leaves a partial file under the final name. A file that cannot be read is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rlhf.data.readers import parse_hf, resolve_path
from rlhf.paths import rlhf_home

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("rlhf.data")

CACHE_FORMAT = 1  # bump when the layout of cached items changes, so old files are not reused


def default_cache_dir() -> Path:
    return rlhf_home() / "cache" / "tokenized"


def cache_key(key_parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``key_parts`` (sorted keys, so dict order does not matter)."""
    text = json.dumps({"cache_format": CACHE_FORMAT, **key_parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def cached(key_parts: dict[str, Any], build: Callable[[], list[dict]], cache_dir: Path | None = None) -> list[dict]:
    """Return the cached items for ``key_parts``, or call ``build()``, store its result and return it.

    ``key_parts`` must be JSON-serialisable and name everything the items depend on (source fingerprint,
    tokenizer fingerprint, lengths, seed, ...).
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(key_parts)
    target = folder / f"{key}.json"
    if target.is_file():
        try:
            stored = json.loads(target.read_text())
            log.debug("tokenised data from cache %s", target)
            return stored["items"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable cache file %s (%s); rebuilding", target, exc)
    items = build()
    folder.mkdir(parents=True, exist_ok=True)
    # Same folder as the target, so the rename is atomic (one filesystem).
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"key_parts": key_parts, "items": items}, handle, separators=(",", ":"))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return items


def _sha256_file(path: Path, digest: Any | None = None) -> Any:
    digest = digest or hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest


def source_fingerprint(path: str) -> str:
    """What identifies a source's content.

    Local files (and ``default``/``default:eval``, the shipped files): sha256 of the bytes. ``hf:NAME``:
    the spec string, plus a hash of the files when NAME is a local folder or script (a hub dataset
    cannot be hashed without downloading it; its revision is what ``load_dataset`` resolves).
    """
    if path.startswith("hf:"):
        name, _ = parse_hf(path)
        local = Path(name)
        if local.is_file():
            return f"{path}#{_sha256_file(local).hexdigest()}"
        if local.is_dir():
            digest = hashlib.sha256()
            for file in sorted(p for p in local.rglob("*") if p.is_file()):
                digest.update(str(file.relative_to(local)).encode() + b"\0")
                _sha256_file(file, digest)
            return f"{path}#{digest.hexdigest()}"
        return path
    file = Path(resolve_path(path))
    if not file.is_file():
        return f"{path}#missing"  # reading it will raise a clear error; the key just must not collide
    return _sha256_file(file).hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over what decides token ids: the full fast-tokenizer definition (vocab, merges, normaliser,
    special tokens) when available, else the vocab; plus the chat template and the eos/bos/pad tokens."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps(template, sort_keys=True).encode())
    specials = [tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token]
    digest.update(json.dumps([str(s) if s is not None else None for s in specials]).encode())
    return digest.hexdigest()
