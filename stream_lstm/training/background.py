"""Retraining in a background process, so inference never waits for it.

The worker hands a *job* (the champion's weights and the fleet's recent normalized windows) to
a child process with its own, capped, torch thread pool. The child trains a challenger from
the champion with TBPTT, runs the promotion gate on held-out devices, and sends back its
decision and, when promoted, the new weights. Jobs and results cross the process boundary as
plain bytes (JSON header + safetensors + raw float32 arrays), never pickles.

>>> from stream_lstm.models.lstm import ModelSpec, SimpleLSTM
>>> import numpy as np
>>> spec = ModelSpec(hidden_size=4, horizon=2)
>>> job = encode_job(SimpleLSTM.from_spec(spec), spec, {"version": "v1"}, [np.zeros((8, 1), np.float32)], {})
>>> champion, seqs, params = decode_job(job)
>>> champion.version, seqs[0].shape
('v1', (8, 1))
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import struct
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_lstm.models.lstm import ModelSpec, SimpleLSTM, largest_weight
from stream_lstm.models.registry import (
    MAX_WEIGHT,
    LoadedModel,
    ModelLoadError,
    model_from_bytes,
    model_to_bytes,
)

log = logging.getLogger("stream_lstm.training")


def _frame(header: dict, *parts: bytes) -> bytes:
    head = json.dumps(header).encode()
    out = [struct.pack("<I", len(head)), head]
    for p in parts:
        out += [struct.pack("<Q", len(p)), p]
    return b"".join(out)


def _unframe(data: bytes) -> tuple[dict, list[bytes]]:
    (n,) = struct.unpack_from("<I", data, 0)
    header = json.loads(data[4 : 4 + n])
    pos, parts = 4 + n, []
    while pos < len(data):
        (m,) = struct.unpack_from("<Q", data, pos)
        parts.append(data[pos + 8 : pos + 8 + m])
        pos += 8 + m
    return header, parts


def encode_job(champion: SimpleLSTM, spec: ModelSpec, meta: dict, seqs: list[np.ndarray],
               params: dict[str, Any]) -> bytes:
    shapes = [list(s.shape) for s in seqs]
    data = b"".join(np.ascontiguousarray(s, np.float32).tobytes() for s in seqs)
    return _frame({"params": params, "shapes": shapes}, model_to_bytes(champion, spec, meta), data)


def decode_job(data: bytes) -> tuple[LoadedModel, list[np.ndarray], dict[str, Any]]:
    header, (model_bytes, arrays) = _unframe(data)
    seqs, pos = [], 0
    for shape in header["shapes"]:
        n = int(np.prod(shape))
        seqs.append(np.frombuffer(arrays, np.float32, n, pos).reshape(shape).copy())
        pos += 4 * n
    return model_from_bytes(model_bytes), seqs, header["params"]


@dataclass
class RetrainResult:
    """What a retraining job sent back (:func:`decode_result`).

    Parameters
    ----------
    promote, reason
        The promotion gate's decision and why.
    champion_error, challenger_error
        Both models' error on the held-out devices.
    seconds, train_loss
        The job's wall time and the challenger's last training loss.
    model
        The challenger's weights, when promoted.
    error
        What went wrong, when the job failed.

    Examples
    --------
    >>> r = RetrainResult(promote=False, reason="challenger does not beat champion",
    ...                   champion_error=0.40, challenger_error=0.42, seconds=12.5, train_loss=0.9)
    >>> r.promote, r.model is None, r.error is None  # no weights travel back when not promoted
    (False, True, True)
    """

    promote: bool
    reason: str
    champion_error: float
    challenger_error: float
    seconds: float
    train_loss: float
    model: LoadedModel | None = None
    error: str | None = None


def run_job(data: bytes) -> bytes:
    """Train a challenger and gate it (runs in the child process)."""
    import copy

    import torch

    from stream_lstm.training.data import split_holdout
    from stream_lstm.training.gate import decide
    from stream_lstm.training.tbptt import train_tbptt

    t0 = time.monotonic()
    champion, seqs, p = decode_job(data)
    seed = int(p.get("seed", 0))
    torch.manual_seed(seed)  # dropout's masks: the same job trains the same challenger
    train, holdout = split_holdout(seqs, 0.2)
    # Early stopping picks the challenger's best epoch on sequences of its own, never on the
    # gate's holdout: chosen there, the best of ~20 epochs looked better than it is, and small
    # fleets promoted challengers that were worse on fresh data (7 of 7 promotions in one
    # study). Too few devices for a validation set of their own: the training loss decides.
    fit, validation = split_holdout(train, 0.2) if len(train) >= 4 else (train, [])
    challenger = copy.deepcopy(champion.model)
    # The setting's dropout, between layers too: the champion's spec (a model file, the
    # registry) may have been trained with another, and the copy carries it.
    challenger.set_dropout(float(p.get("dropout") or 0.0))
    result = train_tbptt(challenger, fit, validation, k1=p["k1"], k2=p["k2"], lr=p["lr"],
                         weight_decay=p["weight_decay"], grad_clip=p["grad_clip"],
                         max_epochs=p["max_epochs"], patience=p["patience"],
                         batch_size=int(p.get("batch_size", 16)),
                         target=champion.spec.target_channel, seed=seed)
    challenger.set_dropout(0.0)
    decision = decide(champion.model, challenger, holdout, p["margin"], champion.spec.target_channel)
    header = {"promote": decision.promote, "reason": decision.reason,
              "champion_error": decision.champion_error, "challenger_error": decision.challenger_error,
              "seconds": time.monotonic() - t0,
              "train_loss": result.train_losses[-1] if result.train_losses else float("nan")}
    largest = largest_weight(challenger)
    if decision.promote and not largest <= MAX_WEIGHT:  # (what no worker would load: said, kept out)
        header |= {"promote": False, "reason": f"a weight of {largest:.3g} is past ±{MAX_WEIGHT:g}, "
                   "what a worker refuses to load"}
    if not header["promote"]:
        return _frame(header)
    meta = {"parent": champion.version, "metrics": {"mae": decision.challenger_error,
            "champion_error": decision.champion_error, "epochs": result.epochs},
            "training_data": {"devices": len(fit), "validation_devices": len(validation),
                              "holdout_devices": len(holdout),
                              "first_ts": p.get("first_ts"), "last_ts": p.get("last_ts")},
            "settings": p}
    return _frame(header, model_to_bytes(challenger, champion.spec, meta))


def decode_result(data: bytes) -> RetrainResult:
    header, parts = _unframe(data)
    model = model_from_bytes(parts[0]) if parts else None
    return RetrainResult(header.get("promote", False), header.get("reason", ""),
                         header.get("champion_error", float("nan")),
                         header.get("challenger_error", float("nan")),
                         header.get("seconds", 0.0), header.get("train_loss", float("nan")),
                         model, header.get("error"))


def _serve(conn: Any, threads: int, nice: int = 0, parent: int | None = None) -> None:  # the child process
    # The parent decides when this process stops (it closes the pipe: EOF below). A Ctrl-C in
    # the terminal reaches the whole foreground process group, this child too; ignoring it
    # keeps it from dying mid-job with a KeyboardInterrupt traceback while the worker shuts
    # down in order. (Ignored or blocked until here: see BackgroundTrainer._start.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (a closed terminal: the parent stops it in order)
    # Below the worker's priority: on a busy machine the scheduler gives inference the CPU
    # first, and the retrain what is left (docs/benchmarks.md: retrain_ratio).
    if nice:
        os.nice(nice)
    import torch

    torch.set_num_threads(threads)
    threading.Thread(target=_end_with, args=(parent or os.getppid(),), name="parent-watch", daemon=True).start()
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        try:
            out = run_job(data)
        except Exception as exc:  # noqa: BLE001 - report, never die silently
            out = _frame({"promote": False, "reason": "training failed",
                          "error": f"{exc!r}\n{traceback.format_exc()[-2000:]}"})
        try:
            conn.send_bytes(out)
        except OSError:  # the parent stopped meanwhile and closed the pipe: nothing to say
            return       # (it printed a BrokenPipeError traceback after a clean stop, a review)


def _end_with(parent: int) -> None:
    """End this process once ``parent`` is gone (even before it looked): killed -9 mid-job, its
    retrain ran on for a minute at full CPU (the pipe's EOF is read only between jobs; a review)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


class BackgroundTrainer:
    """A child process that runs one retraining job at a time.

    Parameters
    ----------
    threads
        Torch threads the child may use (``STREAM_LSTM_TRAIN_THREADS``).
    nice
        How much lower than the worker the child runs (``STREAM_LSTM_TRAIN_NICE``).

    Example: see tests/training/test_background.py::test_trainer_survives_sigint_answers_its_job_and_exits_cleanly_on_close
    """

    def __init__(self, threads: int = 1, nice: int = 0) -> None:
        self._threads, self._nice = threads, nice
        self._start()
        self.busy = False
        self.started_at = 0.0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited torch/Kafka state
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self._threads, self._nice, os.getpid()),
                                 name="stream-lstm-trainer", daemon=True)
        # Neither SIGINT nor SIGHUP may kill the fresh interpreter before _serve ignores them (a
        # Ctrl-C or a closed terminal reaches the whole process group). SIGHUP is blocked in
        # this thread across the fork+exec: the child inherits the mask, and one sent to the
        # worker meanwhile waits and reaches its handler (ignoring it here dropped a closed
        # terminal's stop, a review). A blocked SIGINT did not keep the child
        # alive here (tests/training/test_background.py's SIGINT right after the start killed
        # it), so SIGINT is ignored across it instead (kept from the first instruction: Python
        # installs its KeyboardInterrupt handler only over the default); a Ctrl-C in those
        # milliseconds is not heard, the next one is. Handlers can only be changed in the main thread;
        # elsewhere _serve's own call applies.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self._proc.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()

    def _restart(self) -> str:
        """The child is gone (the kernel's OOM killer, a crash): a new one takes the next job.
        Returns how the old one ended, for the failed job's error."""
        self._conn.close()
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        log.warning("the retraining process died; a new one takes the next job", extra={"exit_code": code})
        self._start()
        return f"the retraining process died (exit code {code})"

    @property
    def pid(self) -> int | None:
        """The child process's id."""
        return self._proc.pid

    def submit(self, job: bytes) -> None:
        assert not self.busy, "one retraining job at a time"
        try:
            self._conn.send_bytes(job)
        except OSError:  # (BrokenPipeError) it died between jobs: a new one takes this one
            self._restart()
            self._conn.send_bytes(job)
        self.busy = True
        self.started_at = time.monotonic()

    def poll(self) -> RetrainResult | None:
        """The finished job's result, or ``None`` while it runs (never blocks). A child that
        died is a failed job (a closed pipe reads as ready), and a new child is started."""
        if not self.busy or not self._conn.poll():
            return None
        self.busy = False
        try:
            return decode_result(self._conn.recv_bytes())
        except (EOFError, OSError):
            error = self._restart()
        except ModelLoadError as exc:  # (a model the child sent that does not load: a failed job,
            error = str(exc)           # not the worker's end with exit 2)
        return RetrainResult(False, "training failed", float("nan"), float("nan"),
                             time.monotonic() - self.started_at, float("nan"), error=error)

    def wait(self, timeout: float) -> RetrainResult | None:
        if self.busy and self._conn.poll(timeout):
            return self.poll()
        return None

    def close(self) -> None:
        self._conn.close()
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.terminate()
