"""The command line: zoo list / show, errors."""

import subprocess
import sys

import pytest

from kerastl import cli


def test_zoo_list(capsys):
    assert cli.main(["zoo", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 + 40
    assert out[0].split()[:3] == ["name", "constructor", "params"]
    row = next(l for l in out if l.startswith("mobilenet_v2 "))
    assert "MobileNetV2" in row and "3.5M" in row and "71.3%" in row


def test_zoo_show_prints_the_block_table(capsys):
    assert cli.main(["zoo", "show", "mobilenet_v2", "--input-size", "96"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("block"))
    blocks = [l.split()[0] for l in lines[header + 2:header + 8]]
    assert blocks == ["stem", "stage1", "stage2", "stage3", "stage4", "top"]
    assert "(None, 3, 3, 1280)" not in out and "(3, 3, 1280)" in out
    assert "total params (without classifier): 2,257,984" in out


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
