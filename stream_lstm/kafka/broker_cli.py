"""``stream-lstm kafka``: start, stop and list local brokers (``local_broker.py``), each recorded
in the registry (``broker_registry.py``) so that ``status`` and ``down`` find them all."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stream_lstm.kafka import broker_registry
from stream_lstm.kafka.jars import KAFKA_VERSION, BrokerError, fetch_jars
from stream_lstm.kafka.local_broker import DEFAULT_PORT, LocalBroker, tcp_port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        f"Run a local single-node Apache Kafka {KAFKA_VERSION} broker (KRaft) on 127.0.0.1 from\n"
        "Maven Central jars, in the background: no Docker needed. Needs java (17+) and mvn.\n"
        "Each broker `up` starts is recorded in <cache>/brokers (<cache>: $STREAM_LSTM_CACHE_DIR,\n"
        "else $XDG_CACHE_HOME/stream-lstm, else ~/.cache/stream-lstm), so `status` and `down`\n"
        "without --port/--data-dir find "
        "every one of them; a broker whose process is gone is forgotten.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n"
                     "  stream-lstm kafka up                  # 127.0.0.1:9092, data in <cache>/broker-9092\n"
                     "  stream-lstm kafka up --port 9093 --data-dir /tmp/k2\n"
                     "  stream-lstm kafka status              # every broker `up` started that runs\n"
                     "  stream-lstm kafka down --port 9093    # just that one\n"
                     "  stream-lstm kafka down                # all of them, naming each")
    parser.add_argument("action", choices=["up", "down", "status", "fetch"],
                        help="up: start one and wait until ready; down: stop every broker `up` "
                             "started (or only the one of --port/--data-dir); status: list them "
                             "(or that one); fetch: the jars only")
    parser.add_argument("--port", type=tcp_port, default=None,
                        help=f"client port (up: default {DEFAULT_PORT}; down/status: only the "
                             "broker on this port)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="storage, config and logs (up: default <cache>/broker-<port>; "
                             "down/status: only the broker of this directory)")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds to wait for the broker to answer (default 90)")


def _running_line(broker: LocalBroker) -> str:
    return (f"Kafka broker running at {broker.bootstrap} (pid {broker.pid}, data: "
            f"{broker.data_dir}, logs: {broker.log_file})")


def _stop(broker: LocalBroker) -> str:
    pid, state = broker.running_pid(), broker.read_state() or {}
    stopped = broker.stop()
    broker_registry.forget_broker(broker)
    if stopped:
        return (f"Kafka broker at {state.get('bootstrap', broker.bootstrap)} stopped (pid {pid}, "
                f"data: {broker.data_dir})")
    return f"no Kafka broker running for {broker.data_dir}{_others(broker)}"


def _others(broker: LocalBroker) -> str:
    """A hint naming the other brokers ``kafka up`` started that run, if any."""
    others = [b.bootstrap for b in broker_registry.started_brokers()[0] if b.data_dir != broker.data_dir]
    return f" (running: {', '.join(others)}; `stream-lstm kafka status` lists them)" if others else ""


def main(args: argparse.Namespace) -> int:
    """Run one action; 0 on success, 1 for `status` with no broker, 2 on errors."""
    port, data_dir = getattr(args, "port", None), getattr(args, "data_dir", None)
    try:
        if args.action == "fetch":
            print(f"Kafka {KAFKA_VERSION} jars in {fetch_jars()}")
        elif args.action in ("down", "status") and port is None and data_dir is None:
            brokers, stale = broker_registry.started_brokers()  # every broker `kafka up` started
            for line in stale:
                print(line)
            if not brokers:
                print("no Kafka broker running (none that `stream-lstm kafka up` started)")
                return 1 if args.action == "status" else 0
            for broker in brokers:
                print(_running_line(broker) if args.action == "status" else _stop(broker))
        elif args.action == "up":
            broker = broker_registry.broker_for(port, data_dir)
            if broker.running_pid() is not None:
                broker.start(args.timeout)  # adopts it and checks that it answers
                if port is not None and broker.port != port:  # (nothing listens on the one asked for)
                    raise BrokerError(f"{broker.data_dir} is the data of the broker running at "
                                      f"{broker.bootstrap}, not on port {port}: give another "
                                      "--data-dir, or leave out --port to use that broker")
                broker_registry.record(broker.port, broker.pid, broker.data_dir)
                print(f"Kafka {KAFKA_VERSION} broker already running at {broker.bootstrap} "
                      f"(pid {broker.pid}, data: {broker.data_dir})")
                return 0
            running, stale = broker_registry.started_brokers()
            for line in stale:  # (forgotten here: said, as `status` says it)
                print(line)
            holder = next((b for b in running if b.port == broker.port), None)
            if holder is not None:  # (start() would say only "in use by another program")
                raise BrokerError(f"port {broker.port} is the broker `kafka up` started with data "
                                  f"{holder.data_dir}: leave out --data-dir to use it, or give "
                                  "another --port")
            stale = broker.read_state()
            if stale:
                print(f"cleaning up after a broker that is gone (pid {stale.get('pid')})")
            broker.start(args.timeout)
            broker_registry.record(broker.port, broker.pid, broker.data_dir)
            print(f"Kafka {KAFKA_VERSION} broker ready at {broker.bootstrap} (pid {broker.pid}, "
                  f"data: {broker.data_dir}, logs: {broker.log_file}); `stream-lstm kafka down "
                  f"--port {broker.port}` stops it")
        elif args.action == "down":
            print(_stop(broker_registry.broker_for(port, data_dir)))
        else:
            broker = broker_registry.broker_for(port, data_dir)
            if broker_registry.adopted(broker) is None:
                print(f"no Kafka broker running for {broker.data_dir}{_others(broker)}")
                return 1
            print(_running_line(broker))
    except BrokerError as exc:
        print(f"stream-lstm kafka {args.action}: {exc}", file=sys.stderr)
        return 2
    return 0
