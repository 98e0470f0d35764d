"""NAB scoring of one file (stream_lstm.tools.nab) against hand-computed values (a corpus and
the threshold optimiser: test_nab_corpus.py).

The hand cases use one 20-row file, one row a minute, with one window over rows 8..12
(width w = 5). Probation: min(floor(0.15 * 20), 750) = 3 rows (0, 1, 2). Standard profile
(tp 1, fp 0.11, fn 1). sigma(y) = 2 / (1 + exp(5 y)) - 1; sigma(-1) = 0.9866143.
"""

import math

import numpy as np
import pytest

from stream_lstm.tools.nab import (
    PROFILES,
    label_rows,
    probation_length,
    scaled_sigmoid,
    score_file,
)

STANDARD = PROFILES["standard"]
TS = np.arange(20) * 60.0
WINDOW = [(8 * 60.0, 12 * 60.0)]                # rows 8..12


def at(*rows: int) -> np.ndarray:
    detections = np.zeros(20, bool)
    detections[list(rows)] = True
    return detections


def test_profiles_are_nabs():
    # config/profiles.json: standard, reward_low_FP_rate (fp doubled), reward_low_FN_rate (fn doubled)
    assert {n: (p.tp, p.fp, p.fn) for n, p in PROFILES.items()} == {
        "standard": (1.0, 0.11, 1.0),
        "reward_low_FP_rate": (1.0, 0.22, 1.0),
        "reward_low_FN_rate": (1.0, 0.11, 2.0)}


def test_scaled_sigmoid_and_probation_length():
    # 2/(1+e^5)-1 = 2/149.41-1 = -0.98661; 2/(1+e^-2.5)-1 = 2/1.0821-1 = 0.84828; y > 3 -> -1
    assert scaled_sigmoid(1.0) == pytest.approx(-0.986614, abs=1e-6)
    assert scaled_sigmoid(-0.5) == pytest.approx(0.848284, abs=1e-6)
    assert scaled_sigmoid(3.0) == pytest.approx(2 / (1 + math.exp(15)) - 1) and scaled_sigmoid(3.01) == -1.0
    # floor(0.15 * 4032) = floor(604.8) = 604; 0.15 * 22695 = 3404 > 0.15 * 5000 = 750
    assert (probation_length(20), probation_length(4032), probation_length(22695)) == (3, 604, 750)


def test_detection_at_the_first_row_of_a_window():
    # position -(12 - 8 + 1)/5 = -1: tp * sigma(-1) / sigma(-1) = exactly tp (NAB scales by sigma(-1))
    fs = score_file(TS, at(8), WINDOW)
    assert fs.raw == pytest.approx(1.0, abs=1e-12)
    assert (fs.windows_hit, fs.windows_missed, fs.false_alerts, fs.tp_rows, fs.fn_rows) == (1, 0, 0, 1, 4)
    # every profile has tp = 1
    assert score_file(TS, at(8), WINDOW, PROFILES["reward_low_FN_rate"]).raw == pytest.approx(1.0)


def test_detection_late_in_a_window():
    # row 12 (the last): position -(12 - 12 + 1)/5 = -0.2; sigma(-0.2) = 2/(1+e^-1)-1 = 0.462117;
    # / 0.986614 = 0.468387
    assert score_file(TS, at(12), WINDOW).raw == pytest.approx(0.468387, abs=1e-6)
    # row 10 (the middle): position -3/5; sigma(-0.6) = 2/(1+e^-3)-1 = 0.905148; / 0.986614 = 0.917429
    assert score_file(TS, at(10), WINDOW).raw == pytest.approx(0.917429, abs=1e-6)


def test_two_detections_in_one_window_count_once_the_earliest():
    # rows 9 (position -0.8: 0.964028 / 0.986614 = 0.977107) and 10 (0.917429): the window is
    # worth its best (earliest) detection only, 0.977107, not the sum 1.894536
    fs = score_file(TS, at(9, 10), WINDOW)
    assert fs.raw == pytest.approx(0.977107, abs=1e-6)
    assert (fs.windows_hit, fs.tp_rows, fs.false_alerts) == (1, 2, 0)


def test_detection_before_the_first_window():
    # row 5: no window before it, so -fp = -0.11; the window is missed: -fn = -1; total -1.11
    fs = score_file(TS, at(5), WINDOW)
    assert fs.raw == pytest.approx(-1.11, abs=1e-12)
    assert (fs.windows_hit, fs.windows_missed, fs.false_alerts) == (0, 1, 1)
    # the low-FP profile doubles fp: -0.22 - 1 = -1.22
    assert score_file(TS, at(5), WINDOW, PROFILES["reward_low_FP_rate"]).raw == pytest.approx(-1.22)


def test_detection_just_after_a_window_and_far_after():
    # row 13: distance (13 - 12)/(5 - 1) = 0.25; sigma(0.25) = 2/(1+e^1.25)-1 = -0.554600;
    # * 0.11 = -0.061006; plus the missed window -1: -1.061006
    assert score_file(TS, at(13), WINDOW).raw == pytest.approx(-1.061006, abs=1e-6)
    # row 19: distance 7/4 = 1.75; sigma(1.75) = 2/(1+e^8.75)-1 = -0.999682; * 0.11 = -0.109965
    assert score_file(TS, at(19), WINDOW).raw == pytest.approx(-1.109965, abs=1e-6)
    # both, with a hit at row 8: 1 - 0.061006 - 0.109965 = 0.829029; two false alerts
    fs = score_file(TS, at(8, 13, 19), WINDOW)
    assert fs.raw == pytest.approx(0.829029, abs=1e-6) and fs.false_alerts == 2


def test_missed_window():
    # no detection: -fn = -1 (standard), -2 (reward_low_FN_rate)
    assert score_file(TS, at(), WINDOW).raw == -1.0
    assert score_file(TS, at(), WINDOW, PROFILES["reward_low_FN_rate"]).raw == -2.0
    fs = score_file(TS, at(), WINDOW)
    # rows 3..19 are scored: 5 in the window (fn_rows), 12 outside (tn_rows)
    assert (fs.windows_missed, fs.fn_rows, fs.tn_rows) == (1, 5, 12)


def test_probationary_rows_do_not_count():
    # row 1 is probationary (rows 0-2): not a false alert; the window is still missed: -1
    fs = score_file(TS, at(1), WINDOW)
    assert (fs.raw, fs.false_alerts) == (-1.0, 0)
    # row 3, the first scored row: -0.11 - 1
    assert score_file(TS, at(3), WINDOW).raw == pytest.approx(-1.11)
    # a window wholly in probation (rows 0..2) is neither hit nor missed, even when detected;
    # a detection after it (row 5) is an FP at distance (5 - 2)/(3 - 1) = 1.5:
    # sigma(1.5) = 2/(1+e^7.5)-1 = -0.998894; * 0.11 = -0.109878
    fs = score_file(TS, at(0, 5), [(0.0, 120.0)])
    assert (fs.windows_hit, fs.windows_missed) == (0, 0)
    assert fs.raw == pytest.approx(-0.109878, abs=1e-6)


def test_window_rows_and_bounds():
    labels = label_rows(TS, WINDOW)
    assert labels.bounds == ((8, 12),) and labels.probation == 3
    assert np.flatnonzero(labels.window >= 0).tolist() == [8, 9, 10, 11, 12]
    # windows between rows: the first row at/after start, the last row up to end
    assert label_rows(TS, [(7.5 * 60, 12.5 * 60)]).bounds == ((8, 12),)
    with pytest.raises(ValueError, match="holds no row"):
        label_rows(TS, [(8.2 * 60, 8.8 * 60)])
