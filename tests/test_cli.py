import json
import subprocess
import sys

import pytest

from resnetlab.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_resnet50_prints_the_figures(capsys):
    code, out, _ = run(capsys, "summary", "resnet50")
    assert code == 0
    assert "25,557,032" in out and "4.09 G" in out and "2048x7x7" in out


def test_summary_json_is_the_last_line(capsys):
    code, out, _ = run(capsys, "summary", "resnet1202", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["params"] == 19_421_274 and result["macs"] == 2_829_238_912


def test_summary_plain_and_input_size(capsys):
    code, out, _ = run(capsys, "summary", "resnet18", "--plain", "--input-size", "1", "64", "64", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["input_size"] == [1, 64, 64] and result["params"] == 11_515_688 - 64 * 2 * 7 * 7
    assert result["model"] == "resnet18 (plain)"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["summary", "resnet5"], "unknown model 'resnet5'; closest: "),
        (["summary", "resnet20", "--input-size", "0"], "--input-size"),
        (["summary", "resnet20", "--input-size", "1", "2", "3", "4"], "--input-size"),
        (["summary", "resnet20", "--num-classes", "-1"], "num_classes"),
        (["list", "nothing*"], "no model matches"),
    ],
)
def test_user_mistakes_exit_2_with_one_clear_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, prog",
    [
        (["study", "lesion", "--depht", "8"], "resnetlab study lesion"),
        (["train", "--no-such-flag", "1"], "resnetlab train"),
        (["summary", "resnet20", "--depht", "8"], "resnetlab summary"),
    ],
)
def test_an_unknown_flag_is_named_by_the_command_that_does_not_know_it(capsys, argv, prog):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith(f"usage: {prog} ")
    assert err.strip().splitlines()[-1] == f"{prog}: error: unrecognized arguments: {' '.join(argv[-2:])}"


def test_list(capsys):
    code, out, _ = run(capsys, "list", "plain2*", "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1]) == {"models": ["plain20"]}


def test_console_entry_point_runs_as_a_module():
    proc = subprocess.run(
        [sys.executable, "-m", "resnetlab", "summary", "resnet20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "269,722" in proc.stdout and "40.6 M" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "resnetlab", "summary"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "required" in bad.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly():
    # `resnetlab list | head -1`: the pipe closes before the listing is written
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnetlab", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["train"], ["--epochs INT", "(default: 30)"]),
        (["eval"], ["which split (default: val)", "images per batch (default: 256)"]),
        (["predict"], ["classes to show per image (default: 5)"]),
        (["export"], ["--format"]),
    ],
)
def test_help_shows_each_default_once(capsys, command, shown):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare the words
    for fragment in shown:
        assert fragment in text
    # One "(default: ...)" per option at most: none repeated, none for a switch that is off.
    options = text.split(" --")
    assert not [o for o in options if o.count("(default") > 1]
    assert "(default: False)" not in text and "(default: None)" not in text
