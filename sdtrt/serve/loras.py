"""The server's LoRA folder (``sdtrt serve --lora-dir DIR``): LoRAs by name, as A1111 lists and finds them.

A LoRA's name is its file's stem; every ``.safetensors`` under DIR (subfolders included, as A1111 walks them)
is one. Its alias is the ``ss_output_name`` of its training metadata when it has one (A1111's rule), and a
request may name either. The folder is scanned at start and by ``POST /sdapi/v1/refresh-loras``; a request
naming a LoRA the last scan did not find is a usage error (4xx) listing what there is. Only names and headers
are read here: the pipeline reads, checks and caches the weights (``Pipeline.validate``).
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrt.errors import UsageError

log = logging.getLogger(__name__)

MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class LoraEntry:
    name: str
    alias: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_a1111(self) -> dict[str, Any]:
        """``GET /sdapi/v1/loras``'s item: A1111's fields."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": self.metadata}


def read_metadata(path: Path) -> dict[str, Any]:
    """A safetensors file's ``__metadata__`` (kohya's ``ss_*`` training notes), values that hold JSON objects
    parsed as A1111 does; ``{}`` for a file whose header cannot be read (the pipeline refuses it when used)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                raise ValueError(f"header of {n} bytes")
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError) as e:
        log.warning("LoRA %s: cannot read its metadata (%s)", path, e)
        return {}
    out = {}
    for key, value in meta.items():
        if isinstance(value, str) and value.startswith("{"):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


def check_lora_dir(lora_dir: str | Path | None) -> None:
    """``UsageError`` unless ``lora_dir`` is None or a directory (the CLI checks it before the model loads)."""
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise UsageError(f"--lora-dir {lora_dir}: no such directory")


class LoraFolder:
    """``resolve([(name, scale)])`` -> ``((path, scale), ...)`` for a ``GenerateRequest``; ``refresh()`` rescans."""

    def __init__(self, lora_dir: str | Path | None) -> None:
        check_lora_dir(lora_dir)
        self.dir = None if lora_dir is None else Path(lora_dir).resolve()
        self._lock = threading.Lock()  # one scan at a time; readers see the old maps or the new ones, whole
        self._maps: tuple[dict[str, LoraEntry], dict[str, LoraEntry]] = ({}, {})  # by name, by alias; swapped whole
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folder (A1111's ``POST /sdapi/v1/refresh-loras``)."""
        if self.dir is None:
            return
        with self._lock:
            check_lora_dir(self.dir)
            entries: dict[str, LoraEntry] = {}
            for path in sorted(p for p in self.dir.rglob("*.safetensors") if p.is_file()):
                if path.stem in entries:
                    log.warning("LoRA %s: %s has the same name; using %s", path.stem, path, entries[path.stem].path)
                    continue
                meta = read_metadata(path)
                alias = meta.get("ss_output_name")
                entries[path.stem] = LoraEntry(path.stem, alias if isinstance(alias, str) and alias else path.stem,
                                               path, meta)
            self._maps = (entries, {e.alias: e for e in entries.values() if e.alias not in entries})
        log.info("LoRA folder %s: %d LoRAs", self.dir, len(entries))

    def listing(self) -> list[dict[str, Any]]:
        """``GET /sdapi/v1/loras``."""
        return [e.to_a1111() for e in self._maps[0].values()]

    def resolve(self, named: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
        """(name or alias, scale) pairs -> (path, scale) pairs; ``UsageError`` naming an unknown one."""
        if named and self.dir is None:
            raise UsageError(f"LoRA {named[0][0]!r}: this server has no LoRA folder (start it with --lora-dir DIR)")
        entries, by_alias = self._maps
        out = []
        for name, scale in named:
            entry = entries.get(name) or by_alias.get(name)
            if entry is None:
                known = ", ".join(sorted(entries)[:20]) + (", ..." if len(entries) > 20 else "")
                raise UsageError(f"unknown LoRA {name!r}; this server has: {known or 'none'} (a file added to "
                                 f"{self.dir} since the last scan needs POST /sdapi/v1/refresh-loras)")
            out.append((str(entry.path), scale))
        return tuple(out)


NO_LORA_FOLDER = LoraFolder(None)  # a server started without --lora-dir
