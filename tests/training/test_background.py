"""The background trainer ignores SIGINT: its parent (the worker) decides when it stops.

A Ctrl-C in a terminal reaches the whole foreground process group, the trainer child too; it
used to die with a ``KeyboardInterrupt`` traceback (in ``recv_bytes``) while the worker was
still shutting down in order.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from stream_lstm.config import Settings
from stream_lstm.kafka.local_broker import pid_alive
from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.training.background import BackgroundTrainer, encode_job
from stream_lstm.training.retrainer import job_params


def small_job() -> bytes:
    """A one-epoch job on six short sequences."""
    spec = ModelSpec(hidden_size=4, horizon=2)
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(40, 1)).astype(np.float32) for _ in range(6)]
    params = job_params(Settings(trainer="off")) | {"max_epochs": 1, "patience": 1}
    return encode_job(SimpleLSTM.from_spec(spec), spec, {"version": "v1"}, seqs, params)


def promoted_job() -> bytes:
    """A job whose champion is far off (its head's bias at 5): any training beats it, so the
    challenger is promoted and comes back with its metadata."""
    spec = ModelSpec(hidden_size=4, horizon=2)
    rng = np.random.default_rng(1)
    seqs = [rng.normal(size=(40, 1)).astype(np.float32) for _ in range(10)]
    params = job_params(Settings(trainer="off")) | {"max_epochs": 3, "patience": 3, "lr": 0.05}
    champion = SimpleLSTM.from_spec(spec)
    with torch.no_grad():
        champion.head.bias.fill_(5.0)
    return encode_job(champion, spec, {"version": "v1"}, seqs, params)


def test_trainer_survives_sigint_answers_its_job_and_exits_cleanly_on_close(capfd):
    job = small_job()
    trainer = BackgroundTrainer(threads=1)
    try:
        # At once: the child ignores SIGINT from its first instruction (inherited SIG_IGN).
        os.kill(trainer.pid, signal.SIGINT)
        trainer.submit(job)
        os.kill(trainer.pid, signal.SIGINT)  # and while it trains
        result = trainer.wait(timeout=120)
        assert result is not None and result.error is None, result
        assert trainer._proc.is_alive()
        os.kill(trainer.pid, signal.SIGINT)  # and while it waits for the next job (recv_bytes)
        os.kill(trainer.pid, signal.SIGHUP)  # (a closed terminal: its parent stops it in order)
        trainer.submit(job)
        assert trainer.wait(timeout=120) is not None
    finally:
        trainer.close()  # closes the pipe: the child sees EOF and returns
    assert trainer._proc.exitcode == 0  # it ended by itself, not by terminate() or a signal
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_a_hangup_while_the_child_starts_reaches_the_worker_and_not_the_child(monkeypatch):
    """SIGHUP sent to the worker in the milliseconds its child is being started: the worker's
    handler hears it once the child is up, and the child, sent it and SIGINT too (the
    terminal's process group) before its own code ran, lives. (The worker ignored SIGHUP
    meanwhile: a closed terminal's stop was dropped, a review.)"""
    import multiprocessing.process as mp_process

    heard: list[int] = []
    real_start = mp_process.BaseProcess.start

    def start_amid_signals(proc):
        os.kill(os.getpid(), signal.SIGHUP)
        real_start(proc)
        os.kill(proc.pid, signal.SIGHUP)  # the child, before its own code ran
        os.kill(proc.pid, signal.SIGINT)

    monkeypatch.setattr(mp_process.BaseProcess, "start", start_amid_signals)
    before = signal.signal(signal.SIGHUP, lambda sig, _frame: heard.append(sig))
    try:
        trainer = BackgroundTrainer(threads=1)
        for _ in range(100):  # (Python runs a handler between bytecodes: at once, here)
            if heard:
                break
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGHUP, before)
    try:
        assert heard == [signal.SIGHUP]
        monkeypatch.undo()
        trainer.submit(small_job())
        result = trainer.wait(timeout=120)
        assert result is not None and result.error is None, result
    finally:
        trainer.close()
    assert trainer._proc.exitcode == 0


def test_a_stop_while_a_job_runs_ends_the_child_without_a_traceback(capfd):
    """The job done after the parent closed the pipe: its answer had nowhere to go, and a raw
    BrokenPipeError traceback followed the worker's clean stop (a review)."""
    trainer = BackgroundTrainer(threads=1)
    trainer.submit(small_job())
    assert trainer.wait(timeout=120) is not None  # (started: its next job takes a second)
    trainer.submit(small_job())
    trainer.close()  # (waits up to 5 s: the job ends meanwhile)
    assert trainer._proc.exitcode == 0  # ended by itself, not by terminate()
    assert "Traceback" not in capfd.readouterr().err


PARENT = """
import sys, time
import numpy as np
from stream_lstm.config import Settings
from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
from stream_lstm.training.background import BackgroundTrainer, encode_job
from stream_lstm.training.retrainer import job_params
spec = ModelSpec(hidden_size=32, horizon=2)
seqs = [np.random.default_rng(0).normal(size=(400, 1)).astype(np.float32) for _ in range(50)]
params = job_params(Settings(trainer="off")) | {"max_epochs": 10_000, "patience": 10_000}
trainer = BackgroundTrainer(threads=1)
trainer.submit(encode_job(SimpleLSTM.from_spec(spec), spec, {"version": "v1"}, seqs, params))
print(trainer.pid, flush=True)
time.sleep(300)
"""


def test_a_child_whose_parent_is_killed_mid_job_ends_too():
    """A worker killed -9 left its retrain training on for about a minute (a review)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())  # (its job sent)
        assert pid_alive(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(child)


def test_early_stopping_and_the_gate_judge_on_different_devices():
    # The best epoch chosen on the gate's own holdout looks better there than it is: the gate
    # then promoted challengers worse on fresh data. Each has its own devices now.
    from stream_lstm.models.registry import model_from_bytes
    from stream_lstm.training.background import _unframe, run_job

    header, parts = _unframe(run_job(promoted_job()))
    assert header["promote"]
    data = model_from_bytes(parts[0]).meta["training_data"]
    assert (data["devices"], data["validation_devices"], data["holdout_devices"]) == (6, 2, 2)


def test_a_trainer_that_dies_is_a_failed_job_and_a_new_one_takes_the_next():
    """The kernel's OOM killer or a crash ended the child: the worker's next tick raised
    (ConnectionResetError, then BrokenPipeError on the next submit) and the worker stopped, a
    crash loop when the same job kills it every time."""
    job = small_job()
    trainer = BackgroundTrainer(threads=1)
    try:
        first = trainer.pid
        trainer.submit(job)
        os.kill(first, signal.SIGKILL)  # mid-job
        result = trainer.wait(timeout=60)
        assert result is not None and not result.promote and "died (exit code -9)" in result.error
        assert not trainer.busy and trainer.pid != first
        os.kill(trainer.pid, signal.SIGKILL)  # between jobs: the next submit starts another
        trainer._proc.join(timeout=10)
        trainer.submit(job)
        result = trainer.wait(timeout=120)
        assert result is not None and result.error is None, result
    finally:
        trainer.close()


def test_the_dropout_setting_reaches_every_layer_of_a_retrain(monkeypatch):
    """STREAM_LSTM_DROPOUT set only the head's dropout of the copy of the served model: between
    its stacked layers it kept the served model's own (0 for a model built without it)."""
    import stream_lstm.training.tbptt as tbptt
    from stream_lstm.training.background import run_job

    seen, real = [], tbptt.train_tbptt  # (run_job imports it when it runs)

    def spy(model, *args, **kwargs):
        seen.append((model.dropout.p, model.lstm.dropout))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(tbptt, "train_tbptt", spy)
    spec = ModelSpec(hidden_size=4, num_layers=2, horizon=2)  # served: trained without dropout
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(40, 1)).astype(np.float32) for _ in range(6)]
    params = job_params(Settings(trainer="off", dropout=0.3)) | {"max_epochs": 1, "patience": 1}
    run_job(encode_job(SimpleLSTM.from_spec(spec), spec, {"version": "v1"}, seqs, params))
    assert seen == [(0.3, 0.3)]


