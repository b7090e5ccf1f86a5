"""Schedules give the documented learning rate per epoch; dynamic restores at each drop."""
import math

import pytest

from numexp import schedules


def lrs(schedule, epochs):
    return [schedule.lr_at(e) for e in range(epochs)]


def test_fixed_keeps_lr():
    assert lrs(schedules.build("fixed", 0.1, 5), 5) == [0.1] * 5


def test_step_multiplies_by_gamma_every_step_size_epochs():
    s = schedules.build("step", 1.0, 6, step_size=2, gamma=0.5)
    assert lrs(s, 6) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert not any(s.restores_best(e) for e in range(6))


def test_exp_decay_multiplies_by_gamma_every_epoch():
    assert lrs(schedules.build("exp_decay", 2.0, 4, gamma=0.5), 4) == [2.0, 1.0, 0.5, 0.25]


def test_cosine_runs_from_lr_towards_eta_min_over_the_run():
    s = schedules.build("cosine", 1.0, 4, eta_min=0.2)
    assert s.T == 4
    assert lrs(s, 5) == pytest.approx([1.0, 0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2, 0.6,
                                       0.2 + 0.8 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.2])


def test_dynamic_is_the_seed_protocol():
    """lr 1e-3, drops /10 every 20 epochs over 60: 1e-3, 1e-4, 1e-5; restores at epochs 20 and 40."""
    s = schedules.build("dynamic", 1e-3, 60, step_size=20, factor=10)
    rates = lrs(s, 60)
    assert rates[:20] == [1e-3] * 20
    assert rates[20:40] == pytest.approx([1e-4] * 20)
    assert rates[40:] == pytest.approx([1e-5] * 20)
    assert [e for e in range(60) if s.restores_best(e)] == [20, 40]


@pytest.mark.parametrize("name, options", [("step", {"step_size": 0}), ("step", {"gamma": 0}),
                                           ("exp_decay", {"gamma": 1.5}), ("cosine", {"eta_min": 2.0}),
                                           ("dynamic", {"factor": 0.5}), ("fixed", {"nope": 1})])
def test_impossible_options_raise(name, options):
    with pytest.raises((ValueError, TypeError)):
        schedules.build(name, 1.0, 10, **options)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="cosine"):
        schedules.build("warmup", 1.0, 10)
