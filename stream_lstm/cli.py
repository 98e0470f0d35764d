"""The ``stream-lstm`` command line.

Each command lives in the module that owns its concern and exposes two functions:
``add_arguments(parser)`` and ``main(args) -> int``. Only the chosen command's module is
imported, so ``stream-lstm --help`` answers at once, without loading torch.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

# name -> (module, one-line help). The order is the order of `stream-lstm --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("stream_lstm.tools.demo", "Run everything locally: broker, a fleet (or a CSV replay), the worker, live forecasts"),
    "run": ("stream_lstm.processes", "Run the long-lived forecasting worker (or N of them: --processes)"),
    "kafka": ("stream_lstm.kafka.broker_cli", "Start or stop a local Apache Kafka broker (KRaft, from Maven jars)"),
    "simulate": ("stream_lstm.tools.simulate", "Produce a synthetic sensor fleet into the input topic"),
    "replay": ("stream_lstm.tools.replay", "Replay a real CSV recording into the input topic"),
    "train": ("stream_lstm.training.offline", "Fit an initial model on a CSV and save it (safetensors)"),
    "trainer": ("stream_lstm.training.service", "Run the retrainer as its own process (publishes models)"),
    "alert-relay": ("stream_lstm.relay.service", "Post the alerts topic's events to Prometheus' Alertmanager"),
    "models": ("stream_lstm.models.registry_cli", "List the model registry, or roll back to a version"),
    "bench": ("stream_lstm.tools.bench.cli", "Benchmark throughput, latency and memory against a real broker"),
    "evaluate": ("stream_lstm.tools.evaluate", "Replay recordings through the real pipeline and score forecasts"),
    "gpu-check": ("stream_lstm.tools.gpu_check", "Check and measure the CUDA path (continuity, engine, pipeline, worker)"),
}

# The long-lived commands, which log a misspelt STREAM_LSTM_* variable themselves at start.
SERVICES = frozenset({"up", "run", "trainer", "alert-relay"})

DESCRIPTION = """\
stream-lstm forecasts sensor streams: it reads readings from Kafka, keeps a rolling window,
online normalization and LSTM hidden state per device, runs one batched LSTM step across all
devices per poll, and publishes forecasts (with intervals and anomaly scores).

Settings come from STREAM_LSTM_* environment variables (see the README).
Run `stream-lstm COMMAND --help` for a command's options."""


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-lstm",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def flags_named(message: str, argv: list[str]) -> str:
    """``message`` with each setting the user gave as a flag in ``argv`` named by the flag too,
    beside its variable (a flag overrides the variable of the same name: ``--processes``).

    >>> flags_named("invalid setting STREAM_LSTM_PROCESSES: 'x'", ["run", "--processes", "x"])
    "invalid setting --processes (STREAM_LSTM_PROCESSES): 'x'"
    >>> flags_named("invalid setting STREAM_LSTM_DEVICE_TTL_S: -1", ["run", "--device=cpu"])
    'invalid setting STREAM_LSTM_DEVICE_TTL_S: -1'
    """
    import re

    from stream_lstm.config import ENV_PREFIX, Settings

    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}  # (typed, not defaulted)
    for flag in sorted(given):
        if (name := flag.replace("-", "_")) in Settings.model_fields:
            variable = ENV_PREFIX + name.upper()  # (not a longer variable it begins)
            message = re.sub(rf"{variable}(?![A-Z0-9_])", f"--{flag} ({variable})", message)
    return message


