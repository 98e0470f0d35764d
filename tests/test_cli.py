"""The command line: a bad setting is one clear line and exit 2, for every command."""

import signal

import pytest

from stream_lstm.cli import COMMANDS, main
from stream_lstm.kafka.local_broker import free_port


@pytest.mark.parametrize("command", ["run", "simulate", "evaluate", "trainer", "models"])
def test_a_bad_setting_names_its_variable_and_exits_2(command, monkeypatch, capsys):
    monkeypatch.setenv("STREAM_LSTM_WINDOW", "not-a-number")
    argv = [command] + {"evaluate": ["x.csv"], "models": ["list"]}.get(command, [])
    assert command in COMMANDS
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"{command}: invalid setting STREAM_LSTM_WINDOW")


def test_a_bad_flag_is_named_as_the_flag_the_user_gave(monkeypatch, capsys):
    # `run --processes foo` named only STREAM_LSTM_PROCESSES, a variable the user never set.
    assert main(["run", "--processes", "foo"]) == 2
    assert capsys.readouterr().err.strip() == (
        "run: invalid setting --processes (STREAM_LSTM_PROCESSES): 'foo': give a number of "
        "processes (1 or more) or auto")
    monkeypatch.setenv("STREAM_LSTM_PROCESSES", "foo")  # the variable alone: named alone
    assert main(["run"]) == 2
    assert capsys.readouterr().err.startswith("run: invalid setting STREAM_LSTM_PROCESSES: 'foo'")


def test_an_unknown_flag_is_refused_with_the_commands_own_usage(capsys):
    # `replay --csv x` said the top level's usage and `stream-lstm: error` (a review).
    with pytest.raises(SystemExit) as exit_:
        main(["replay", "--csv", "x.csv"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: stream-lstm replay" in err
    assert "stream-lstm replay: error: unrecognized arguments: --csv\n" in err


def test_an_offline_command_says_a_misspelt_variable_is_ignored(monkeypatch, capsys, tmp_path):
    # `train` read STREAM_LSTM_WINDOWS=32 silently and trained with W=64.
    monkeypatch.setenv("STREAM_LSTM_WINDOWS", "32")
    monkeypatch.setenv("STREAM_LSTM_MODEL_DIR", str(tmp_path))
    assert main(["models", "list"]) == 0
    assert "models: STREAM_LSTM_WINDOWS names no setting and is ignored: misspelt?" in capsys.readouterr().err


def test_no_broker_at_the_address_is_one_clear_line_and_exit_3(monkeypatch, capsys, tmp_path):
    """Exit 3, not 2: the broker may come back, so a supervisor restarts it (processes.py)."""
    port = free_port()  # a port with nothing listening
    for name, value in {"BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "METRICS_PORT": "0",
                        "STATE_DIR": str(tmp_path / "state"),
                        "MODEL_DIR": str(tmp_path / "models")}.items():
        monkeypatch.setenv(f"STREAM_LSTM_{name}", value)
    assert main(["run"]) == 3
    err = capsys.readouterr().err.strip().splitlines()  # the JSON log lines, then this one
    assert err[-1:] == [f"run: cannot connect to Kafka at 127.0.0.1:{port} over PLAINTEXT: "
                   f"KafkaTimeoutError: Unable to bootstrap from ['127.0.0.1:{port}']; "
                   "is the broker running and reachable?"]
    assert not any("Traceback" in line for line in err)
    # Its state store is left as it was, marked clean: the next start (the supervisor's retry
    # during an outage) does not wipe it and restore everything from the changelog.
    from stream_lstm.checkpointing.store import StateStore

    (path,) = [p for p in (tmp_path / "state").rglob("*") if p.suffix in (".db", ".sqlite")]
    store = StateStore(path)
    try:
        assert store.opened_clean
    finally:
        store.close(clean=True)


def test_a_model_that_cannot_be_loaded_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    """A refusal (exit 2): no restart can load it, and the supervisor stops (processes.py)."""
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"\x00" * 64)
    for name, value in {"MODEL_PATH": str(bad), "METRICS_PORT": "0", "BOOTSTRAP_SERVERS": "127.0.0.1:1",
                        "STATE_DIR": str(tmp_path / "state")}.items():
        monkeypatch.setenv(f"STREAM_LSTM_{name}", value)
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("run: ") and not any("Traceback" in line for line in err)


@pytest.mark.kafka
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "value", "said"), [
    ("REPLICATION_FACTOR", "3", "STREAM_LSTM_REPLICATION_FACTOR is more than the cluster's brokers"),
    ("SESSION_TIMEOUT_MS", "2000", "STREAM_LSTM_SESSION_TIMEOUT_MS is outside the broker's"),
])
def test_a_setting_the_broker_refuses_is_one_line_naming_it_and_exit_2(
        name, value, said, bootstrap, topic_name, monkeypatch, capsys, tmp_path):
    """Was kafka-python's traceback and exit 1, which a supervisor restarts for ever."""
    for key, v in {"BOOTSTRAP_SERVERS": bootstrap, "METRICS_PORT": "0", "INPUT_TOPIC": topic_name,
                   "OUTPUT_TOPIC": f"{topic_name}-out", "DLQ_TOPIC": f"{topic_name}-dlq",
                   "GROUP_ID": f"{topic_name}-g", "STATE_DIR": str(tmp_path / "state"),
                   "MODEL_DIR": str(tmp_path / "models"), name: value}.items():
        monkeypatch.setenv(f"STREAM_LSTM_{key}", v)
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("run: ") and said in err[-1]
    assert len(err[-1]) < 400  # (was 704 characters, mostly kafka-python's request and response)
    assert not any("Traceback" in line for line in err)
    # Its store holds only committed state: closed clean, not rebuilt from the changelog at the
    # next start (refused at its first join, the worker closed it unclean).
    from stream_lstm.checkpointing.store import StateStore

    (store,) = (tmp_path / "state").glob("*.sqlite")
    assert StateStore(store).opened_clean


