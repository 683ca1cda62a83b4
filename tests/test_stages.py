"""The stage registry (lbgen.stages): every reference resolves, and it drives the CLI's subcommands,
`run`'s order and skipping, the report's status table and config's `require_local`."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from lbgen.config import LOCAL_FIELDS, ConfigError, require_local, resolve
from lbgen.stages import STAGES, Stage, resolve_ref, run_steps, stage

REFS = ("check", "run", "done", "complete", "report")


@pytest.mark.parametrize("each", STAGES, ids=lambda s: s.name)
def test_every_reference_names_a_function(each):
    for field in REFS:
        ref = getattr(each, field)
        if ref is not None:
            assert callable(resolve_ref(ref)), f"{each.name}.{field} = {ref}"
    assert set(each.flags) <= {f.name for f in dataclasses.fields(resolve())}
    cfg = resolve()
    for path in each.models:
        section, name = path.split(".")
        getattr(getattr(cfg, section), name)


def test_the_cli_has_one_subcommand_per_stage_with_its_flags():
    from lbgen.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [s.name for s in STAGES] + ["inspect", "report"]
    args = parser.parse_args(["make-downstream", "--kind", "shapes"])
    assert vars(args)["cfg:make_downstream.kind"] == "shapes"
    with pytest.raises(SystemExit):  # pretrain's flags come from its own section only
        parser.parse_args(["pretrain", "--lora-rank", "4"])


def test_run_steps_in_pipeline_order_each_in_its_directory():
    from lbgen.stages.run import stage_configs

    assert [(s.name, s.directory) for s in run_steps()] == [
        ("finetune", "finetune"), ("generate", "generate"), ("make-downstream", "downstream"),
        ("pretrain", "pretrain"), ("evaluate", "evaluate")]
    wired = stage_configs(resolve("tiny", overrides={"run": {"output": "/tmp/r"}}))
    assert (wired.generate.lora, wired.pretrain.data, wired.evaluate.downstream) == ("/tmp/r/finetune", ["/tmp/r/generate"], ["/tmp/r/downstream"])


def fake_steps(done: set[str], calls: list):
    """Stand-in stages that record (name, checked) when run; those in `done` are complete."""
    def make(real: Stage) -> Stage:
        class Fake(Stage):
            def is_complete(self, directory):
                return real.name in done

            def call(self, cfg, checked=None):
                calls.append((real.name, checked))

        return Fake(**{f.name: getattr(real, f.name) for f in dataclasses.fields(Stage)})

    return lambda: tuple(make(s) for s in STAGES if s.directory)


def test_run_follows_the_registry_and_hands_each_stage_what_was_checked(tmp_path, monkeypatch):
    import lbgen.stages.report
    import lbgen.stages.run

    calls, log = [], []
    monkeypatch.setattr(lbgen.stages.run, "run_steps", fake_steps({"finetune", "make-downstream", "pretrain"}, calls))
    monkeypatch.setattr(lbgen.stages.run, "check_inputs", lambda cfg: pytest.fail("checked again"))
    monkeypatch.setattr(lbgen.stages.report, "build_report", lambda root, cfg: {"html": root / "report.html"})
    cfg = resolve("tiny", overrides={"run": {"output": str(tmp_path)}})
    assert lbgen.stages.run.run(cfg, log=log.append, checked={"generate": "G"}) == tmp_path
    # make-downstream is rewritten although complete (`rerun`); the others are skipped when complete.
    assert calls == [("generate", "G"), ("make-downstream", None), ("evaluate", None)]
    assert log == ["[finetune] complete, skipped", "[generate] running", "[downstream] running",
                   "[pretrain] complete, skipped", "[evaluate] running", f"[report] {tmp_path / 'report.html'}"]


def test_the_report_status_table_lists_the_run_steps(tmp_path):
    from lbgen.stages.report import Report, status_section

    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "backbone.safetensors").write_bytes(b"")
    (tmp_path / "evaluate").mkdir()
    report = Report()
    status_section(report, tmp_path)
    rows = report.markdown().splitlines()[4:]  # after the heading, a blank line, the header and the rule
    assert [row.split("|")[1].strip() for row in rows] == [s.directory for s in run_steps()]
    assert "| pretrain | complete |" in rows[3] and "| evaluate | incomplete (running or stopped) |" in rows[4]


def test_local_fields_name_stage_sections_and_their_fields():
    cfg = resolve()
    assert set(LOCAL_FIELDS) <= {s.section for s in STAGES}
    for section, names in LOCAL_FIELDS.items():
        for name in names:
            getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("section, field", [(s, f) for s, fields in LOCAL_FIELDS.items() for f in fields])
def test_require_local_refuses_a_uri_in_the_stages_local_fields(section, field):
    value = getattr(getattr(resolve(), section), field)
    uri = ["s3://bucket/x"] if isinstance(value, list) else "s3://bucket/x"
    cfg = resolve(overrides={section: {field: uri}})
    with pytest.raises(ConfigError, match=f"{section}.{field} must be a local path"):
        require_local(cfg, section)
    require_local(resolve(), section)


def test_stage_lookup_and_first_line_models():
    from lbgen.cli import first_line

    assert stage("make-downstream").section == "make_downstream" and not stage("make-downstream").ray
    assert first_line("evaluate", "tiny", resolve("tiny")).startswith("lbgen evaluate: preset tiny, evaluate.backbone ")
