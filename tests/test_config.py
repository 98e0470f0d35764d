import pytest

from stream_lstm.config import Settings, SettingsError, load_settings, settings_markdown


def test_defaults_and_env_prefix(monkeypatch):
    monkeypatch.setenv("STREAM_LSTM_INPUT_TOPIC", "in")
    monkeypatch.setenv("STREAM_LSTM_DEVICE", "cpu")
    s = load_settings()
    assert s.input_topic == "in" and s.device == "cpu"
    assert s.bootstrap_servers == "127.0.0.1:9092" and s.output_topic == "sensor-forecasts"
    assert s.dlq_topic == "sensor-readings-dlq" and s.group_id == "stream-lstm"
    assert s.metrics_port == 9108 and s.processing_guarantee == "exactly_once"
    assert s.security_protocol == "PLAINTEXT" and s.resolved_password("sasl") is None


def test_only_prefixed_variables_count(monkeypatch):
    monkeypatch.setenv("WINDOW", "5")  # not ours: ignored
    monkeypatch.setenv("stream_lstm_horizon", "3")  # the prefix is case-insensitive
    s = load_settings()
    assert s.window == Settings.model_fields["window"].default and s.horizon == 3


@pytest.mark.parametrize("var,value", [
    ("STREAM_LSTM_DEVICE", "tpu"), ("STREAM_LSTM_METRICS_PORT", "99999"),
    ("STREAM_LSTM_WINDOW", "abc"), ("STREAM_LSTM_PROCESSING_GUARANTEE", "maybe"),
    ("STREAM_LSTM_PROCESSES", "0"), ("STREAM_LSTM_PROCESSES", "many"),
    # 1 makes each reading its own mean with no variance: every z is 0, the model blind.
    ("STREAM_LSTM_NORMALIZER_ALPHA", "1.0"),
    # inf passed the interval's lower bound, then crashed the start with a traceback (a review).
    ("STREAM_LSTM_CHECKPOINT_INTERVAL_S", "inf"), ("STREAM_LSTM_DEVICE_TTL_S", "Infinity"),
])
def test_invalid_value_names_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=var):
        load_settings()


def test_processes_is_a_number_or_auto(monkeypatch):
    assert load_settings().processes == 1
    monkeypatch.setenv("STREAM_LSTM_PROCESSES", "4")
    assert load_settings().processes == 4
    monkeypatch.setenv("STREAM_LSTM_PROCESSES", "Auto")
    assert load_settings().processes == "auto"
    with pytest.raises(SettingsError, match=r"^invalid setting STREAM_LSTM_PROCESSES: .*'-2': "
                       r"give a number of processes \(1 or more\) or auto$"):
        load_settings(processes="-2")


def test_log_level_is_read_in_any_case(monkeypatch):
    monkeypatch.setenv("STREAM_LSTM_LOG_LEVEL", " debug")
    assert load_settings().log_level == "DEBUG"
    monkeypatch.setenv("STREAM_LSTM_LOG_LEVEL", "warn")  # logging's own alias
    assert load_settings().log_level == "WARNING"
    monkeypatch.setenv("STREAM_LSTM_LOG_LEVEL", "chatty")
    with pytest.raises(SettingsError, match=r"^invalid setting STREAM_LSTM_LOG_LEVEL: .*'DEBUG'"):
        load_settings()


def test_inconsistent_settings_are_refused():
    with pytest.raises(SettingsError, match="STREAM_LSTM_TARGET_CHANNEL"):
        load_settings(n_features=2, target_channel=2)
    with pytest.raises(SettingsError, match="STREAM_LSTM_SASL_MECHANISM"):
        load_settings(security_protocol="SASL_SSL")
    with pytest.raises(SettingsError, match=r"STREAM_LSTM_TBPTT_K2 \(8\) must be >= STREAM_LSTM_TBPTT_K1 \(64\)"):
        load_settings(tbptt_k1=64, tbptt_k2=8)


