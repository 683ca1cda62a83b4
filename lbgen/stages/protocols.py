"""The evaluation protocols by name: what `evaluate.protocol` accepts and what `evaluate` dispatches on.

Each protocol is a class in `lbgen.stages.evaluate` (which needs torch), named here as
"module:attribute" and imported when used: config checks the name without loading torch.
The class is built once per (backbone, downstream set) and gives the accuracy of each fraction.
"""

from __future__ import annotations

from lbgen.stages import resolve_ref

PROTOCOLS = {
    # Frozen features + a standardised logistic-regression probe per fraction.
    "linear": "lbgen.stages.evaluate:LinearProtocol",
    # The whole backbone and a new head fine-tuned per fraction.
    "finetune": "lbgen.stages.evaluate:FinetuneProtocol",
}


def load_protocol(name: str):
    """The protocol class registered as `name`."""
    return resolve_ref(PROTOCOLS[name])
