"""Models that ship inside the package (`lbgen/weights/<name>/`), trained by `scripts/train_mini.py`.

Each shipped set has a `MANIFEST.json`: the sha256 of every file, the command that remakes them and the
figures that command measured. A missing part fails at once, naming the command that makes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lbgen.errors import ModelNotFoundError

WEIGHTS_ROOT = Path(__file__).resolve().parents[1] / "weights"
MANIFEST = "MANIFEST.json"
REMAKE = "python scripts/train_mini.py"


def shipped_dir(name: str, part: str) -> Path:
    """`lbgen/weights/<name>/<part>`; a ModelNotFoundError saying how to make it when absent."""
    path = WEIGHTS_ROOT / name / part
    if not path.is_dir() or not any(path.iterdir()):
        raise ModelNotFoundError(f"shipped {part} {name!r} was not found at {path}: this install lacks lbgen's trained "
                                 f"weights; remake them from Fashion-MNIST with `{REMAKE}` (about 40 minutes on 2 CPU cores)")
    return path


def manifest(name: str) -> dict:
    """The parsed MANIFEST.json of shipped set `name`."""
    path = WEIGHTS_ROOT / name / MANIFEST
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no manifest; remake the weights with `{REMAKE}`")
    return json.loads(path.read_text(encoding="utf-8"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mismatches(name: str) -> list[str]:
    """The files of shipped set `name` that are missing, differ from their manifest sha256, or are not listed."""
    root, listed = WEIGHTS_ROOT / name, manifest(name)["files"]
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST}
    bad = [f"{rel}: missing" for rel in sorted(set(listed) - present)]
    bad += [f"{rel}: not in the manifest" for rel in sorted(present - set(listed))]
    bad += [f"{rel}: sha256 differs" for rel in sorted(present & set(listed)) if file_sha256(root / rel) != listed[rel]]
    return bad
