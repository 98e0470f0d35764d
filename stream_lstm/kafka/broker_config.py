"""What the local broker is configured with: ``server.properties``, log4j2, TLS certificates.

:class:`~stream_lstm.kafka.local_broker.LocalBroker` writes these into its data directory
before it starts the JVM. Kept apart from running the process because they are plain text
and files made once (no JVM involved), and the choices in them (one node, few partitions,
large messages, fast transaction clean-up) are the ones worth reading on their own.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

from stream_lstm.kafka.jars import BrokerError, require_tool

# Root at WARN keeps the file small; a few loggers at INFO say when the broker started, which
# version it is, when it shut down, and which clients failed to authenticate.
LOG4J2 = """\
status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 10MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = FILE
""" + "".join(f"logger.l{i}.name = {name}\nlogger.l{i}.level = INFO\n" for i, name in enumerate([
    "kafka.server.KafkaRaftServer", "kafka.server.BrokerServer",
    "org.apache.kafka.common.utils.AppInfoParser", "org.apache.kafka.common.network.Selector"]))


def server_properties(data_dir: Path, port: int, controller_port: int, *,
                      sasl_port: int | None = None, ssl_port: int | None = None,
                      store_password: str = "") -> str:
    """``server.properties`` of a single-node KRaft broker+controller on 127.0.0.1.

    Parameters
    ----------
    data_dir
        Holds the KRaft storage (``kraft/``) and the TLS keystore (``tls/broker.p12``).
    port, controller_port
        The PLAINTEXT client listener and the controller listener.
    sasl_port
        Opens a SASL_PLAINTEXT listener (SCRAM-SHA-256 and -512) there when given.
    ssl_port, store_password
        Opens an SSL listener there when given, with the keystore made by
        :func:`make_certificates` and its password.

    Examples
    --------
    >>> props = server_properties(Path("/data"), 9092, 9093).splitlines()
    >>> "listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093" in props
    True
    """
    names = {"PLAINTEXT": port}
    if sasl_port is not None:
        names["SASL_PLAINTEXT"] = sasl_port
    if ssl_port is not None:
        names["SSL"] = ssl_port
    advertised = ",".join(f"{n}://127.0.0.1:{p}" for n, p in names.items())
    props: dict[str, object] = {
        "process.roles": "broker,controller", "node.id": 1,
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"{advertised},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": advertised,
        "listener.security.protocol.map": ",".join(f"{n}:{n}" for n in names)
        + ",CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER", "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": data_dir / "kraft",
        # One node: one replica everywhere; few partitions, so that the first consumer
        # group or transaction (which creates an internal topic) is quick on two cores.
        "num.partitions": 4, "default.replication.factor": 1,
        "offsets.topic.replication.factor": 1, "offsets.topic.num.partitions": 4,
        "transaction.state.log.replication.factor": 1, "transaction.state.log.min.isr": 1,
        "transaction.state.log.num.partitions": 4,
        "share.coordinator.state.topic.replication.factor": 1,
        "share.coordinator.state.topic.min.isr": 1,
        "group.initial.rebalance.delay.ms": 0,  # no 3 s wait before the first assignment
        "auto.create.topics.enable": "true", "delete.topic.enable": "true",
        # The changelog and models topics are compacted.
        "log.cleaner.enable": "true", "log.cleaner.backoff.ms": 1000,
        # (The models topic sets its own max.message.bytes: a model is one record.)
        "message.max.bytes": 4194304, "replica.fetch.max.bytes": 4194304,
        # Transactions left open by a killed worker are aborted in seconds, not minutes.
        "transaction.abort.timed.out.transaction.cleanup.interval.ms": 5000,
    }
    if sasl_port is not None:
        jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        props.update({
            "sasl.enabled.mechanisms": "SCRAM-SHA-256,SCRAM-SHA-512",
            "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config": jaas,
            "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": jaas,
            # With the default 100 ms delay the broker closes the connection before the
            # client reads the error response, and a bad password looks like a timeout.
            "connection.failed.authentication.delay.ms": 0})
    if ssl_port is not None:
        props.update({
            "ssl.keystore.type": "PKCS12", "ssl.client.auth": "none",
            "ssl.keystore.location": data_dir / "tls" / "broker.p12",
            "ssl.keystore.password": store_password, "ssl.key.password": store_password})
    return "".join(f"{k}={v}\n" for k, v in props.items())


def make_certificates(tls: Path) -> str:
    """A self-signed CA and a broker certificate for 127.0.0.1/localhost; the store password.

    PEM files for Python clients (``tls/ca.pem``), a PKCS12 keystore for the broker
    (``tls/broker.p12``). Made once per directory and reused, so clients holding ``ca.pem``
    keep working.
    """
    p12, password_file = tls / "broker.p12", tls / "store-password"
    if p12.exists() and password_file.exists() and (tls / "ca.pem").exists():
        return password_file.read_text().strip()
    openssl = require_tool("openssl", "OpenSSL (apt install openssl)")
    shutil.rmtree(tls, ignore_errors=True)
    tls.mkdir(parents=True)
    password = secrets.token_hex(16)
    password_file.write_text(password)
    password_file.chmod(0o600)
    (tls / "broker.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    steps = [  # CA; broker key + request; CA signs it; key + chain into PKCS12
        "req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.pem -subj "
        "/CN=stream-lstm-local-CA -addext basicConstraints=critical,CA:TRUE "
        "-addext keyUsage=critical,keyCertSign,cRLSign",
        "req -newkey rsa:2048 -nodes -keyout broker.key -out broker.csr -subj /CN=localhost",
        "x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 "
        "-out broker.pem -extfile broker.ext",
        "pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem -name broker "
        f"-out broker.p12 -passout pass:{password}",
    ]
    for step in steps:
        result = subprocess.run([openssl, *step.split()], cwd=tls, capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise BrokerError(f"openssl {step.split()[0]} failed:\n{result.stderr[-2000:]}")
    return password
