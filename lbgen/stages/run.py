"""Stage 5, `run`: finetune -> generate -> pretrain -> evaluate in one directory.

Each stage writes its own subdirectory of `cfg.run.output` and is skipped when its
completion marker is there (the LoRA export, a whole manifest, the backbone export,
the results table); an interrupted run re-run goes on where it stopped, and the
stages that resume on their own (finetune, generate, pretrain) do so inside.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lbgen.config import Config, require_local

STAGES = ("finetune", "generate", "downstream", "pretrain", "evaluate")


def stage_configs(cfg: Config) -> Config:
    """`cfg` with every stage's input and output wired under `cfg.run.output`."""
    root = Path(cfg.run.output).expanduser().resolve()
    out = {stage: str(root / stage) for stage in STAGES}
    return dataclasses.replace(
        cfg,
        finetune=dataclasses.replace(cfg.finetune, output=out["finetune"]),
        generate=dataclasses.replace(cfg.generate, output=out["generate"], lora=out["finetune"]),
        make_downstream=dataclasses.replace(cfg.make_downstream, output=out["downstream"]),
        pretrain=dataclasses.replace(cfg.pretrain, output=out["pretrain"], data=[out["generate"]]),
        evaluate=dataclasses.replace(
            cfg.evaluate,
            output=out["evaluate"],
            backbone=[out["pretrain"], f"random:{cfg.pretrain.model}"],
            downstream=[out["downstream"]],
        ),
    )


def _generated_whole(directory: Path) -> bool:
    from lbgen.data.dataset import read_manifest

    data = read_manifest(directory)
    return data is not None and len(data.get("shards", {})) == data.get("num_shards", -1) and "totals" in data


def stage_complete(stage: str, directory: Path) -> bool:
    """Whether `directory` holds the finished output of `stage` (its completion marker)."""
    from lbgen.models.generator import LORA_FILE

    markers = {
        "finetune": lambda: (directory / LORA_FILE).exists(),
        "generate": lambda: _generated_whole(directory),
        "downstream": lambda: (directory / "train").is_dir(),
        "pretrain": lambda: (directory / "backbone.safetensors").exists(),
        "evaluate": lambda: (directory / "results.csv").exists(),
    }
    return markers[stage]()


def check_inputs(cfg: Config) -> None:
    """Refuse a bad class table, generator, quality metric or run directory before any stage starts."""
    from lbgen.data.classes import load_class_table
    from lbgen.models.generator import check_generator
    from lbgen.runtime.training import check_output_dir
    from lbgen.stages.finetune import check_quality_loss

    require_local(cfg, "run")
    load_class_table(cfg.classes)
    check_generator(cfg.model.generator)
    check_quality_loss(cfg)
    check_output_dir(cfg.run.output, "run.output")


def run(cfg: Config, log=print) -> Path:
    """Run every stage not yet complete under `cfg.run.output`, then write the report; returns that directory."""
    from lbgen.data.downstream import make_downstream
    from lbgen.stages.evaluate import evaluate
    from lbgen.stages.finetune import finetune
    from lbgen.stages.generate import generate
    from lbgen.stages.pretrain import pretrain
    from lbgen.stages.report import build_report

    check_inputs(cfg)
    cfg = stage_configs(cfg)
    root = Path(cfg.run.output).expanduser().resolve()
    md = cfg.make_downstream
    # (stage, is it complete?, run it); the procedural downstream set is cheap and seeded: always rewritten.
    marker = lambda stage: lambda: stage_complete(stage, root / stage)
    steps = [
        ("finetune", marker("finetune"), lambda: finetune(cfg)),
        ("generate", marker("generate"), lambda: generate(cfg)),
        ("downstream", lambda: False,
         lambda: make_downstream(md.kind, md.output, train_per_class=md.train_per_class,
                                 test_per_class=md.test_per_class, size=md.size, seed=cfg.seed)),
        ("pretrain", marker("pretrain"), lambda: pretrain(cfg)),
        ("evaluate", marker("evaluate"), lambda: evaluate(cfg)),
    ]
    for name, complete, stage in steps:
        if complete():
            log(f"[{name}] complete, skipped")
            continue
        log(f"[{name}] running")
        stage()
    log(f"[report] {build_report(root, cfg.report)['html']}")
    return root
