"""torch's thread count: chosen on purpose (--threads, OMP_NUM_THREADS, the model), set, and said."""

import pytest
import torch

from dora_diffusion.config import ConfigError
from dora_diffusion.threads import choose_threads, set_torch_threads


def test_threads_are_chosen_in_order_of_precedence(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(2) == (2, "--threads")  # the option wins over the environment
    assert choose_threads(None) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert choose_threads(None)[0] == 1  # the embedded tiny model: one thread
    assert choose_threads(None, model="stabilityai/stable-diffusion-xl-base-1.0")[0] == 4  # a real one: at most 4
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert choose_threads(None, model="some/model")[0] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a number: ignored
    assert choose_threads(None)[0] == 1
    with pytest.raises(ConfigError, match="threads"):
        choose_threads(0)


def test_set_torch_threads_sets_and_prints(capsys):
    before = torch.get_num_threads()
    try:
        assert set_torch_threads(2) == 2 and torch.get_num_threads() == 2
        assert capsys.readouterr().out == "torch threads: 2 (--threads)\n"
    finally:
        torch.set_num_threads(before)


def test_generation_threads_use_a_free_core_only(monkeypatch):
    from dora_diffusion import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # this process alone
    assert threads.generation_threads()[0] == 2
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.9, 1.0, 1.0))  # another job on the other core
    assert threads.generation_threads()[0] == 1
    assert threads.generation_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.generation_threads()[0] == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 1)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.generation_threads()[0] == 1
