"""Where each location setting may live: object-store URIs or local paths only.

`require_local` is a stage-start check, not part of resolving: one config file may hold every
stage's settings, and only the stage that runs needs its own locations to be local.
"""

from __future__ import annotations

import re
from pathlib import Path

from lbgen.config.schema import Config, _require

# Locations that may be object-store URIs (lbgen.runtime.storage).
URI_FIELDS = ("generate.output", "generate.lora", "pretrain.data")

# Per config section: the fields read or written through the local file system only (an object-store
# URI there would become a local directory named `s3:`).
LOCAL_FIELDS: dict[str, tuple[str, ...]] = {
    "finetune": ("output",),
    "make_downstream": ("output",),
    "pretrain": ("output",),
    "evaluate": ("output", "backbone", "downstream", "bias", "data_root"),
    "run": ("output",),
}

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(where: str | Path) -> bool:
    """True for `scheme://...` (object stores, `file://`), False for a plain local path."""
    return bool(_SCHEME.match(str(where)))


def require_local(cfg: Config, section: str) -> None:
    """Refuse an object-store URI in a field of `section` that `LOCAL_FIELDS` keeps local. Checked when
    the stage starts, not when a config resolves: one config file may hold every stage's settings."""
    accepted = ", ".join(URI_FIELDS) + " and `lbgen inspect`"
    for name in LOCAL_FIELDS.get(section, ()):
        value = getattr(getattr(cfg, section), name)
        uri = next((v for v in (value if isinstance(value, list) else [value]) if is_uri(v)), None)
        _require({f"{section}.{name}": (uri is None, f"must be a local path, got {uri!r} (object-store URIs work for {accepted})")})
