"""A stage's output directory: whether it can be written, whether a run there may resume, and the mode of its files.

A stage's output holds `config.yaml` beside what it writes, and re-running into it resumes only
when the settings that define the run's content are unchanged (`check_resumable`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from pathlib import Path

from lbgen.config import Config, ConfigError, from_dict, is_uri, load_yaml
from lbgen.runtime.locks import check_free


def umask_mode(path: Path) -> Path:
    """Give a final output file the mode the user's umask asks for, and return it.

    safetensors creates its files 0600: a LoRA or backbone on shared storage would be unreadable
    to a teammate, unlike every other file a run writes.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return Path(path)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`"key.path: old -> new"` for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_output_dir(path: str | Path, field: str) -> None:
    """Refuse an output that cannot become a writable directory, before anything is written.

    `field` names the setting in the message (e.g. "generate.output"). Object-store URIs pass, unless held.
    """
    if is_uri(path):
        check_free(path)  # an s3:// output another command writes to: refused now, not after Ray starts
        return
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field} {path}: exists and is not a directory")
    ancestor = path.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{field} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{field} {path}: {ancestor} is not writable")
    check_free(path)  # another command writing there: refused now, not after Ray starts


def check_resumable(
    output: Path, cfg: Config, stage: str, sections: Collection[str], resumable: Collection[str], what: str | None = None
) -> None:
    """Refuse to resume into `output` if its `config.yaml` differs from `cfg` in `sections`.

    `what` names the run in the message (default: `stage`); fields of the `stage` section listed in
    `resumable` (paths within it: output, epochs, cluster.workers, ...: `lbgen.config.resumable_fields`)
    may change between runs. A run that failed before its first checkpoint (`checkpoints/checkpoint_*`)
    binds nothing.
    """
    saved = output / "config.yaml"
    if not saved.exists() or not any((output / "checkpoints").glob("checkpoint_*")):
        return
    def identity(config: dict) -> dict:
        kept = {section: config[section] for section in sections}
        kept[stage] = _without(config[stage], resumable)
        return kept

    old = dataclasses.asdict(from_dict(Config, load_yaml(saved), str(saved)))
    changed = differences(identity(old), identity(dataclasses.asdict(cfg)))
    if changed:
        raise ConfigError(f"{output} holds a {what or stage} run with other settings ({', '.join(changed)}); use another --output")


def _without(section: dict, paths: Collection[str], prefix: str = "") -> dict:
    """`section` less the (dotted) `paths`, nested sections included."""
    return {k: _without(v, paths, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in section.items() if prefix + k not in paths}