def test_settings_nothing_would_read_are_refused(monkeypatch):
    """A stage's own setting given with the stage left out, or the EWM weight under Welford:
    accepted, they did nothing (a review). Each stage declares its own (stages.py)."""
    with pytest.raises(SettingsError, match="STREAM_LSTM_BLEND_RATE set but the blend stage is not in"):
        load_settings(forecast_stages="experts,calibration", blend_rate=0.9)
    with pytest.raises(SettingsError, match="STREAM_LSTM_EXPERT_RATE set but the experts stage"):
        load_settings(forecast_stages="", expert_rate=5.0)
    monkeypatch.setenv("STREAM_LSTM_INTERVAL_ADAPT_RATE", "0.1")  # (from the environment too)
    with pytest.raises(SettingsError, match="STREAM_LSTM_INTERVAL_ADAPT_RATE set but the calibration stage"):
        load_settings(forecast_stages="blend")
    monkeypatch.delenv("STREAM_LSTM_INTERVAL_ADAPT_RATE")
    with pytest.raises(SettingsError, match="STREAM_LSTM_NORMALIZER_ALPHA set but the normalizer is welford"):
        load_settings(normalizer="welford", normalizer_alpha=0.5)
    assert load_settings(forecast_stages="blend", blend_rate=0.01).blend_rate == 0.01  # (its stage runs)
    assert load_settings(forecast_stages="").expert_rate == 0.1  # (left at its default: fine)


def test_the_instance_id_names_a_file_and_a_transactional_id(monkeypatch):
    with pytest.raises(SettingsError, match="STREAM_LSTM_INSTANCE_ID.*letters, digits"):
        load_settings(instance_id="x/y")
    with pytest.raises(SettingsError, match="STREAM_LSTM_GROUP_ID.*letters, digits"):
        load_settings(group_id="plant/7", changelog_topic="named")  # (named: no derived topic to refuse it)
    monkeypatch.setenv("STREAM_LSTM_INSTANCE_ID", "   ")  # (a template's blank: unset, the hostname)
    assert load_settings().instance_id == ""
    assert load_settings(instance_id=" worker-0.eu_1 ").instance_id == "worker-0.eu_1"


def test_two_roles_on_one_topic_are_refused():
    # A DLQ that is the input would read each dead letter back and dead-letter it again.
    with pytest.raises(SettingsError, match="STREAM_LSTM_INPUT_TOPIC and STREAM_LSTM_DLQ_TOPIC are the same topic"):
        load_settings(dlq_topic="sensor-readings")
    with pytest.raises(SettingsError, match="STREAM_LSTM_OUTPUT_TOPIC and STREAM_LSTM_CHANGELOG_TOPIC"):
        load_settings(output_topic="stream-lstm-state-changelog")
    assert load_settings(alerts_topic="").alerts_topic == ""  # (unset: no alerts)


def test_an_empty_variable_means_unset(tmp_path, monkeypatch):
    # Helm and ConfigMaps render unset values as "": not the path ".", not an empty password
    # that hides the password file.
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    for name in ("MODEL_PATH", "SSL_CAFILE", "STATE_DIR", "SASL_PASSWORD"):
        monkeypatch.setenv(f"STREAM_LSTM_{name}", "")
    monkeypatch.setenv("STREAM_LSTM_SASL_PASSWORD_FILE", str(pw))
    s = load_settings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="svc")
    assert s.model_path is None and s.ssl_cafile is None and s.sasl_password is None
    assert s.state_dir == s.model_dir.parent / "state"  # the default, not "."
    assert s.resolved_password("sasl") == "from-file"


def test_password_file_from_the_environment(tmp_path, monkeypatch):
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    monkeypatch.setenv("STREAM_LSTM_SASL_PASSWORD_FILE", str(f))
    sasl = {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "svc"}
    assert load_settings(**sasl).resolved_password("sasl") == "from-file"
    monkeypatch.setenv("STREAM_LSTM_SASL_PASSWORD", "from-env")  # the variable wins
    s = load_settings(**sasl)
    assert s.resolved_password("sasl") == "from-env"
    assert "from-env" not in str(s.redacted()) and "from-env" not in repr(s)


