import pytest

from gpu_worker.batcher import BatchQueue


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_released_at_max_size_before_deadline():
    clock = Clock()
    q = BatchQueue(3, 1.0, clock)
    for i in range(2):
        q.add(i)
    assert not q.ready()
    q.add(2)
    assert q.ready() and q.take() == [0, 1, 2] and len(q) == 0


def test_released_at_deadline_when_not_full():
    clock = Clock()
    q = BatchQueue(10, 0.05, clock)
    assert q.time_left() is None and not q.ready()
    q.add("a")
    clock.t = 0.03
    q.add("b")  # the deadline belongs to the oldest item
    assert not q.ready() and q.time_left() == pytest.approx(0.02)
    clock.t = 0.05
    assert q.ready() and q.time_left() == 0.0
    assert q.take() == ["a", "b"]


def test_overflow_keeps_order_and_restarts_deadline():
    clock = Clock()
    q = BatchQueue(2, 1.0, clock)
    for i in range(5):
        q.add(i)
    assert q.room == 0
    assert q.take() == [0, 1]
    clock.t = 0.5
    assert q.take() == [2, 3]
    assert q.time_left() == pytest.approx(1.0)
    assert q.take() == [4]


def test_rejects_nonsense_limits():
    with pytest.raises(ValueError):
        BatchQueue(0, 1.0)
