"""The round the forecast stages see (rounds.py)."""

import numpy as np

from stream_lstm import stages
from stream_lstm.rounds import RECALLED, SCORED, Round, between, example_round, pair


def test_a_new_round_has_nothing_recalled_scored_or_prepared():
    r = example_round(np.array([0]), x=1.0, expected_1=np.nan)
    fresh = Round(slots=r.slots, x=r.x, reset=r.reset, mean=r.mean, scale=r.scale, mu=r.mu,
                  change=r.change, along=r.along, pos=r.pos, scored_1=r.scored_1,
                  scored_h=r.scored_h, forecast=r.forecast, b=r.b)
    assert all(np.isnan(getattr(fresh, name)).all() for name in RECALLED + SCORED)
    assert fresh.prepared == {} and fresh.model_1 is None


def test_pair_and_between_keep_the_one_step_and_h_step_columns():
    p = pair(np.array([1.0, 2.0]), np.array([3.0, 4.0], np.float32))
    assert p.dtype == np.float64 and p.tolist() == [[1.0, 3.0], [2.0, 4.0]]
    assert pair(np.array([True]), np.array([False])).dtype == bool
    assert between(p, np.array([0.0, 1.0])).tolist() == p.tolist()


def test_the_stages_module_still_offers_the_round():
    assert stages.Round is Round and stages.example_round is example_round
