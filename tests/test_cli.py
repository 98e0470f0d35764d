"""The command line: a bad setting is one clear line and exit 2, for every command."""

import pytest

from stream_lstm.cli import COMMANDS, main


@pytest.mark.parametrize("command", ["run", "simulate", "evaluate", "trainer", "models"])
def test_a_bad_setting_names_its_variable_and_exits_2(command, monkeypatch, capsys):
    monkeypatch.setenv("STREAM_LSTM_WINDOW", "not-a-number")
    argv = [command] + {"evaluate": ["x.csv"], "models": ["list"]}.get(command, [])
    assert command in COMMANDS
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"{command}: invalid setting STREAM_LSTM_WINDOW")
