"""Stage 5, `run`: finetune -> generate -> make-downstream -> pretrain -> evaluate in one directory.

The steps, their order, subdirectories and completion markers come from the stage registry
(`lbgen.stages.STAGES`). Each stage writes its own subdirectory of `cfg.run.output` and is skipped
when its completion marker is there (the LoRA export, a whole manifest, the backbone export, the
results table); an interrupted run re-run goes on where it stopped, and the stages that resume on
their own (finetune, generate, pretrain) do so inside.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lbgen.config import Config, require_local
from lbgen.stages import run_steps, stage


def stage_configs(cfg: Config) -> Config:
    """`cfg` with every stage's input and output wired under `cfg.run.output`."""
    root = Path(cfg.run.output).expanduser().resolve()
    out = {step.name: str(root / step.directory) for step in run_steps()}
    return dataclasses.replace(
        cfg,
        finetune=dataclasses.replace(cfg.finetune, output=out["finetune"]),
        generate=dataclasses.replace(cfg.generate, output=out["generate"], lora=out["finetune"]),
        make_downstream=dataclasses.replace(cfg.make_downstream, output=out["make-downstream"]),
        pretrain=dataclasses.replace(cfg.pretrain, output=out["pretrain"], data=[out["generate"]]),
        evaluate=dataclasses.replace(
            cfg.evaluate,
            output=out["evaluate"],
            backbone=[out["pretrain"], f"random:{cfg.pretrain.model}"],
            downstream=[out["make-downstream"]],
        ),
    )


def check_inputs(cfg: Config) -> dict[str, Any]:
    """Refuse a bad class table, generator, quality metric or run directory before any stage starts.

    Returns, per stage name, what was checked for it: `run(cfg, checked=...)` hands it to that
    stage, which then does not check again. The stages whose inputs an earlier stage makes
    (generate's LoRA, pretrain's shards, ...) check those themselves when they start.
    """
    from lbgen.data.classes import load_class_table
    from lbgen.models.generator import check_generator
    from lbgen.runtime.outputs import check_output_dir
    from lbgen.stages.finetune import check_quality_loss, check_resumable

    require_local(cfg, "run")
    table = load_class_table(cfg.classes)
    check_generator(cfg.model.generator)
    check_quality_loss(cfg)
    check_output_dir(cfg.run.output, "run.output")
    # What finetune's own check would add inside the run directory: a fine-tuning left unfinished
    # there resumes only with the same settings.
    wired = stage_configs(cfg)
    finetune_dir = Path(wired.finetune.output)
    if finetune_dir.is_dir() and not stage("finetune").is_complete(finetune_dir):
        check_resumable(finetune_dir, wired)
    return {"finetune": table}


def run(cfg: Config, checked: dict[str, Any] | None = None, log=print) -> Path:
    """Run every stage not yet complete under `cfg.run.output`, then write the report; returns that directory.

    `checked`: what `check_inputs(cfg)` returned, when the caller has already checked.
    """
    from lbgen.stages.report import build_report

    if checked is None:
        checked = check_inputs(cfg)
    cfg = stage_configs(cfg)
    root = Path(cfg.run.output).expanduser().resolve()
    for step in run_steps():
        if not step.rerun and step.is_complete(root / step.directory):
            log(f"[{step.directory}] complete, skipped")
            continue
        log(f"[{step.directory}] running")
        step.call(cfg, checked.get(step.name))
    log(f"[report] {build_report(root, cfg.report)['html']}")
    return root


def done_line(cfg: Config, output: Path) -> str:
    """What the CLI prints when every stage is done."""
    return f"all stages done: {output} (results: {output / 'evaluate' / 'results.md'}, report: {output / 'report.html'})"
