"""The evaluation protocols by name: what `evaluate.protocol` accepts and what `evaluate` dispatches on.

Each protocol is a class (in modules that need torch), named in `lbgen.config.choices.PROTOCOLS` as
"module:attribute" and imported when used: config checks the name without loading torch. `Protocol.run(cfg, spec,
dataset, device)` gives the records of one (backbone, set) pair, and `Protocol.section` names the
list of results.json that keeps them.
"""

from __future__ import annotations

from lbgen.config.choices import PROTOCOLS  # the names, each as "module:attribute"
from lbgen.stages import resolve_ref


def load_protocol(name: str):
    """The protocol class registered as `name`."""
    return resolve_ref(PROTOCOLS[name])
