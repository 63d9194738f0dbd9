"""The learning-rate schedules (engine.train.optim.LrSchedule): warmup-stable-decay's values, its
shapes, a growth under it (continue keeps the stable phase, rewarm goes back to the peak with the
decay where it was), SPARKLING's re-warm-up ramp, and the plan fields that belong to wsd."""

from __future__ import annotations

import math

import pytest

from engine.plan import PlanError, plan_from_dict
from engine.train.optim import LrSchedule


def factors(schedule: LrSchedule) -> list[float]:
    return [schedule.factor(s) for s in range(schedule.steps)]


@pytest.mark.parametrize("shape, decay", [
    ("linear", lambda p: 1 - p),
    ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
    ("sqrt", lambda p: 1 - math.sqrt(p)),
])
def test_wsd_warms_up_holds_the_peak_then_decays_over_its_fraction(shape, decay):
    schedule = LrSchedule("wsd", steps=100, warmup=10, decay_fraction=0.2, decay_shape=shape)
    values = factors(schedule)
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])   # the warm-up
    assert values[10:80] == [1.0] * 70                                         # stable: the peak held
    assert schedule.decay_start == 80
    assert values[80:] == pytest.approx([decay((s - 80) / 20) for s in range(80, 100)])
    assert values[80] == 1.0 and 0 < values[-1] < values[-2]                   # down towards 0


def test_wsd_decay_fraction_rounds_to_whole_steps_and_takes_at_least_one():
    assert LrSchedule("wsd", steps=7, decay_fraction=0.1).decay_start == 6
    assert LrSchedule("wsd", steps=10, decay_fraction=1.0).decay_start == 0   # all decay: no stable phase
    default = LrSchedule("wsd", steps=10)  # the plan's defaults: the last 20 %, linear
    assert default.factor(5) == 1.0 and default.factor(9) == pytest.approx(0.5)


def test_a_growth_under_wsd_keeps_the_stable_phase():
    plain = LrSchedule("wsd", steps=50, warmup=5, decay_fraction=0.2)
    # continue: the restart list is empty, the schedule goes on as if nothing happened
    rewarmed = LrSchedule("wsd", steps=50, warmup=5, decay_fraction=0.2, restarts=(20,))
    # a growth in the stable phase: rewarm changes nothing there (already at the peak), the decay
    # still takes the last 10 steps
    assert factors(rewarmed) == pytest.approx(factors(plain))
    # a growth inside the decay: back to the peak, the decay runs again over the steps left
    late = LrSchedule("wsd", steps=50, warmup=5, decay_fraction=0.2, restarts=(45,))
    assert factors(late)[:45] == pytest.approx(factors(plain)[:45])
    assert factors(late)[45:] == pytest.approx([1 - k / 5 for k in range(5)])


def test_rewarm_steps_ramp_back_to_the_schedule_after_a_growth():
    ramped = LrSchedule("wsd", steps=40, warmup=4, decay_fraction=0.25, restarts=(12,), rewarm_steps=4)
    values = factors(ramped)
    assert values[12:16] == pytest.approx([0.25, 0.5, 0.75, 1.0])   # from near 0 back to the peak
    assert values[16:30] == [1.0] * 14 and values[30] == 1.0 and values[31] < 1.0
    # under a decaying schedule the ramp multiplies LEMON's restarted decay
    cosine = LrSchedule("cosine", steps=20, restarts=(10,), rewarm_steps=2)
    restarted = LrSchedule("cosine", steps=20, restarts=(10,))
    assert cosine.factor(10) == pytest.approx(0.5 * restarted.factor(10))
    assert cosine.factor(15) == pytest.approx(restarted.factor(15))


BASE = {"name": "p", "tasks": {"t": {"source": "builtin:stdlib-python"}},
        "stages": [{"task": "t", "steps": 10}]}


def test_wsd_fields_default_under_wsd_and_are_refused_elsewhere():
    plan = plan_from_dict({**BASE, "train": {"schedule": "wsd"}})
    assert (plan.train.decay_fraction, plan.train.decay_shape) == (0.2, "linear")
    with pytest.raises(PlanError, match=r'train\.decay_fraction.*belongs to schedule = "wsd"'):
        plan_from_dict({**BASE, "train": {"schedule": "cosine", "decay_fraction": 0.3}})
    with pytest.raises(PlanError, match=r"train\.decay_shape"):
        plan_from_dict({**BASE, "train": {"schedule": "wsd", "decay_shape": "exp"}})


def test_rewarm_steps_need_schedule_after_rewarm():
    grow = {"trigger": "at", "at_steps": [5], "expand": [{"op": "widen_ffn", "size": 8}], "rewarm_steps": 3}
    with pytest.raises(PlanError, match=r'rewarm_steps.*belongs to schedule_after = "rewarm"'):
        plan_from_dict({**BASE, "stages": [{"task": "t", "steps": 10, "grow": grow}]})
    plan = plan_from_dict({**BASE, "stages": [{"task": "t", "steps": 10, "grow": {**grow, "schedule_after": "rewarm"}}]})
    assert plan.stages[0].grow.rewarm_steps == 3 and plan.stages[0].grow.optimizer_state == "carry"