def main(argv: list[str] | None = None) -> int:
    program = argv is None  # (the process's own command line, not a call in-process: tests)
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    previous: dict[int, Any] = {}
    code = 1  # (an error escaping: Python's own exit code for it)
    try:
        # SIGTERM as Ctrl-C: an offline command (train, evaluate, bench) unwinds, stops the
        # local broker it started and says so, where the default ended it silently with 143. A
        # long-lived command's loop installs its own handler (signals.StopOnSignal) over this
        # one. SIGHUP alike (a closed terminal), unless ignored (`nohup`). Ctrl-C too, where
        # Python's own handler has it (not where it is ignored: `cmd &` in a script): that
        # handler remembers nothing, so a Ctrl-C lost where it was raised (signals.py) let the
        # training run to its end. Installed first, before the command's modules load (numpy,
        # torch: up to a second or more): a SIGTERM then ended it by the signal (-15), unsaid.
        from stream_lstm.signals import interrupt_now, stop_signals

        for sig in stop_signals():
            if sig != signal.SIGINT or signal.getsignal(sig) is signal.default_int_handler:
                previous[sig] = signal.getsignal(sig)
                signal.signal(sig, interrupt_now)
        if program:  # (registered first, it runs after every exit function the command registers)
            atexit.register(_ignore_signals, list(previous))
        code = _main(argv, chosen if chosen in COMMANDS else None)
    except KeyboardInterrupt:  # (while the command's modules load, before _main's own: numpy, torch)
        print(f"{chosen if chosen in COMMANDS else 'stream-lstm'}: stopped by a signal (Ctrl-C or "
              "SIGTERM)", file=sys.stderr)
        code = 130
    except SystemExit as exc:  # (argparse: --help, a bad argument)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    finally:
        # The command is done. Restored to the defaults, a second Ctrl-C or SIGTERM soon after
        # the first, landing while the process exits (kafka-python's threads, torch's teardown:
        # tens of ms), ended it by the signal (-2, -15) after its clean stop: it exits now
        # with the command's code instead, and once the last exit function has run, when
        # Python itself would restore the defaults (its modules torn down: no handler of ours
        # can run), the signals are ignored. In-process (tests), the caller's handlers return.
        for sig, handler in previous.items():
            signal.signal(sig, _exit_at_once(code) if program else handler)
    # A KeyboardInterrupt raised inside an exec'd string (a dataclass's or namedtuple's generated
    # code, in an import the signal interrupted) is marked unhandled by CPython, caught or not:
    # under `python -m` it then died by SIGINT at exit (-2), not with this code (1 SIGTERM to
    # `train` in 12). Every eval of a string clears that mark: none escaped here.
    exec("")  # noqa: S102 - (an empty string: clears CPython's mark, runs nothing)
    return code


def _exit_at_once(code: int) -> Callable[[int, object], None]:
    """A stop signal's handler once the command has returned ``code``: exit with it at once."""

    def handler(_signum: int, _frame: object) -> None:
        with contextlib.suppress(Exception):  # (what was written goes out; a write it interrupted may not)
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    return handler


