"""Settings: every knob of the service, read from ``STREAM_LSTM_*`` environment variables.

One flat :class:`Settings` object is built once at start-up and passed down. Each field's
environment variable is ``STREAM_LSTM_`` + the field name in upper case, so
``window`` is ``STREAM_LSTM_WINDOW``. An invalid value stops start-up with a message that
names the variable (see :func:`load_settings`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stream_lstm.connection_checks import bootstrap_problem, check_security, topic_problem
from stream_lstm.logs import mask_secrets, url_without_credentials
from stream_lstm.stages import STAGES  # the optional forecast stages by name, in their order

ENV_PREFIX = "STREAM_LSTM_"
# The most devices a worker may hold: the engine packs slot numbers into float32 beside the
# inputs, and float32 holds every integer below 2**24 exactly.
MAX_PACKED_SLOT = 2**24
# Checkpointing one changed device on one core (a review: 260k devices in 56 s at a clean stop):
# what sizes a stop's grace and what a revocation may write (processes.py, partitions.py).
CHECKPOINT_S_PER_DEVICE = 0.25e-3


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the environment variable."""


class Settings(BaseSettings):
    """All settings of stream-lstm. Defaults suit a laptop with the local broker.

    Parameters
    ----------
    **fields
        Any field below by name (a keyword overrides its ``STREAM_LSTM_<NAME>`` variable);
        each field's ``description`` says what it does, and docs/settings.md lists them all
        (:func:`settings_markdown`).

    Examples
    --------
    >>> s = Settings(window=32)
    >>> s.window, s.input_topic
    (32, 'sensor-readings')
    >>> s.changelog_topic_name()
    'stream-lstm-state-changelog'
    >>> str(s.model_dir), str(Settings(group_id="plant-7").state_dir)
    ('stream-lstm/stream-lstm/models', 'stream-lstm/plant-7/state')
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", validate_default=True,
        allow_inf_nan=False,  # (an interval of inf passed its bound, then crashed a start)
    )

    # --- Kafka wiring -------------------------------------------------------------------
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap host:port list")
    input_topic: str = Field("sensor-readings", min_length=1, description="Readings topic")
    output_topic: str = Field("sensor-forecasts", min_length=1, description="Forecasts topic")
    dlq_topic: str = Field("sensor-readings-dlq", min_length=1, description="Dead-letter topic")
    alerts_topic: str = Field("", description="Anomaly alerts topic; empty disables alerts")
    group_id: str = Field("stream-lstm", min_length=1, description="Consumer group id")
    instance_id: str = Field("", description="Stable worker id (transactional id suffix); default: the hostname")
    processing_guarantee: Literal["exactly_once", "at_least_once"] = Field(
        "exactly_once", description="exactly_once: one transaction per commit interval; or at_least_once")
    changelog_topic: str = Field("", description="State changelog; default <group_id>-state-changelog")
    models_topic: str = Field("stream-lstm-models", description="Compacted topic of promoted models")
    topic_partitions: int = Field(4, ge=1, description="Partitions for topics the worker creates")
    replication_factor: int = Field(1, ge=1, description="Replication for topics the worker creates")
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field("none", description=(
        "Producer compression of all the service writes (forecasts, state, alerts, models); the "
        "input may use any codec. kafka-python readers of the topics need the codec's package "
        "(lz4, zstandard, python-snappy; gzip: none). Measured: zstd stores forecasts "
        "2.2-2.5x smaller for ~15% of a backlog's throughput; gzip 2.1-2.5x for ~25% "
        "(docs/benchmarks.md)"))
    poll_max_records: int = Field(2000, ge=1, description="Most readings handled in one batch")
    # At most 10 s: an idle loop turns once a poll, and /healthz calls one unturned for 30 s stuck.
    poll_timeout_ms: int = Field(100, ge=1, le=10_000, description="How long one poll waits for readings")
    checkpoint_interval_s: float = Field(
        30.0, ge=0, description="How often a partition's changed devices write their state to "
        "the changelog; a restore replays the input since then. 0 writes with every commit. "
        "Longer: less state written, more input replayed on restore; the input topic must keep "
        "10 intervals (at least 1 h) of readings")
    # At most 30 s: a transaction stays open this long; the producer's transaction timeout follows.
    commit_interval_ms: int = Field(
        100, ge=0, le=30_000, description="How often the open transaction commits (forecasts, changed "
        "device state, input offsets); 0 commits every poll. Longer: fewer, larger commits and "
        "less state written; forecasts reach read_committed readers up to this much later. "
        "A live poll waits up to this long for a fuller fetch (half of it at-least-once, where "
        "forecasts are readable once sent)")
    max_poll_interval_ms: int = Field(300_000, ge=1000, description="Kafka max.poll.interval.ms")
    session_timeout_ms: int = Field(10_000, ge=1000, description="Kafka session.timeout.ms")

    # --- Kafka security (TLS / SASL); secrets are never logged --------------------------------
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field("PLAINTEXT", description="Kafka security protocol")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(None, description="SASL mechanism (with a SASL_* protocol)")
    sasl_username: str | None = Field(None, description="SASL user name")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")
    sasl_password_file: Path | None = Field(None, description="File holding the SASL password")
    ssl_cafile: Path | None = Field(None, description="PEM file of the CA that signed the broker")
    ssl_certfile: Path | None = Field(None, description="Client certificate (PEM), for mTLS")
    ssl_keyfile: Path | None = Field(None, description="Client private key (PEM), for mTLS")
    ssl_password: SecretStr | None = Field(None, description="Passphrase of an encrypted ssl_keyfile (never logged)")
    ssl_password_file: Path | None = Field(None, description="File holding that passphrase")
    ssl_check_hostname: bool = Field(True, description="Verify the broker host name in TLS")

    # --- Compute --------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the LSTM runs")
    torch_threads: int = Field(0, ge=0, description="Torch intra-op threads for inference; 0=auto (one: the steps are small, and more threads spin; use more processes)")
    processes: int | Literal["auto"] = Field(
        1, description="Worker processes on this host, in the same group (processes.py): a number, "
        "or auto (the usable CPU cores, within a container's CPU limit, at most the input topic's "
        "partitions). Each has its own "
        "instance id <instance>-p<k>, transactional id and state directory <state_dir>/p<k>; "
        "one supervisor serves the metrics and health endpoints. 1: one process, no supervisor")

    # --- Model and per-device state -------------------------------------------------------
    window: int = Field(64, ge=2, description="W: readings kept per device (ring buffer)")
    horizon: int = Field(12, ge=1, description="H: steps ahead forecast for the target channel")
    min_history: int = Field(8, ge=1, description="A device's first forecast is at its reading "
                             "number MIN_HISTORY (the ones before are its warm-up)")
    hidden_size: int = Field(64, ge=1, description="LSTM hidden units")
    num_layers: int = Field(1, ge=1, description="Stacked LSTM layers")
    n_features: int = Field(1, ge=1, description="Channels per reading")
    target_channel: int = Field(0, ge=0, description="Channel that is forecast")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout in training: before the head and between layers")
    model_path: Path | None = Field(None, description="Model file (safetensors) to serve")
    # Defaults under the group id: two deployments started from one directory do not share a
    # registry or a state store (they did with ./models and ./state).
    model_dir: Path | None = Field(
        None, description="Model registry directory; default ./stream-lstm/<group_id>/models")
    max_devices: int = Field(100_000, ge=1, le=MAX_PACKED_SLOT, description="Devices held in memory at most")
    device_ttl_s: float = Field(0.0, ge=0.0, description="Forget devices silent while their partition's input moves on this long (its own time: a pause or a stopped worker adds about one usual gap; more than twice the devices' period; docs/architecture.md); 0=never")
    state_dir: Path | None = Field(
        None, description="Local on-disk state store directory; default ./stream-lstm/<group_id>/state")
    # EWM by default: real sensors drift and change regime, and a Welford scale fitted on an
    # old burst leaves later readings near zero (measured in docs/evaluation.md).
    normalizer: Literal["welford", "ewm"] = Field("ewm", description="Online normalizer")
    normalizer_alpha: float = Field(0.02, gt=0.0, lt=1.0, description="EWM weight of a reading")
    std_floor: float = Field(1e-3, gt=0.0, description="Smallest std used to scale a channel, "
                             "in the devices' units: lower it for sensors that vary by less "
                             "(e.g. 1e-9 for readings in the 1e-6 range)")

    # --- Event-time rules and input limits ---------------------------------------------------
    late_policy: Literal["drop", "dlq"] = Field("drop", description="What happens to late readings")
    max_future_skew_s: float = Field(300.0, gt=0.0, description="ts this far ahead of its Kafka "
                                     "record's timestamp -> DLQ (a replay decides as live did)")
    max_gap_s: float = Field(0.0, ge=0.0, description="Gap that resets h/c; 0 = never reset")
    # At most 900,000: a dead letter carries the reading (up to this many bytes of an oversized
    # one) plus its headers, and must fit a topic at Kafka's default limit of 1 MiB.
    max_message_bytes: int = Field(65_536, ge=64, le=900_000, description="Larger readings -> DLQ "
                                   "unparsed, with their first this many bytes")
    # At most 16,383 characters: 65,532 bytes of UTF-8 at worst, within the snapshot's u16
    # length of the id (a longer one would fail every commit of its partition).
    max_device_id_length: int = Field(128, ge=1, le=16_383, description="Longer device ids -> DLQ")
    # Bounded so that every state column can hold a reading: some are float32 (the drift ring,
    # the experts' history), whose largest value is 3.4e38 (and a reading's square, in the
    # float64 variances, stays finite).
    value_min: float = Field(-1e12, ge=-1e30, description="Physical range: smaller values -> DLQ")
    value_max: float = Field(1e12, le=1e30, description="Physical range: larger values -> DLQ")

    # --- Uncertainty and anomalies ----------------------------------------------------------------
    interval_coverage: float = Field(0.9, gt=0.0, lt=1.0, description="Nominal interval coverage")
    forecast_stages: str = Field(
        ",".join(STAGES),
        description="The per-device corrections of the model's forecast, in this order (stages.py), "
                    f"comma-separated: any of {', '.join(STAGES)}; empty: the model alone")
    interval_adapt_rate: float = Field(
        0.02, gt=0.0, le=1.0,
        description="Step of the calibration stage's per-device interval factor (quantile tracking)")
    blend_rate: float = Field(
        0.005, gt=0.0, le=1.0,
        description="Step of the blend stage's per-device weight of the model's change against persistence")
    expert_rate: float = Field(
        0.1, gt=0.0, le=10.0,
        description="Step of the experts stage's per-device expert weights (experts.py)")
    anomaly_false_alarm_rate: float = Field(
        1e-3, gt=0.0, lt=1.0,
        description="Flag a reading when 1 - anomaly_likelihood is at most this: the fraction of "
                    "a device's ordinary readings flagged, the same on every device")
    alert_hold_s: float = Field(
        3600.0, ge=0.0,
        description="Event-time seconds below the threshold before a device's alert closes")
    alertmanager_url: str = Field(
        "", description="Alertmanager base URL (http[s]://host:9093) that `stream-lstm alert-relay` "
                        "posts the alerts topic's events to")
    anomaly_warmup: int = Field(10, ge=0, description="Readings after a reset never flagged")

    # --- Retraining -------------------------------------------------------------------------
    trainer: Literal["inprocess", "external", "off"] = Field(
        "inprocess", description="Retrain in a background process, follow the models topic, or off"
    )
    retrain_every_readings: int = Field(0, ge=0, description="Retrain after N readings; 0=off")
    retrain_every_s: float = Field(0.0, ge=0.0, description="Retrain every T seconds; 0=off")
    tbptt_k1: int = Field(16, ge=1, description="TBPTT: steps run forward between updates")
    tbptt_k2: int = Field(32, ge=1, description="TBPTT: steps backpropagated through")
    learning_rate: float = Field(1e-3, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0.0, description="Gradient norm clipping")
    max_epochs: int = Field(20, ge=1, description="Epochs per retrain at most")
    train_batch_size: int = Field(16, ge=1, description="Sequences per TBPTT minibatch")
    early_stopping_patience: int = Field(3, ge=1, description="Epochs without gain before stopping")
    promotion_margin: float = Field(0.02, ge=0.0, description="Relative gain a challenger needs")
    train_threads: int = Field(1, ge=1, description="Torch threads the background trainer uses")
    train_nice: int = Field(10, ge=0, le=19, description=(
        "OS priority (nice) of the background trainer: inference keeps the CPU it needs, the "
        "retrain takes what is left; 0 shares the CPU equally"))
    rewarm_slice_ms: float = Field(5.0, gt=0.0, description=(
        "After a hot swap, how long each loop turn re-warms devices still on the older model "
        "(at least one small batch of devices a turn); they step under their own weights "
        "meanwhile"))

    # --- Observability ------------------------------------------------------------------------
    metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics, /healthz")
    metrics_port: int = Field(9108, ge=0, le=65535, description="0 disables the endpoint")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level")

    @field_validator("bootstrap_servers")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        if problem := bootstrap_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("instance_id", "group_id", mode="before")
    @classmethod
    def _names_a_file(cls, value: object) -> object:
        # Both name the state file (<group>-<instance>.sqlite) and Kafka ids: "x/y" put the
        # store in a subdirectory, and an instance id of "   " was taken literally, not as
        # unset (a review). (An empty group id is refused by its minimum length.)
        text = "" if value is None else str(value).strip()
        if text and not re.fullmatch(r"[A-Za-z0-9._-]+", text):
            raise ValueError(f"{value!r}: letters, digits, '.', '_' and '-' only (it names the "
                             "state file and Kafka ids)")
        return text

    @field_validator("processes", mode="before")
    @classmethod
    def _processes(cls, value: object) -> object:
        # One message for both forms, where the union would list a complaint for each.
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{value!r}: give a number of processes (1 or more) or auto")
        return int(text)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: object) -> object:
        # Templating (Helm, ConfigMaps) often renders an unset value as "": as a path that is
        # ".", and an empty password hides the password file: "" is unset where None is default.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        out = {k: None if (isinstance(v, str) and not v.strip() and k in fields
                           and fields[k].default is None) else v for k, v in data.items()}
        if isinstance(level := out.get("log_level"), str):  # logging's names, as users write them
            out["log_level"] = {"WARN": "WARNING"}.get(level.strip().upper(), level.strip().upper())
        return out

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.target_channel >= self.n_features:
            raise ValueError(
                f"target_channel ({self.target_channel}) must be < n_features ({self.n_features})"
            )
        if self.min_history > self.window:
            raise ValueError(f"min_history ({self.min_history}) must be <= window ({self.window})")
        topics = {"input_topic": self.input_topic, "output_topic": self.output_topic,
                  "dlq_topic": self.dlq_topic, "alerts_topic": self.alerts_topic,
                  "changelog_topic": self.changelog_topic_name(), "models_topic": self.models_topic}
        named = [(k, v) for k, v in topics.items() if v]
        for i, (k, v) in enumerate(named):
            if problem := topic_problem(v):  # (the changelog's: <group_id>-state-changelog by default)
                raise ValueError(f"{k} {problem}")
            if clash := [k2 for k2, v2 in named[i + 1:] if v2 == v]:
                # e.g. a DLQ that is the input: each dead letter would be read and dead-lettered
                # again, for ever.
                raise ValueError(f"{k} and {clash[0]} are the same topic ({v!r}): each must be its own")
        check_security(self)
        if self.value_min >= self.value_max:
            raise ValueError("value_min must be < value_max")
        names = self.stage_names
        if list(names) != [n for n in STAGES if n in names] or len(set(names)) != len(names):
            raise ValueError(f"forecast_stages {self.forecast_stages!r}: name each of "
                             f"{', '.join(STAGES)} at most once, in that order")
        # Given, but nothing would read them: a stage left out, the EWM weight under Welford.
        given = self.model_fields_set
        for stage in (STAGES[n] for n in STAGES if n not in names):
            if unread := [k for k in stage.own_settings if k in given]:
                raise ValueError(f"{', '.join(unread)} set but the {stage.name} stage is not in "
                                 f"forecast_stages ({self.forecast_stages!r}): add it, or unset them")
        if self.normalizer == "welford" and "normalizer_alpha" in given:
            raise ValueError("normalizer_alpha set but the normalizer is welford, which weighs every "
                             "reading alike: set STREAM_LSTM_NORMALIZER=ewm to use it, or unset it")
        if self.tbptt_k2 < self.tbptt_k1:
            raise ValueError(f"tbptt_k2 ({self.tbptt_k2}) must be >= tbptt_k1 "
                             f"({self.tbptt_k1}): each update backpropagates through at least "
                             "the steps run since the last one")
        home = Path("stream-lstm") / self.group_id
        if self.model_dir is None:
            self.model_dir = home / "models"
        if self.state_dir is None:
            self.state_dir = home / "state"
        return self

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The forecast stages in order (``STREAM_LSTM_FORECAST_STAGES``)."""
        return tuple(n.strip() for n in self.forecast_stages.split(",") if n.strip())

    def changelog_topic_name(self) -> str:
        """The state changelog topic: set explicitly, or derived from the group id."""
        return self.changelog_topic or f"{self.group_id}-state-changelog"

    def resolved_password(self, kind: Literal["sasl", "ssl"]) -> str | None:
        """``<kind>_password`` from the environment or, failing that, from its file."""
        secret, file = ((self.sasl_password, self.sasl_password_file) if kind == "sasl"
                        else (self.ssl_password, self.ssl_password_file))
        if secret is not None:
            return secret.get_secret_value()
        return file.read_text().strip() if file is not None else None

    def environment(self) -> dict[str, str]:
        """``STREAM_LSTM_*`` variables that give a child process these settings: the ones given
        (set, or changed by ``model_copy``), so what is default stays default there. Passing
        every value made each one given, and the child refused any nothing would read.

        >>> Settings(window=8).model_copy(update={"group_id": "g"}).environment()["STREAM_LSTM_GROUP_ID"]
        'g'
        """
        out = {}
        for name, value in self.model_dump(include=self.model_fields_set).items():
            if value is not None:
                secret = getattr(self, name)
                out[ENV_PREFIX + name.upper()] = secret.get_secret_value() if isinstance(secret, SecretStr) else str(value)
        return out

    def redacted(self) -> dict[str, object]:
        """Settings as a dict that is safe to log: secrets are masked."""
        out: dict[str, object] = {}
        for name, value in self.model_dump().items():
            if "password" in name and value is not None:
                value = "***"
            elif isinstance(value, Path | str):  # (a URL's user:password@ too, whatever it holds)
                value = url_without_credentials(str(value)) if "://" in str(value) else mask_secrets(str(value))
            out[name] = value
        return out


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment; raise :class:`SettingsError` naming the variable.

    >>> import os
    >>> os.environ["STREAM_LSTM_WINDOW"] = "not-a-number"
    >>> try:
    ...     load_settings()
    ... except SettingsError as e:
    ...     print(str(e).splitlines()[0])
    invalid setting STREAM_LSTM_WINDOW: Input should be a valid integer, unable to parse string as an integer
    >>> del os.environ["STREAM_LSTM_WINDOW"]
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc, msg = [str(p) for p in err["loc"]], err["msg"].removeprefix("Value error, ")
            if not loc:  # a rule across settings: each named by its variable, as users set it
                msg = re.sub(r"(?<![\w/.-])[a-z][a-z0-9_]*\b", lambda m: ENV_PREFIX + m[0].upper() if m[0] in Settings.model_fields
                             and ("_" in m[0] or m[0] == "window") else m[0], msg)
            lines.append(f"invalid setting{' ' + ENV_PREFIX + loc[0].upper() if loc else 's'}: {msg}")
        raise SettingsError("\n".join(lines)) from None


def settings_markdown() -> str:
    """A markdown table of every setting: variable, default, meaning (for docs/settings.md)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default is None else str(default)
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | `{shown}` | {field.description or ''} |")
    rows += ["", f"Outside the service's settings: `{ENV_PREFIX}CACHE_DIR`, where `kafka fetch` and `kafka up` "
             "keep the Kafka jars and the local brokers' registry (default `$XDG_CACHE_HOME/stream-lstm`, "
             "else `~/.cache/stream-lstm`)."]
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_markdown())
