"""The learning-rate schedule against transformers' own `get_scheduler`, step by step, and across a resume."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from llavakit.train.schedule import make_scheduler

NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def _opt():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.SGD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 2e-4}])


def _rates(sched, opt, steps):
    out = []
    for _ in range(steps):
        out += [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", list(NAMES))
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (0, 1), (1, 1), (5, 5), (7, 5), (30, 1000)])
def test_rates_match_transformers_get_scheduler(schedule, warmup, total):
    mine_opt, ref_opt = _opt(), _opt()
    mine = make_scheduler(schedule, mine_opt, warmup, total)
    ref = get_scheduler(NAMES[schedule], ref_opt, num_warmup_steps=warmup, num_training_steps=total)
    steps = total + 3  # a few past the end too (a run's last step, an extra scheduler step)
    assert _rates(mine, mine_opt, steps) == _rates(ref, ref_opt, steps)  # bit for bit: runs keep their trajectory


@pytest.mark.parametrize("schedule", list(NAMES))
def test_a_resumed_schedule_continues_where_it_stopped(schedule):
    opt = _opt()
    sched = make_scheduler(schedule, opt, 4, 20)
    _rates(sched, opt, 9)
    state, opt_state = sched.state_dict(), opt.state_dict()  # what a checkpoint holds
    later = _rates(sched, opt, 11)
    opt2 = _opt()
    resumed = make_scheduler(schedule, opt2, 4, 20)
    opt2.load_state_dict(opt_state)
    resumed.load_state_dict(state)
    assert _rates(resumed, opt2, 11) == pytest.approx(later, rel=1e-12)


def test_a_scheduler_saved_by_transformers_resumes_here():
    """Runs saved before this module existed hold transformers' LambdaLR state; --resume loads it into ours."""
    opt = _opt()
    ref = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=12)
    _rates(ref, opt, 5)
    state, opt_state = ref.state_dict(), opt.state_dict()
    later = _rates(ref, opt, 7)
    opt2 = _opt()
    mine = make_scheduler("cosine", opt2, 2, 12)
    opt2.load_state_dict(opt_state)
    mine.load_state_dict(state)
    assert _rates(mine, opt2, 7) == pytest.approx(later, rel=1e-12)


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        make_scheduler("polynomial", _opt(), 0, 5)


def test_starting_training_does_not_import_peft_or_bitsandbytes():
    """The schedule no longer comes from transformers.optimization, whose import pulls peft and bitsandbytes."""
    import subprocess
    import sys

    code = ("import sys, llavakit.train.loop, llavakit.train.schedule; "
            "print(sorted(m for m in ('peft', 'bitsandbytes', 'transformers.optimization') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