def _ignore_signals(signals: list[int]) -> None:
    """Ignore ``signals`` from here to the process's end (its last exit function): Python keeps
    an ignored signal ignored while it tears its modules down, where it restores any other."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def _main(argv: list[str], chosen: str | None) -> int:
    from stream_lstm.config import SettingsError  # (not at the top: a Ctrl-C here is a stop too)

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and not any(a.startswith("--status-file") for a in argv):
        # The supervisor (STREAM_LSTM_PROCESSES) sets it for its children alone. Inherited (a
        # shell, an image), a missing directory was a traceback at the first metric, and a stale
        # one's files were counted in. Dropped before prometheus_client is imported (it reads it then).
        print(f"{chosen or 'stream-lstm'}: PROMETHEUS_MULTIPROC_DIR is ignored (the supervisor of "
              "STREAM_LSTM_PROCESSES sets its own for its worker processes)", file=sys.stderr)
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]

    args, unknown = build_parser(chosen).parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    if unknown:  # (with the command's usage: argparse said the top level's, `stream-lstm: error`)
        own = argparse.ArgumentParser(prog=f"stream-lstm {args.command}")
        module.add_arguments(own)
        own.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command not in SERVICES:  # (the services log it at start, `up` through its worker)
        from stream_lstm.environment import unknown_variables

        for var in unknown_variables(os.environ):
            print(f"{args.command}: {var} names no setting and is ignored: misspelt? "
                  "(`python -m stream_lstm.config` lists the settings)", file=sys.stderr)
    try:  # (the stop signals' handlers: main's)
        return int(module.main(args) or 0)
    except SettingsError as exc:  # every command reads settings: one clear line, not a traceback
        print(f"{args.command}: {flags_named(str(exc), argv)}", file=sys.stderr)
        return 2  # (a refusal: the supervisor, processes.py, does not restart it)
    except KeyboardInterrupt:  # (a signal before the command's own loop, e.g. while connecting)
        _silence_kafka()
        print(f"{args.command}: stopped by a signal (Ctrl-C or SIGTERM)",
              file=sys.stderr)
        return 130
    except Exception as exc:
        # No broker at the address given, or refused credentials: one line that says where and
        # what to check (clients.py writes it), not kafka-python's traceback. Imported here so
        # `--help` does not load the Kafka client.
        from stream_lstm.checkpointing.store import StateStoreFull
        from stream_lstm.kafka.clients import KafkaConnectError
        from stream_lstm.kafka.jars import BrokerError
        from stream_lstm.models.registry import ModelLoadError

        # No loadable model, or a local broker that cannot be set up (no java, no Maven, the
        # jars not fetched): a restart cannot help.
        if isinstance(exc, ModelLoadError | BrokerError):
            print(f"{args.command}: {exc}", file=sys.stderr)
            return 2
        if (refused := broker_refusal(exc)) is not None:  # a restart cannot help either
            print(f"{args.command}: {refused}", file=sys.stderr)
            return 2
        if not isinstance(exc, KafkaConnectError | StateStoreFull):
            raise
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 3  # the broker, or room on the disk, may come back: restarted, with backoff


def _silence_kafka() -> None:
    """kafka-python's own thread may still log (a failed connect): not after the last line. A
    record that already passed the level check is dropped by the handler, under its lock: one
    written before this returns is written before the last line, none after (1 run in 7 on a
    loaded machine had one after)."""
    logging.getLogger("kafka").setLevel(logging.CRITICAL + 1)
    # (an offline command configures no handler: its records go to logging.lastResort)
    for handler in {*logging.getLogger().handlers, logging.lastResort} - {None}:
        if getattr(handler, "_kafka_silenced", False):  # (main() again in one process: tests)
            continue
        emit = handler.emit

        def quiet(record: logging.LogRecord, emit=emit) -> None:  # noqa: ANN001 - (bound default)
            if not record.name.startswith("kafka"):
                emit(record)

        handler.acquire()
        try:
            handler.emit = quiet  # type: ignore[method-assign]
            handler._kafka_silenced = True  # type: ignore[union-attr]
        finally:
            handler.release()


def broker_refusal(exc: Exception) -> str | None:
    """One line for a broker that refuses what the settings ask (a changelog of another shape,
    more replicas than brokers, a session timeout outside its bounds, its ACLs), naming what to
    change; None for any other error."""
    from kafka import errors

    from stream_lstm.kafka.topics import ChangelogTopicError

    hints = (
        (ChangelogTopicError, ""),
        (errors.InvalidReplicationFactorError, "STREAM_LSTM_REPLICATION_FACTOR is more than the "
         "cluster's brokers"),
        (errors.InvalidSessionTimeoutError, "STREAM_LSTM_SESSION_TIMEOUT_MS is outside the broker's "
         "group.min.session.timeout.ms and group.max.session.timeout.ms (6000 and 1800000 by default)"),
        (errors.AuthorizationError, "the broker's ACLs refuse this principal: grant it the topics, "
         "the group and the transactional ids (README, Security)"),
        (errors.PolicyViolationError, "the cluster's policy refuses the topics' settings"),
        (errors.InvalidConfigurationError, "the broker refuses a setting"),
        (errors.InvalidTopicError, "the broker refuses a topic's name"),
    )
    for kind, hint in hints:
        if isinstance(exc, kind):
            if not hint:
                return str(exc) or type(exc).__name__
            # (kafka-python's text can be mostly the request and response: 700 characters)
            said = str(exc) if len(str(exc)) <= 240 else getattr(exc, "description", "") or str(exc)[:240]
            return f"{hint} ({said})"
    return None


if __name__ == "__main__":
    sys.exit(main())