def test_a_small_fleet_stops_early_on_its_training_loss_never_on_the_gates_holdout(monkeypatch):
    """With fewer than four training devices there is no validation set of their own: the
    holdout the gate judges on chose the best epoch, and its gains were optimistic there."""
    import stream_lstm.training.gate as gate
    import stream_lstm.training.tbptt as tbptt
    from stream_lstm.training.background import run_job

    seen: dict[str, list] = {}
    real_train, real_decide = tbptt.train_tbptt, gate.decide

    def train(model, fit, validation, **kwargs):
        seen["fit"], seen["validation"] = fit, validation
        return real_train(model, fit, validation, **kwargs)

    def decide(champion, challenger, holdout, *args):
        seen["holdout"] = holdout
        return real_decide(champion, challenger, holdout, *args)

    monkeypatch.setattr(tbptt, "train_tbptt", train)
    monkeypatch.setattr(gate, "decide", decide)
    spec = ModelSpec(hidden_size=4, horizon=2)
    seqs = [np.random.default_rng(k).normal(size=(40, 1)).astype(np.float32) for k in range(4)]
    params = job_params(Settings(trainer="off")) | {"max_epochs": 1, "patience": 1}
    run_job(encode_job(SimpleLSTM.from_spec(spec), spec, {"version": "v1"}, seqs, params))
    assert (len(seen["fit"]), len(seen["validation"]), len(seen["holdout"])) == (3, 0, 1)


