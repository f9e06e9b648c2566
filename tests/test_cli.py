"""The command line: zoo list / show, errors."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

import kerastl
from kerastl import cli


def test_zoo_list(capsys):
    assert cli.main(["zoo", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 + 40 + len(kerastl.list_configs("tfhub")) + len(
        kerastl.list_configs("kerashub"))
    assert out[0].split()[:3] == ["name", "source", "params"]
    row = next(l for l in out if l.startswith("mobilenet_v2 "))
    assert "MobileNetV2" in row and "3.5M" in row and "71.3%" in row
    row = next(l for l in out if l.startswith("hub_mobilenet_v2_100_224 "))
    assert "tfhub" in row and "unit" in row
    row = next(l for l in out if l.startswith("kerashub_dinov2_small "))
    assert "kerashub:dinov2_small" in row and "22.6M" in row


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


# -- start-up: quiet and instant where nothing needs Keras --------------------

def _console_script():
    script = os.path.join(os.path.dirname(sys.executable), "kerastl")
    if not os.path.exists(script):
        pytest.skip("the kerastl console script is not installed here")
    return script


def _clean_env():
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    return env


LIGHT_COMMANDS = [["--version"], ["--help"], ["zoo", "list"],
                  ["zoo", "list", "--markdown"], ["finetune", "--help"],
                  ["demo", "--help"], ["zoo", "show", "hub_resnet_v2_50"],
                  ["zoo", "show", "resnet5"]]


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_never_import_keras_or_tensorflow(argv):
    code = textwrap.dedent(f"""
        import sys, kerastl_cli
        try:
            kerastl_cli.main({argv!r})
        except SystemExit:
            pass
        heavy = sorted(m for m in ("keras", "tensorflow", "tensorflow_hub",
                                   "jax", "numpy") if m in sys.modules)
        print("HEAVY", heavy)
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "HEAVY []", proc.stdout[-500:]


def test_console_script_starts_quietly_and_fast():
    script = _console_script()
    for argv in (["--version"], ["--help"], ["zoo", "list"]):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            proc = subprocess.run([script] + argv, capture_output=True,
                                  text=True, timeout=120, env=_clean_env())
            times.append(time.perf_counter() - start)
            assert proc.returncode == 0 and proc.stdout, proc.stderr
            assert proc.stderr == "", proc.stderr
        # The target; typically 0.1-0.3 s (TensorFlow takes 5-10).
        assert min(times) < 1.5, (argv, times)


@pytest.mark.slow
def test_a_command_that_builds_a_model_prints_no_tensorflow_logs():
    proc = subprocess.run(
        [_console_script(), "zoo", "show", "mobilenet_v2", "--input-size",
         "32"], capture_output=True, text=True, timeout=300,
        env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    assert "stem" in proc.stdout
    # TensorFlow 2.21 prints "oneDNN custom operations are on", "Could not
    # find cuda drivers" and absl's "All log messages before ..." here.
    assert proc.stderr == "", proc.stderr


def test_quiet_import_is_a_no_op_once_tensorflow_is_loaded():
    """Only the first import of TensorFlow is silenced, never later output."""
    from kerastl.cli import import_api_quietly

    # In this process TensorFlow is imported already: a no-op import that
    # must not touch file descriptor 2.
    before = os.fstat(2)
    import_api_quietly()
    assert os.fstat(2) == before


def test_lazy_package_loads_the_api_on_first_use():
    code = textwrap.dedent("""
        import sys, kerastl_cli
        kerastl_cli.LAZY_PACKAGE = True
        import kerastl
        assert "keras" not in sys.modules
        assert kerastl.__version__
        assert callable(kerastl.load_backbone)  # imports the API
        assert "keras" in sys.modules and "load_model" in dir(kerastl)
        print("OK")
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300, env=_clean_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", \
        proc.stderr[-2000:]


def test_missing_subcommand_exits_nonzero():
    with pytest.raises(SystemExit) as e:
        cli.main(["zoo"])
    assert e.value.code != 0


def test_docs_zoo_table_is_in_sync_with_the_configs():
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "zoo.md"
    block = re.search(r"<!-- zoo-table:start -->\n(.*?)\n<!-- zoo-table:end -->",
                      page.read_text(), re.S)
    assert block, "docs/zoo.md lost its zoo-table markers"
    assert block.group(1) == cli.zoo_markdown_table(), (
        "docs/zoo.md's zoo table is stale: paste `kerastl zoo list "
        "--markdown`")


@pytest.mark.parametrize("case", [
    ["--model", "mobilenet_v9", "--data", "DATA"],
    ["--model", "mobilenet_v2", "--data", "MISSING"],
    ["--model", "mobilenet_v2", "--data", "DATA/cats"],
    ["--model", "mobilenet_v2", "--data", "DATA", "--epochs", "-1"],
    ["--model", "missing.keras", "--data", "DATA"],
], ids=["model typo", "missing folder", "one class", "epochs -1",
        "missing .keras"])
def test_finetune_refuses_bad_arguments_before_importing_tensorflow(
        case, tmp_path):
    """A typo, a missing or one-class folder, a bad flag: one line, in well
    under a second (TensorFlow's import alone takes 5-10 s)."""
    from conftest import write_folder

    data = write_folder(tmp_path / "data", per_class=2, size=8)
    argv = ["finetune"] + [a.replace("DATA", str(data)).replace(
        "MISSING", str(tmp_path / "none")) for a in case] + [
        "--output", str(tmp_path / "out")]
    code = textwrap.dedent(f"""
        import sys, time, kerastl_cli
        start = time.perf_counter()
        status = kerastl_cli.main({argv!r})
        seconds = time.perf_counter() - start
        heavy = sorted(m for m in ("keras", "tensorflow") if m in sys.modules)
        print("RESULT", status, heavy, round(seconds, 2))
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120, env=_clean_env())
    status, heavy, seconds = proc.stdout.split("RESULT ")[-1].rsplit(" ", 1)[
        0].split(" ", 1) + [float(proc.stdout.split()[-1])]
    print(f"\n{case}: refused in {seconds:.2f} s: {proc.stderr.strip()}")
    assert status == "2" and heavy == "[]", proc.stdout + proc.stderr
    assert proc.stderr.startswith("kerastl: error: ") and \
        proc.stderr.count("\n") == 1
    assert seconds < 2.0
    assert not (tmp_path / "out").exists()


def test_zoo_show_prints_a_packaged_model_without_tensorflow():
    """`kerastl zoo show mobilenet_v2` reads the stored table: no
    TensorFlow import, well under a second; the same table as building."""
    code = textwrap.dedent("""
        import sys, time, kerastl_cli
        start = time.perf_counter()
        status = kerastl_cli.main(["zoo", "show", "mobilenet_v2"])
        seconds = time.perf_counter() - start
        heavy = sorted(m for m in ("keras", "tensorflow") if m in sys.modules)
        print("RESULT", status, heavy, round(seconds, 2))
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120, env=_clean_env())
    result = proc.stdout.split("RESULT ")[-1].split()
    print(f"\nzoo show mobilenet_v2: {result[-1]} s")
    assert result[:2] == ["0", "[]"], proc.stdout + proc.stderr
    assert float(result[-1]) < 2.0
    assert "stage4" in proc.stdout and "block_16_project_BN" in proc.stdout
    assert "(7, 7, 1280)" in proc.stdout  # top's output at 224x224
