"""The timing harness the benchmarks share (benchmarks/harness.py): what it counts, with methods
whose steps take a known time. The benchmarks' own numbers are in benchmarks/RESULTS.md."""

import time

import pytest
import torch

from benchmarks.harness import EpochTooShort, Method, time_steps, window_steps

CPU = torch.device("cpu")


def counting_method(batch_size=8, epoch_batches=1000, step_s=0.0, workers=0, queue=0):
    calls = {"epochs": 0, "steps": []}

    def epoch():
        calls["epochs"] += 1
        return ((calls["epochs"], i) for i in range(epoch_batches))

    def step(batch):
        calls["steps"].append(batch)
        time.sleep(step_s)

    return Method("m", epoch, step, batch_size, workers=workers, queue=queue), calls


def test_warmup_then_a_fresh_iterator_whose_first_step_is_untimed():
    method, calls = counting_method()
    result = time_steps(method, CPU, warmup=3, steps=5)
    # three warm-up steps on a first pass, then a second pass: one untimed step and five timed
    assert calls["steps"] == [(1, 0), (1, 1), (1, 2)] + [(2, i) for i in range(6)]
    assert result["steps"] == 5 and result["warmup_steps"] == 3


def test_images_per_second_count_each_image_of_a_batch_once():
    method, _ = counting_method(batch_size=16, step_s=0.02)
    result = time_steps(method, CPU, warmup=0, steps=10)
    # 16 images (two views each) every 20 ms or a little more (a busy machine): at most 800 images/s,
    # where counting the views would give 1,600
    assert 300 < result["images_per_s"] <= 800
    assert result["images_per_s"] == pytest.approx(10 * 16 / result["seconds"], rel=0.01)
    assert 20 <= result["step_ms"] < 50


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
