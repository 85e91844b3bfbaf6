"""Prompt bank: text-prompt embeddings cached per (checkpoint sha256, prompt text).

Why: a prompt's embedding depends only on the weights and the text (FVLM.md "Zero-shot
scoring"), so computing it once and keeping it next to the model means inference never has to
run — or even touch — the BERT text encoder. A warm bank answers every prompt from the file;
the encoder is called only for misses, and only with the missing texts.

Storage: one safetensors file (default ``prompt_bank.safetensors`` in the model directory), one
1-D tensor per entry. The tensor name is the hex SHA-256 of ``model sha256 + NUL + text``, so an
entry can only ever be found by the weights that made it: new weights (another sha256) miss
every entry and the stale file is replaced on the next write. The file's metadata holds the index
(key → text, as JSON) and the model sha256, so the file is self-describing and one atomic rename
publishes entries and index together (no two-file race between workers; the last writer wins, and
a lost entry is only recomputed).

Where: the model directory when it is writable; else ``<cache_dir>/<model sha256>/`` when a cache
directory is configured; else memory only (logged). Both places are read, so a bank shipped
read-only with the model still serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ConfigError

log = logging.getLogger(__name__)

BANK_FILE = "prompt_bank.safetensors"
FORMAT = "fvlm_pacs.prompt_bank"
FORMAT_VERSION = 1
ENCODE_CHUNK = 64
"""Prompts per text-encoder call: bounds memory when a large prompt table is warmed."""

TextEncoder = Callable[[list[str]], torch.Tensor]
"""``texts -> [N, E]`` L2-normalised embeddings, e.g. ``FvlmModel.encode_text``."""


def entry_key(model_sha256: str, text: str) -> str:
    """The cache key of one prompt: it includes the weights' identity, so it self-invalidates."""
    return hashlib.sha256(f"{model_sha256}\0{text}".encode()).hexdigest()


def bank_locations(
    model_path: str | Path, model_sha256: str, cache_dir: str | Path | None = None
) -> list[Path]:
    """Candidate bank files for a checkpoint, preferred first.

    A model directory (our format) keeps ``prompt_bank.safetensors`` inside; a released
    single-file checkpoint keeps ``<stem>.prompt_bank.safetensors`` beside it (two files in one
    folder must not evict each other). ``cache_dir`` adds ``<cache_dir>/<sha256>/`` as fallback.
    """
    p = Path(model_path)
    out = [p / BANK_FILE if p.is_dir() else p.parent / f"{p.stem}.{BANK_FILE}"]
    if cache_dir is not None:
        out.append(Path(cache_dir) / model_sha256 / BANK_FILE)
    return out


