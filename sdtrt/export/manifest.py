"""``WORKDIR/manifest.json``: what an export produced and how it was checked.

The manifest is written last and atomically, so a WORKDIR with a manifest is complete; readers check the
format version and that every file it names exists with the recorded sha256 (on request: hashing is slow).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdtrt.errors import CheckpointError
from sdtrt.fsutil import sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def read_manifest(workdir: str | Path, *, verify_hashes: bool = False) -> dict[str, Any]:
    """Load and sanity-check a WORKDIR's manifest; raise ``CheckpointError`` with one clear line if it is missing,
    unreadable, of another format version, or names files that are missing (or, with ``verify_hashes``, altered)."""
    workdir = Path(workdir)
    path = workdir / MANIFEST
    if not workdir.is_dir():
        raise CheckpointError(f"{workdir}: no such workdir (run `sdtrt export CHECKPOINT {workdir}` first)")
    if not path.is_file():
        raise CheckpointError(f"{workdir}: not an sdtrt workdir or an incomplete export (no {MANIFEST}); run `sdtrt export` again")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported manifest format {manifest.get('format_version') if isinstance(manifest, dict) else '?'} (this sdtrt reads {FORMAT_VERSION}); re-export")
    for name, comp in manifest.get("components", {}).items():
        for f in comp["files"]:
            fp = workdir / f["path"]
            if not fp.is_file():
                raise CheckpointError(f"{workdir}: {name} file {f['path']} is missing; re-export")
            if verify_hashes and sha256_file(fp) != f["sha256"]:
                raise CheckpointError(f"{workdir}: {name} file {f['path']} does not match its sha256 in the manifest; re-export")
    return manifest
