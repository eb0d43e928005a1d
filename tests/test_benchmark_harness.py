"""The timing harness the benchmarks share (benchmarks/harness.py): what it counts, with methods
whose steps take a known time. The benchmarks' own numbers are in benchmarks/RESULTS.md."""

import pytest
import torch

from benchmarks.harness import EpochTooShort, Method, time_steps, window_steps

CPU = torch.device("cpu")


class FakeClock:
    """time.perf_counter for the harness: steps advance it by exactly their duration, so the numbers
    do not depend on the machine's load."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    import benchmarks.harness

    fake = FakeClock()
    monkeypatch.setattr(benchmarks.harness.time, "perf_counter", fake)
    return fake


def counting_method(batch_size=8, epoch_batches=1000, step_s=0.0, workers=0, queue=0, clock=None):
    calls = {"epochs": 0, "steps": []}

    def epoch():
        calls["epochs"] += 1
        return ((calls["epochs"], i) for i in range(epoch_batches))

    def step(batch):
        calls["steps"].append(batch)
        if clock is not None:
            clock.now += step_s

    return Method("m", epoch, step, batch_size, workers=workers, queue=queue), calls


def test_warmup_then_a_fresh_iterator_whose_first_step_is_untimed():
    method, calls = counting_method()
    result = time_steps(method, CPU, warmup=3, steps=5)
    # three warm-up steps on a first pass, then a second pass: one untimed step and five timed
    assert calls["steps"] == [(1, 0), (1, 1), (1, 2)] + [(2, i) for i in range(6)]
    assert result["steps"] == 5 and result["warmup_steps"] == 3


def test_images_per_second_count_each_image_of_a_batch_once(clock):
    method, _ = counting_method(batch_size=16, step_s=0.02, clock=clock)
    result = time_steps(method, CPU, warmup=2, steps=10)
    # 16 images (two views each) every 20 ms: 800 images/s, where counting the views would give 1,600;
    # the warm-up and the untimed first step are not in it
    assert result["images_per_s"] == 800 and result["images_per_s_2nd_half"] == 800
    assert result["step_ms"] == 20 and result["seconds"] == pytest.approx(0.2)


def test_a_dataloader_window_covers_twice_its_queue_in_whole_worker_rounds():
    assert window_steps(5, workers=0, queue=0) == 5
    assert window_steps(5, workers=4, queue=8) == 16  # 2 x 8 queued batches, rounds of 4
    assert window_steps(5, workers=3, queue=6) == 12
    assert window_steps(40, workers=3, queue=6) == 42  # --steps, rounded up to whole rounds
    method, calls = counting_method(workers=4, queue=8)
    assert time_steps(method, CPU, warmup=0, steps=5)["steps"] == 16 and len(calls["steps"]) == 17


def test_an_epoch_of_a_worker_source_too_short_for_the_window_is_refused_not_restarted():
    method, _ = counting_method(epoch_batches=10, workers=4, queue=8)  # a window of 16 steps
    with pytest.raises(EpochTooShort, match="an epoch of 10 batches is shorter than the 17"):
        time_steps(method, CPU, warmup=0, steps=5)
    # without workers, nothing restarts: the window runs on into the next pass
    method, calls = counting_method(epoch_batches=4)
    assert time_steps(method, CPU, warmup=0, steps=10)["steps"] == 10 and calls["epochs"] == 3
