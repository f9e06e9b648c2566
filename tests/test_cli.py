"""The command line: zoo list / show, errors."""

import subprocess
import sys

import pytest

import kerastl
from kerastl import cli


def test_zoo_list(capsys):
    assert cli.main(["zoo", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 + 40 + len(kerastl.list_configs("tfhub"))
    assert out[0].split()[:3] == ["name", "source", "params"]
    row = next(l for l in out if l.startswith("mobilenet_v2 "))
    assert "MobileNetV2" in row and "3.5M" in row and "71.3%" in row
    row = next(l for l in out if l.startswith("hub_mobilenet_v2_100_224 "))
    assert "tfhub" in row and "unit" in row


def test_zoo_show_prints_the_block_table(capsys):
    assert cli.main(["zoo", "show", "mobilenet_v2", "--input-size", "96"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("block"))
    blocks = [l.split()[0] for l in lines[header + 2:header + 8]]
    assert blocks == ["stem", "stage1", "stage2", "stage3", "stage4", "top"]
    assert "(None, 3, 3, 1280)" not in out and "(3, 3, 1280)" in out
    assert "total params (without classifier): 2,257,984" in out


def test_zoo_show_hub_entry_prints_its_variable_block_map(capsys):
    assert cli.main(["zoo", "show", "hub_resnet_v2_50"]) == 0
    out = capsys.readouterr().out
    assert "https://tfhub.dev/google/imagenet/resnet_v2_50" in out
    assert "resnet_v2_50/postnorm/" in out and "2048 features" in out


def test_unknown_model_is_a_one_line_error(capsys):
    assert cli.main(["zoo", "show", "resnet5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("kerastl: error: Unknown model 'resnet5'")


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "kerastl.cli", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "zoo" in result.stdout


def test_missing_subcommand_exits_nonzero():
    with pytest.raises(SystemExit) as e:
        cli.main(["zoo"])
    assert e.value.code != 0


def test_readme_zoo_table_is_in_sync_with_the_configs():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- zoo-table:start -->\n(.*?)\n<!-- zoo-table:end -->",
                      readme, re.S)
    assert block, "the README lost its zoo-table markers"
    assert block.group(1) == cli.zoo_markdown_table(), (
        "README zoo table is stale: paste `kerastl zoo list --markdown`")
