"""Our own torch implementation passes the whole conformance suite with no expected failures; ``hardtovary
conformance`` reports, writes JSON, honours expected-failures files and exits as documented; the conformance
guide's adapter example works."""

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

from hardtovary.experiments import cli

ROOT = Path(__file__).resolve().parents[1]
TORCH = "hardtovary.conformance.torch_target:target"


@pytest.mark.slow
def test_torch_target_passes_every_check_with_no_expected_failures(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert cli.main(["conformance", "--target", TORCH, "--max-examples", "15", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    text = json.dumps(report)
    verdicts = re.findall(r'"verdict": "(\w+)"', text)
    assert verdicts and "FAIL" not in verdicts and "xfail" not in verdicts
    # the only skipped check is the dataset, which lives in the oracle, not in accel/torch
    assert verdicts.count("skip") == 1 and "spirals.bit_identical" in capsys.readouterr().out


def test_a_mutant_fails_and_an_expected_failures_file_declares_it(tmp_path, capsys):
    args = ["conformance", "--target", "hardtovary.conformance.mutants:strict_gt", "--checks", "agg.ties.exact",
            "--max-examples", "5"]
    assert cli.main(args) == 1
    assert "FAIL" in capsys.readouterr().out
    xfails = tmp_path / "xfails.txt"
    xfails.write_text("# known divergence\nagg.ties.exact  keeps ties only when |S| > tau*K (strict >)\n")
    assert cli.main(args + ["--xfails", str(xfails)]) == 0
    assert "xfail" in capsys.readouterr().out


def test_unknown_target_is_a_usage_error(capsys):
    assert cli.main(["conformance", "--target", "no.such.module:thing"]) == 2
    assert "error" in capsys.readouterr().err


def guide_adapter_example() -> str:
    """The adapter example of the conformance guide (docs/conformance.md, "An adapter in twenty lines")."""
    text = (ROOT / "docs" / "conformance.md").read_text()
    section = text.split("## An adapter in twenty lines", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_guides_adapter_example_runs_and_passes_the_aggregate_checks(tmp_path, monkeypatch, capsys):
    module = tmp_path / "my_adapter.py"
    module.write_text(guide_adapter_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    status = cli.main(["conformance", "--target", "my_adapter:target", "--checks", "agg.oracle.and_mask,agg.special",
                       "--max-examples", "10"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "pass" in out


def _guide_block(heading: str) -> str:
    text = (ROOT / "docs" / "conformance.md").read_text()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_guides_cnn_loop_adapter_passes_the_pooled_checks_and_a_broken_loop_fails(tmp_path, monkeypatch, capsys):
    """The authors'-style per-example loop of the conformance guide passes every pooled and per-example convnet
    check (per-environment statistics are unsupported), and the same loop with its output scale forgotten fails."""
    source = _guide_block("## Checking a CNN implementation")
    (tmp_path / "cnn_adapter.py").write_text(source)
    broken = source.replace("from_spec(spec, dtype=torch.float64)", "from_spec({**spec, 'layers': [layer for layer "
                            "in spec['layers'] if layer['type'] != 'Scale']}, dtype=torch.float64)")
    assert broken != source
    (tmp_path / "broken_cnn_adapter.py").write_text(broken)
    monkeypatch.chdir(tmp_path)
    checks = "envgrad.fast_resnet.per_example.ce,envgrad.fast_resnet.pooled.soft,envgrad.resnet18.per_example.soft"
    args = ["conformance", "--checks", checks + ",envgrad.fast_resnet.per_env.ce,envgrad.convnet", "--max-examples",
            "2"]
    assert cli.main([*args, "--target", "cnn_adapter.py:target"]) == 0
    out = capsys.readouterr().out
    assert "unsupported" in out and "FAIL" not in out
    assert cli.main(["conformance", "--checks", checks, "--target", "broken_cnn_adapter.py:target"]) == 1