def test_a_signal_while_connecting_says_so_and_exits_130(tmp_path):
    """It exited 130 without a word: a user could not tell a stop from a crash."""
    import os
    import signal
    from pathlib import Path

    from tests.integration.helpers import signal_once_ready

    port = free_port()  # a port with nothing listening: kafka-python waits ~30 s
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_LSTM_")}
    env.update(STREAM_LSTM_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}", STREAM_LSTM_METRICS_PORT="0",
               STREAM_LSTM_STATE_DIR=str(tmp_path / "state"), STREAM_LSTM_MODEL_DIR=str(tmp_path / "m"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    # (until kafka-python says it is trying the address)
    code, rest = signal_once_ready(["run"], env, lambda line: "ECONNREFUSED" in line or "Connection refused" in line,
                                   signal.SIGINT)
    assert code == 130
    assert rest.strip().splitlines()[-1] == "run: stopped by a signal (Ctrl-C or SIGTERM)", rest[-2000:]
    assert "Traceback" not in rest


def test_a_ctrl_c_while_the_commands_modules_load_is_a_stop_not_a_traceback(monkeypatch, capsys):
    """At 0.5 s (numpy, torch loading) it was a KeyboardInterrupt traceback, exit 130."""
    from stream_lstm import cli

    def interrupted(chosen):
        raise KeyboardInterrupt  # as the signal lands inside an import

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["run"]) == 130
    assert capsys.readouterr().err == "run: stopped by a signal (Ctrl-C or SIGTERM)\n"