def test_the_same_job_trains_the_same_challenger_with_dropout_on():
    from stream_lstm.models.registry import model_from_bytes
    from stream_lstm.training.background import _unframe, run_job

    spec = ModelSpec(hidden_size=4, horizon=2)
    rng = np.random.default_rng(1)
    seqs = [rng.normal(size=(40, 1)).astype(np.float32) for _ in range(10)]
    params = job_params(Settings(trainer="off", dropout=0.3)) | {"max_epochs": 2, "patience": 2, "lr": 0.05}
    champion = SimpleLSTM.from_spec(spec)
    with torch.no_grad():
        champion.head.bias.fill_(5.0)  # far off: the challenger is promoted and comes back
    job = encode_job(champion, spec, {"version": "v1"}, seqs, params)
    weights = []
    for _ in range(2):
        header, parts = _unframe(run_job(job))
        assert header["promote"]
        weights.append(model_from_bytes(parts[0]).model.state_dict())
    for name, w in weights[0].items():
        assert torch.equal(w, weights[1][name]), name


def test_a_challenger_no_worker_would_load_is_not_promoted_and_never_ends_the_worker(monkeypatch):
    """A challenger with a weight past the loader's bound (registry.MAX_WEIGHT) came back as a
    promotion, and decoding it in the worker raised ModelLoadError out of its loop: exit 2, at
    every restart as it retrained the same way (a review). The child now says so and keeps it
    out; and a result that does not load is a failed job."""
    from stream_lstm.models.registry import ModelLoadError
    from stream_lstm.training import background
    from stream_lstm.training.background import _unframe, run_job

    monkeypatch.setattr(background, "MAX_WEIGHT", 1e-3)  # (every trained weight is past it)
    header, parts = _unframe(run_job(promoted_job()))
    assert not header["promote"] and parts == []
    assert header["reason"].startswith("a weight of ") and "past ±0.001, what a worker refuses to load" in header["reason"]

    def refused(data):
        raise ModelLoadError("model message: tensor head.weight has NaN, infinite or weights past ±10000")

    monkeypatch.setattr(background, "decode_result", refused)
    trainer = BackgroundTrainer(threads=1)
    try:
        trainer.submit(small_job())
        result = trainer.wait(timeout=120)
        assert result is not None and not result.promote and "weights past ±10000" in result.error
        assert trainer._proc.is_alive()  # the child is fine: the next job goes to it
    finally:
        trainer.close()
