"""Where each location setting may live: object-store URIs or local paths only.

`require_local` is a stage-start check, not part of resolving: one config file may hold every
stage's settings, and only the stage that runs needs its own locations to be local.
"""

from __future__ import annotations

from lbgen.config.schema import Config, _require

# Locations that may be object-store URIs (lbgen.data.storage).
URI_FIELDS = ("generate.output", "generate.lora", "pretrain.data")


def require_local(cfg: Config, stage: str) -> None:
    """Refuse an object-store URI where `stage` reads or writes through the local file system only
    (it would become a local directory named `s3:`). Checked when the stage starts, not when a config
    resolves: one config file may hold every stage's settings. The fields are the stage record's
    `local_fields` (lbgen.stages)."""
    from lbgen.data.storage import is_uri
    from lbgen.stages import local_fields

    accepted = ", ".join(URI_FIELDS) + " and `lbgen inspect`"
    for name in local_fields(stage):
        value = getattr(getattr(cfg, stage), name)
        uri = next((v for v in (value if isinstance(value, list) else [value]) if is_uri(v)), None)
        _require({f"{stage}.{name}": (uri is None, f"must be a local path, got {uri!r} (object-store URIs work for {accepted})")})