class PromptBank:
    """Cached prompt embeddings of one checkpoint (identified by its weights' sha256).

    ``locations``: bank files, preferred first (see :func:`bank_locations`); every existing one is
    read at construction, new entries are written to the first that accepts the write. With no
    locations the bank lives in memory only. Not thread-safe for concurrent misses; a
    :class:`~fvlm_pacs.model.predictor.Predictor` fills it once at start-up.
    """

    def __init__(self, model_sha256: str, locations: Sequence[str | Path] = ()) -> None:
        if not model_sha256:
            raise ConfigError("model_sha256 must not be empty: it keys the prompt cache")
        self.model_sha256 = model_sha256
        self.locations = tuple(Path(p) for p in locations)
        self._entries: dict[str, torch.Tensor] = {}
        self._texts: dict[str, str] = {}
        #: Where the last write went (None: nothing written yet, or memory only).
        self.path: Path | None = None
        for location in self.locations:
            self._read(location)

    @classmethod
    def for_model(
        cls, model_path: str | Path, model_sha256: str, cache_dir: str | Path | None = None
    ) -> PromptBank:
        """The bank of the checkpoint at ``model_path`` (a directory or a released file)."""
        return cls(model_sha256, bank_locations(model_path, model_sha256, cache_dir))

    # -- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and entry_key(self.model_sha256, text) in self._entries

    def missing(self, texts: Sequence[str]) -> list[str]:
        """The distinct texts of ``texts`` not in the bank, in first-seen order."""
        seen: dict[str, None] = {}
        for t in texts:
            if t not in self and t not in seen:
                seen[t] = None
        return list(seen)

    def embeddings(self, texts: Sequence[str], encoder: TextEncoder | None = None) -> torch.Tensor:
        """[N, E] float32 CPU embeddings of ``texts`` in order.

        Only texts missing from the bank go to ``encoder`` (in chunks of :data:`ENCODE_CHUNK`);
        the new entries are persisted before returning. A miss without an encoder raises
        :class:`ConfigError` naming the first missing prompts — never a zero vector.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        texts = list(texts)
        misses = self.missing(texts)
        if misses:
            if encoder is None:
                shown = ", ".join(repr(t) for t in misses[:3])
                raise ConfigError(
                    f"prompt bank lacks {len(misses)} prompt(s) ({shown}) and no text encoder "
                    "was given to compute them"
                )
            log.info("prompt bank: encoding %d new prompt(s)", len(misses))
            for start in range(0, len(misses), ENCODE_CHUNK):
                chunk = misses[start : start + ENCODE_CHUNK]
                with torch.inference_mode():
                    out = encoder(chunk)
                if out.ndim != 2 or out.shape[0] != len(chunk):
                    raise ValueError(
                        f"text encoder returned shape {tuple(out.shape)} for {len(chunk)} texts"
                    )
                for text, row in zip(chunk, out.detach().to("cpu", torch.float32), strict=True):
                    self._put(text, row.clone())
            self._write()
        if not texts:
            dim = next(iter(self._entries.values())).shape[0] if self._entries else 0
            return torch.empty(0, dim)
        rows = [self._entries[entry_key(self.model_sha256, t)] for t in texts]
        dims = {r.shape[0] for r in rows}
        if len(dims) != 1:
            raise ValueError(f"prompt bank holds embeddings of mixed sizes {sorted(dims)}")
        return torch.stack(rows)

    # -- storage -----------------------------------------------------------------------------
    def _put(self, text: str, row: torch.Tensor) -> None:
        key = entry_key(self.model_sha256, text)
        self._entries[key] = row
        self._texts[key] = text

    def _read(self, path: Path) -> None:
        """Merge the entries of ``path`` if it is a bank of these weights; else ignore it."""
        if not path.is_file():
            return
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(path))
        except (OSError, SafetensorError, ValueError) as exc:
            log.warning("prompt bank %s unreadable, ignored (%s)", path, exc)
            return
        if meta.get("format") != FORMAT:
            log.warning("prompt bank %s: not a %s file, ignored", path, FORMAT)
            return
        if meta.get("model_sha256") != self.model_sha256:
            log.info(
                "prompt bank %s belongs to weights %s, not %s: stale, ignored",
                path,
                str(meta.get("model_sha256"))[:12],
                self.model_sha256[:12],
            )
            return
        try:
            index = json.loads(meta.get("texts", "{}"))
        except json.JSONDecodeError:
            log.warning("prompt bank %s: index unreadable, ignored", path)
            return
        kept = 0
        for key, text in index.items():
            # A key that does not match its text (hand-edited file) would serve wrong vectors.
            if (
                key in tensors
                and isinstance(text, str)
                and key == entry_key(self.model_sha256, text)
            ):
                self._entries[key] = tensors[key].to(torch.float32)
                self._texts[key] = text
                kept += 1
        log.debug("prompt bank %s: %d entries", path, kept)

    def _write(self) -> None:
        """Persist all entries to the first location that takes the write (atomic rename)."""
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "model_sha256": self.model_sha256,
            "texts": json.dumps(self._texts, ensure_ascii=False, sort_keys=True),
        }
        tensors = {k: v.contiguous() for k, v in self._entries.items()}
        for path in self.locations:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".prompt_bank.", dir=path.parent)
                os.close(fd)
                try:
                    save_file(tensors, tmp, metadata=meta)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            except OSError as exc:
                log.info("prompt bank: cannot write %s (%s), trying the next place", path, exc)
                continue
            self.path = path
            log.info("prompt bank: %d entries saved to %s", len(tensors), path)
            return
        log.warning(
            "prompt bank: no writable location (%s); the %d entries live in memory only and the "
            "text encoder will run again at the next start (configure a cache directory)",
            ", ".join(map(str, self.locations)) or "none configured",
            len(tensors),
        )
