"""The evaluation protocols by name: what `evaluate.protocol` accepts and what `evaluate` dispatches on.

Each protocol is a class (in modules that need torch), named here as "module:attribute" and
imported when used: config checks the name without loading torch. `Protocol.run(cfg, spec,
dataset, device)` gives the records of one (backbone, set) pair, and `Protocol.section` names the
list of results.json that keeps them.
"""

from __future__ import annotations

from lbgen.stages import resolve_ref

PROTOCOLS = {
    # Frozen features + a standardised logistic-regression probe per fraction.
    "linear": "lbgen.stages.evaluate:LinearProtocol",
    # The whole backbone and a new head fine-tuned per fraction.
    "finetune": "lbgen.stages.evaluate:FinetuneProtocol",
    # The backbone's own classifier, untrained further, on real images of its classes keyed by class_id.
    "classify": "lbgen.stages.classify:ClassifyProtocol",
}


def load_protocol(name: str):
    """The protocol class registered as `name`."""
    return resolve_ref(PROTOCOLS[name])
