from pathlib import Path

import pytest
import torch

from stream_lstm.cli import main as cli
from stream_lstm.models.registry import ModelRegistry, load_model

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
NAB = SHARED / "nab" / "machine_temperature_system_failure.csv"
ETTH1 = SHARED / "ett" / "ETTh1.csv"


@pytest.mark.skipif(not NAB.exists(), reason=f"{NAB} not present")
def test_train_on_nab_saves_a_loadable_model_and_reports_val_mae(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAM_LSTM_MODEL_DIR", str(tmp_path / "registry"))
    threads = torch.get_num_threads()
    out = tmp_path / "nab.safetensors"
    rc = cli(["train", "--csv", str(NAB), "--max-rows", "2000", "--out", str(out),
              "--epochs", "1", "--window", "32", "--hidden-size", "8", "--horizon", "4",
              "--quiet", "--registry"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"saved {out}" in text
    assert "validation one-step MAE" in text and "persistence" in text
    # Said in words: "+0.1% vs persistence" left the reader to guess which way the sign went.
    import re

    assert re.search(r"\(\d+\.\d% (better|worse) than persistence\)", text), text
    assert torch.get_num_threads() == threads  # the command restores the thread count

    model, spec, meta = load_model(out)
    assert (spec.hidden_size, spec.horizon, spec.n_features) == (8, 4, 1)
    assert meta["version"].startswith("offline-20") and meta["parent"] is None  # never a registry's vNNNN
    assert meta["training_data"]["first"] == "2013-12-02T21:15:00Z"
    assert meta["training_data"]["rows"] == 1600 and meta["validation_data"]["rows"] == 400
    assert meta["metrics"]["epochs"] == 1
    assert 0 < meta["metrics"]["mae"] < 10 and meta["metrics"]["persistence_mae"] > 0
    assert meta["settings"]["window"] == 32 and meta["settings"]["k1"] > 0
    mu, _, _ = model(torch.zeros(1, 5, 1))
    assert mu.shape == (1, 5, 4)

    reg = ModelRegistry(tmp_path / "registry")
    assert reg.promoted() == "v0001" and reg.load("v0001").spec == spec


def test_train_reports_a_bad_csv_in_one_line(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("timestamp,value\n2014-01-01 00:00:00,1.5\n2014-01-01 00:05:00,oops\n")
    assert cli(["train", "--csv", str(csv), "--out", str(tmp_path / "m")]) == 2
    assert "line 3" in capsys.readouterr().err
    assert cli(["train", "--csv", str(csv), "--column", "temp", "--out", str(tmp_path / "m")]) == 2
    assert "no column 'temp'" in capsys.readouterr().err
    assert cli(["train", "--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m.safetensors").exists()


def test_train_on_a_small_multichannel_csv(tmp_path, capsys):
    rows = ["ts,a,b"] + [f"{1000 + 60 * i},{i % 7},{(i * 3) % 5}" for i in range(120)]
    (tmp_path / "mc.csv").write_text("\n".join(rows) + "\n")
    rc = cli(["train", "--csv", str(tmp_path / "mc.csv"), "--time-column", "ts", "--column", "a",
              "--column", "b", "--target-column", "b", "--out", str(tmp_path / "mc"),
              "--epochs", "1", "--window", "16", "--hidden-size", "4", "--horizon", "2", "--quiet"])
    assert rc == 0
    _, spec, meta = load_model(tmp_path / "mc.safetensors")
    assert (spec.n_features, spec.target_channel) == (2, 1)
    assert meta["training_data"]["first_ts"] == 1000.0
    # What serving it needs, both settings (it named STREAM_LSTM_N_FEATURES only).
    assert ("train: note: the model has 2 channel(s) and forecasts channel 1; serving it needs "
            "STREAM_LSTM_N_FEATURES=2 and STREAM_LSTM_TARGET_CHANNEL=1 (now 1 and 0)") in capsys.readouterr().err


@pytest.mark.skipif(not ETTH1.exists(), reason=f"{ETTH1} not present")
def test_train_on_etth1_without_a_time_column_flag_uses_date(tmp_path, capsys):
    out = tmp_path / "etth1.safetensors"
    rc = cli(["train", "--csv", str(ETTH1), "--column", "OT", "--max-rows", "400", "--out", str(out),
              "--epochs", "1", "--window", "16", "--hidden-size", "4", "--horizon", "2", "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    assert ("train: ETTh1.csv: no column 'timestamp': using 'date', the first column whose values "
            "are times (--time-column names another)\n") in err
    _, _, meta = load_model(out)
    assert meta["source"]["time_column"] == "date"
    assert meta["training_data"]["first"] == "2016-07-01T00:00:00Z"
    assert meta["training_data"]["rows"] == 320 and meta["validation_data"]["rows"] == 80


def test_train_without_a_time_column_says_which_columns_there_are(tmp_path, capsys):
    csv = tmp_path / "dated.csv"
    csv.write_text("day,value\n" + "".join(f"2014-01-{d:02d},{d % 3}\n" for d in range(1, 29)))
    base = ["train", "--csv", str(csv), "--out", str(tmp_path / "m"), "--epochs", "1",
            "--window", "4", "--hidden-size", "4", "--horizon", "1", "--quiet"]
    assert cli(base + ["--time-column", "timestamp"]) == 2  # named: must be there
    assert capsys.readouterr().err == f"train: {csv}: no column 'timestamp' (columns: day, value)\n"
    assert cli(base) == 0
    assert "using 'day'" in capsys.readouterr().err
    assert load_model(tmp_path / "m.safetensors")[2]["source"]["time_column"] == "day"
    csv.write_text("site,value\nnorth,1\nsouth,2\n")
    assert cli(base) == 2
    assert capsys.readouterr().err == (f"train: {csv}: no column 'timestamp', and no column whose "
                                       "values are times (columns: site, value); name one with "
                                       "--time-column\n")


@pytest.mark.parametrize(("options", "said"), [
    (["--hidden-size", "-3"], "--hidden-size (STREAM_LSTM_HIDDEN_SIZE)"),
    (["--k1", "40", "--k2", "8"], "STREAM_LSTM_TBPTT_K2"),
    (["--epochs", "-1"], "--epochs (STREAM_LSTM_MAX_EPOCHS)"),
])
def test_options_are_held_to_the_settings_rules_in_one_line(tmp_path, capsys, options, said):
    # They skipped them: tracebacks, and k2 below k1 or a window of 1 accepted.
    rows = ["timestamp,value"] + [f"{1000 + 60 * i},{i % 7}" for i in range(200)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    assert cli(["train", "--csv", str(tmp_path / "r.csv"), "--out", str(tmp_path / "m"), *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("train: invalid setting") and said in err[0]
    assert not (tmp_path / "m.safetensors").exists()


def test_a_max_rows_window_or_out_that_cannot_be_is_one_line(tmp_path, capsys):
    rows = ["timestamp,value"] + [f"{1000 + 60 * i},{i % 7}" for i in range(200)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    for option, value, said in (("--max-rows", "-5", "must be 1 or more"),  # (it dropped the last 5 rows)
                                ("--window", "1", "must be 2 or more")):
        with pytest.raises(SystemExit) as exit_:  # argparse's own one line
            cli(["train", "--csv", str(tmp_path / "r.csv"), "--out", str(tmp_path / "m"), option, value])
        assert exit_.value.code == 2 and said in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert cli(["train", "--csv", str(tmp_path / "r.csv"), "--out", str(tmp_path / "a-file" / "m")]) == 2
    assert "train: cannot write --out" in capsys.readouterr().err


def test_a_version_that_no_worker_would_load_is_refused_before_training(tmp_path, capsys):
    rows = ["timestamp,value"] + [f"{1000 + 60 * i},{i % 7}" for i in range(200)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    assert cli(["train", "--csv", str(tmp_path / "r.csv"), "--out", str(tmp_path / "m"),
                "--version", "my model"]) == 2
    assert capsys.readouterr().err == ("train: --version 'my model' is not a version name (letters, "
                                       "digits, '.', '_', '-'; at most 64)\n")
    assert not (tmp_path / "m.safetensors").exists()
    assert cli(["train", "--csv", str(tmp_path / "r.csv"), "--out", str(tmp_path / "m"),
                "--version", "v0007"]) == 2  # a registry's numbering (the help says why)
    assert "is a registry's numbering" in capsys.readouterr().err


def test_a_column_named_twice_is_refused(tmp_path, capsys):
    # It trained a two-channel model of one column, which no reading of one channel fits.
    rows = ["timestamp,value"] + [f"{1000 + 60 * i},{i % 7}" for i in range(200)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    assert cli(["train", "--csv", str(tmp_path / "r.csv"), "--out", str(tmp_path / "m"),
                "--column", "value", "--column", "value"]) == 2
    assert capsys.readouterr().err == "train: --column names a column twice (value, value)\n"


def test_sigterm_while_training_says_so_and_saves_nothing(tmp_path):
    """SIGTERM (a pod's stop, `timeout`) ended `train` silently with 143: now as Ctrl-C."""
    import os
    import signal

    from tests.integration.helpers import signal_once_ready

    csv = tmp_path / "r.csv"
    csv.write_text("timestamp,value\n" + "".join(f"{1_700_000_000 + 60 * k},{k % 7}\n" for k in range(4000)))
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_LSTM_")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[2]), STREAM_LSTM_MAX_EPOCHS="1000",
               STREAM_LSTM_EARLY_STOPPING_PATIENCE="1000")
    code, rest = signal_once_ready(["train", "--csv", str(csv), "--out", str(tmp_path / "m.safetensors"),
                                    "--quiet"], env, lambda line: line.startswith("training on"), signal.SIGTERM)
    # (its stderr with the code: one CI run had -2, a SIGINT's death, not reproduced since)
    assert code == 130, rest[-2000:]
    assert rest.strip().splitlines()[-1] == "train: stopped by a signal (Ctrl-C or SIGTERM)", rest[-2000:]
    assert "Traceback" not in rest and not (tmp_path / "m.safetensors").exists()


def test_a_parent_must_be_a_version_name_and_the_registry_alone_is_a_destination(tmp_path, capsys):
    rows = ["timestamp,value"] + [f"{1000 + 60 * i},{i % 7}" for i in range(200)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    base = ["train", "--csv", str(tmp_path / "r.csv"), "--epochs", "1", "--window", "8",
            "--hidden-size", "4", "--quiet", "--model-dir", str(tmp_path / "reg")]
    assert cli([*base, "--registry", "--parent", "../../etc/passwd"]) == 2  # serving.py follows parents
    assert capsys.readouterr().err == "train: --parent '../../etc/passwd' is not a version name\n"
    assert cli(base) == 2  # (--out was required even with --registry: the model got two names)
    assert capsys.readouterr().err == "train: say where the model goes: --out PATH, --registry, or both\n"
    (tmp_path / "adir").mkdir()  # (it wrote adir.safetensors beside it)
    assert cli([*base, "--out", str(tmp_path / "adir")]) == 2
    assert capsys.readouterr().err.startswith(f"train: --out {tmp_path / 'adir'} is a directory")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m2.safetensors").mkdir()  # (a directory where its weights go: failed after training)
    assert cli([*base, "--out", str(tmp_path / "sub" / "m2")]) == 2
    assert capsys.readouterr().err.startswith(f"train: --out {tmp_path / 'sub' / 'm2'} is a directory")
    with pytest.raises(SystemExit):  # (the slash was dropped: newdir.safetensors beside it)
        cli([*base, "--out", f"{tmp_path / 'newdir'}/"])
    assert "names a directory" in capsys.readouterr().err
    assert cli([*base, "--registry", "--parent", "v0003"]) == 0
    said = capsys.readouterr().out
    assert "saved" not in said and f"registered and promoted v0001 in {tmp_path / 'reg'}\n" in said
    reg = ModelRegistry(tmp_path / "reg")
    assert reg.promoted() == "v0001" and reg.load("v0001").meta["parent"] == "v0003"
    assert list(tmp_path.glob("*.safetensors")) == []
    assert cli([*base, "--registry", "--out", str(tmp_path / "m"), "--version", "first"]) == 0
    assert "registered and promoted v0002 in" in (said := capsys.readouterr().out)
    assert said.endswith("(the same weights as m.safetensors, first)\n")


def test_promoting_a_model_of_another_shape_says_what_running_workers_will_do(tmp_path, capsys):
    """Running workers refuse it and keep their model; restarted with the old settings they
    refuse to start (exit 2, again and again under k8s): said nowhere before."""
    rows = ["timestamp,value"] + [f"{1000 + 60 * i},{i % 7}" for i in range(200)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    base = ["train", "--csv", str(tmp_path / "r.csv"), "--epochs", "1", "--window", "8",
            "--hidden-size", "4", "--quiet", "--model-dir", str(tmp_path / "reg"), "--registry"]
    assert cli([*base, "--horizon", "4"]) == 0 and cli([*base, "--horizon", "4"]) == 0
    assert "warning" not in capsys.readouterr().err  # the same shape: nothing to say
    assert cli([*base, "--horizon", "6"]) == 0
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("train: warning: v0003 is not the shape of v0002, which it replaces "
                          "(horizon 4 -> 6): running workers keep serving v0002 and refuse it")
    assert err.rstrip().endswith("To undo: stream-lstm models rollback v0002")


def test_the_registry_must_be_writable_before_the_training_and_model_dir_needs_registry(tmp_path, capsys):
    """`--registry` on a read-only directory trained fully, then failed with a traceback (where
    `--out` was checked first); `--model-dir` without `--registry` was accepted and ignored."""
    import os
    import stat

    if os.geteuid() == 0:  # (root writes anywhere: a file where the directory should be instead)
        blocked = tmp_path / "file"
        blocked.write_text("")
        reg_dir, why = blocked / "reg", "Not a directory"
    else:
        reg_dir = tmp_path / "ro"
        reg_dir.mkdir()
        reg_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
        why = "Permission denied"
    rows = ["timestamp,value"] + [f"{1000 + 60 * i},{i % 7}" for i in range(200)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    base = ["train", "--csv", str(tmp_path / "r.csv"), "--epochs", "1", "--window", "8",
            "--hidden-size", "4"]
    assert cli([*base, "--registry", "--model-dir", str(reg_dir)]) == 2
    out, err = capsys.readouterr()
    assert err == f"train: cannot write --registry {reg_dir}: {why}\n" and "trained" not in out
    assert cli([*base, "--out", str(tmp_path / "m"), "--model-dir", str(tmp_path / "reg")]) == 2
    assert capsys.readouterr().err == ("train: --model-dir is where --registry registers: add "
                                       "--registry, or leave it out\n")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_trained_model_no_worker_would_load_is_not_saved(tmp_path, capsys, monkeypatch):
    """It was saved (and promoted with --registry), then refused by every worker (a review)."""
    from stream_lstm.models import registry

    monkeypatch.setattr(registry, "MAX_WEIGHT", 1e-3)  # (every trained weight is past it)
    rows = ["timestamp,value"] + [f"{1000 + 60 * i},{i % 7}" for i in range(200)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    assert cli(["train", "--csv", str(tmp_path / "r.csv"), "--epochs", "1", "--window", "8",
                "--hidden-size", "4", "--quiet", "--out", str(tmp_path / "m"), "--registry",
                "--model-dir", str(tmp_path / "reg")]) == 2
    err = capsys.readouterr().err
    assert "train: the trained model has a weight of " in err and "past the ±0.001 a worker loads: nothing saved" in err
    assert not (tmp_path / "m.safetensors").exists() and not list((tmp_path / "reg").glob("v*"))