def test_secrets_masked_and_password_file(tmp_path):
    f = tmp_path / "pw"
    f.write_text("s3cret\n")
    s = Settings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_password_file=f, sasl_username="u")
    assert s.resolved_password("sasl") == "s3cret"
    s2 = Settings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u",
                  sasl_password="hunter2")
    assert "hunter2" not in str(s2.redacted()) and s2.redacted()["sasl_password"] == "***"
    assert "hunter2" not in repr(s2)


def test_every_setting_is_documented():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "settings.md").read_text()
    table = settings_markdown()
    assert table in doc, "docs/settings.md is stale: run python -m stream_lstm.config"
    for name in Settings.model_fields:
        assert f"STREAM_LSTM_{name.upper()}" in doc


def test_every_setting_is_read_by_some_code_path():
    """No setting may be accepted and ignored (STREAM_LSTM_TORCH_THREADS once was): each field
    is read as ``settings.<name>`` or ``s.<name>`` somewhere in the package, or by one of the
    Settings methods other code calls (checks that only validate a value do not count)."""
    import ast
    from pathlib import Path

    package = Path(__file__).parents[1] / "stream_lstm"
    read: set[str] = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if path.name == "config.py":  # only the methods that hand values on
            methods = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                       and n.name in ("changelog_topic_name", "resolved_password", "stage_names")]
            nodes = [a for m in methods for a in ast.walk(m)]
            base_names = {"self"}
        else:
            nodes, base_names = list(ast.walk(tree)), {"settings", "s"}
        for node in nodes:
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                v = node.value
                base = v.id if isinstance(v, ast.Name) else getattr(v, "attr", None)
                if base in base_names:
                    read.add(node.attr)
    unread = sorted(set(Settings.model_fields) - read)
    assert not unread, f"settings accepted but never read: {unread}"


@pytest.mark.parametrize(("name", "value"), [
    ("max_devices", 2**24 + 1),  # slots travel as float32 in the engine
    ("value_max", 1e31),  # over float32 state columns' reach (3.4e38) once forecast
    ("value_min", -1e31),
    ("max_message_bytes", 1_000_000),  # its dead letter must fit a 1 MiB topic
    ("poll_timeout_ms", 20_000),  # an idle worker would look stuck to /healthz
    ("commit_interval_ms", 60_000),  # a transaction open that long risks the broker's abort
    ("max_device_id_length", 16_384),  # the snapshot keeps an id's length in 16 bits
])
def test_limits_the_service_cannot_honour_are_refused_at_start(name, value):
    with pytest.raises(SettingsError, match=f"STREAM_LSTM_{name.upper()}"):
        load_settings(**{name: value})


def test_a_urls_credentials_never_reach_the_logged_settings_and_paths_keep_their_names(tmp_path):
    s = Settings(alertmanager_url="https://relay:s3cret@am.example:9093")
    assert s.redacted()["alertmanager_url"] == "https://***@am.example:9093"
    named = tmp_path / "ssl_cafile"  # a file named like a setting: its path is said as it is
    with pytest.raises(SettingsError, match=f"STREAM_LSTM_SSL_CAFILE cannot be read: {named}$"):
        load_settings(security_protocol="SSL", ssl_cafile=named)


def test_a_childs_environment_carries_what_was_given_and_the_child_accepts_it(monkeypatch):
    """bench's workers and the integration tests' were given every value: each counted as set,
    and a child under FORECAST_STAGES without experts refused the EXPERT_RATE it was handed (a
    review). Defaults stay defaults; secrets keep their values."""
    s = load_settings(forecast_stages="blend,calibration", normalizer="welford", security_protocol="SASL_PLAINTEXT",
                      sasl_mechanism="PLAIN", sasl_username="svc", sasl_password="pw")
    env = s.model_copy(update={"group_id": "child"}).environment()
    assert "STREAM_LSTM_EXPERT_RATE" not in env and "STREAM_LSTM_NORMALIZER_ALPHA" not in env
    assert (env["STREAM_LSTM_GROUP_ID"], env["STREAM_LSTM_SASL_PASSWORD"]) == ("child", "pw")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    child = load_settings()
    assert (child.forecast_stages, child.normalizer, child.group_id) == ("blend,calibration", "welford", "child")
