import numpy as np

from stream_lstm.state.window import RollingWindow


def test_ring_keeps_last_w_in_order_and_right_aligns():
    win = RollingWindow(capacity=3, size=4, n_features=1)
    for v in range(1, 7):  # slot 0 gets 1..6, slot 2 gets 1..2 only
        win.push(np.array([0]), np.array([[v]], np.float32))
        if v <= 2:
            win.push(np.array([2]), np.array([[v * 10]], np.float32))
    assert win.ordered(0)[:, 0].tolist() == [3, 4, 5, 6]
    assert win.ordered(1).shape == (0, 1)
    data, lengths = win.right_aligned(np.array([0, 1, 2]))
    assert lengths.tolist() == [4, 0, 2]
    assert data[0, :, 0].tolist() == [3, 4, 5, 6]
    assert data[2, :, 0].tolist() == [0, 0, 10, 20]
    assert data[1, :, 0].tolist() == [0, 0, 0, 0]


def test_load_and_grow_keep_contents():
    win = RollingWindow(capacity=1, size=3, n_features=2)
    win.load(0, np.arange(10, dtype=np.float32).reshape(5, 2))
    win.grow(5)
    assert win.ordered(0).tolist() == [[4, 5], [6, 7], [8, 9]]
    win.push(np.array([0, 4]), np.array([[1, 1], [2, 2]], np.float32))
    assert win.ordered(0).tolist() == [[6, 7], [8, 9], [1, 1]]
    assert win.ordered(4).tolist() == [[2, 2]]