def test_a_stop_signal_heard_inside_an_exec_still_exits_130_not_by_sigint(tmp_path):
    """SIGTERM to `train` ended it "killed by SIGINT" (-2) about one time in twelve, after its
    "stopped by a signal" line (strace: SIGTERM, then the process's own kill(SIGINT)). The
    KeyboardInterrupt had been raised inside an exec'd string (a dataclass's generated methods,
    an import during training): CPython then marks it unhandled (run_eval_code_obj), though the
    command line caught it, and dies by SIGINT at exit. Here the signal comes inside exec."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = tmp_path / "stop_in_exec.py"  # run with `python -m`, as the supervisor starts its workers
    script.write_text(textwrap.dedent("""
        import sys, types
        from stream_lstm import cli
        command = types.ModuleType("stop_in_exec_command")
        command.add_arguments = lambda parser: None
        def main(args):
            exec("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")  # heard in there
            raise AssertionError("the signal was not heard")
        command.main = main
        sys.modules[command.__name__] = command
        cli.COMMANDS["train"] = (command.__name__, "stands in for train")
        sys.exit(cli.main(["train"]))
    """))
    env = {"PYTHONPATH": f"{Path(__file__).resolve().parents[1]}:{tmp_path}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "stop_in_exec"], env=env, capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "train: stopped by a signal (Ctrl-C or SIGTERM)", done.stderr
    assert done.returncode == 130, done.stderr


def test_a_sigterm_while_the_commands_modules_load_is_a_stop_not_death_by_the_signal(tmp_path):
    """SIGTERM in the first second of `simulate` (numpy, kafka, torch loading) ended it by the
    signal (-15) without a word: the handler came after the command's module was imported. Here
    that import waits until the signal has come (a pipe it reads from)."""
    import signal
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    (tmp_path / "slow_command.py").write_text(textwrap.dedent("""
        import sys
        sys.stderr.write("loading\\n")
        sys.stderr.flush()
        sys.stdin.read()  # (the signal comes while it waits here)
        raise AssertionError("the signal was not heard")
    """))
    (tmp_path / "start_slow.py").write_text(textwrap.dedent("""
        import sys
        from stream_lstm import cli
        cli.COMMANDS["train"] = ("slow_command", "stands in for train")
        sys.exit(cli.main(["train"]))
    """))
    env = {"PYTHONPATH": f"{Path(__file__).resolve().parents[1]}:{tmp_path}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "start_slow"], env=env, stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline() == "loading\n"
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, err
        assert err.strip().splitlines()[-1] == "train: stopped by a signal (Ctrl-C or SIGTERM)", err
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("moment", ["exit functions", "teardown"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_while_the_process_exits_leaves_the_commands_code(tmp_path, sig, moment):
    """A second Ctrl-C 50 ms after the first to `simulate` (or `replay`), once it had stopped
    cleanly and said what it sent, ended it by SIGINT (-2; SIGTERM: -15): it came while the
    process exited, the handlers back to Python's defaults. Here the process waits on a pipe
    after main() has returned: in an exit function (kafka-python's threads and exit functions
    run then), or while Python tears its modules down (torch's), where Python itself restores
    the default handlers."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    (tmp_path / "done_command.py").write_text(textwrap.dedent("""
        add_arguments = lambda parser: None
        main = lambda args: 0
    """))
    (tmp_path / "exit_slowly.py").write_text(textwrap.dedent("""
        import atexit, os, sys
        from stream_lstm import cli
        cli.COMMANDS["train"] = ("done_command", "stands in for train")

        def wait(os=os):  # (the signal comes while it waits here)
            os.write(2, b"exiting\\n")
            os.read(0, 1)

        class TornDown:  # (freed with this module, once Python has begun tearing modules down)
            def __del__(self, wait=wait):
                wait()

        sys.argv = ["stream-lstm", "train"]
        if os.environ["MOMENT"] == "teardown":
            sys.modules["torn_down"] = type(sys)("torn_down")
            sys.modules["torn_down"].held = TornDown()
        code = cli.main()
        if os.environ["MOMENT"] == "exit functions":
            atexit.register(wait)
        sys.exit(code)
    """))
    env = {"PYTHONPATH": f"{Path(__file__).resolve().parents[1]}:{tmp_path}", "PATH": "/usr/bin:/bin",
           "MOMENT": moment}
    proc = subprocess.Popen([sys.executable, "-m", "exit_slowly"], env=env, stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline() == "exiting\n"
        proc.send_signal(sig)
        proc.stdin.close()  # (what it waits on ends: exit on, if the signal was ignored)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, err
        assert "Traceback" not in err, err
    finally:
        proc.kill()
        proc.wait()


def test_a_ctrl_c_lost_where_it_was_raised_is_heard_between_training_steps(monkeypatch, capsys):
    """SIGTERM's KeyboardInterrupt, when lost (cleared by C code that probed a torch module's
    __getattr__), is raised again between training chunks (signals.raise_if_interrupted); a
    Ctrl-C's was not: SIGINT kept Python's own handler, which remembers nothing, so a lost
    Ctrl-C let `train` (or evaluate's training) run to its end."""
    import signal
    import types

    from stream_lstm import signals

    monkeypatch.setattr(signals, "_interrupted", False)
    command = types.ModuleType("lost_ctrl_c_command")
    command.add_arguments = lambda parser: None
    steps = []

    def train(args):
        try:
            signal.raise_signal(signal.SIGINT)  # lost where it was raised, as C code may
        except KeyboardInterrupt:
            pass
        for _ in range(3):  # the training's chunks
            signals.raise_if_interrupted()
            steps.append(1)
        return 0

    command.main = train
    monkeypatch.setitem(__import__("sys").modules, command.__name__, command)
    monkeypatch.setitem(COMMANDS, "train", (command.__name__, "stands in for train"))
    assert main(["train"]) == 130 and steps == []
    assert capsys.readouterr().err.strip().splitlines()[-1] == "train: stopped by a signal (Ctrl-C or SIGTERM)"
