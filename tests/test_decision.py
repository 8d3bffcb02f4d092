import math

import pytest
import torch
from scipy.stats import chi2

from fastcache_fx.ops import decision as D


@pytest.mark.parametrize("alpha,nd", [(0.05, 16), (0.01, 1024), (0.2, 295_000)])
def test_threshold_equals_scipy_quantile(alpha, nd):
    tau = 0.07
    assert D.threshold_sq(tau, alpha, nd) == pytest.approx(tau ** 2 * chi2.ppf(1 - alpha, nd) / nd, rel=1e-12)


def _decide(h, a, step=5, consec=0, **kw):
    args = dict(q_ratio=1.0, tau=0.1, beta=None, timestep_max=1000.0, min_step=2, max_consecutive=3, enabled=True)
    args.update(kw)
    return D.block_decision([h], [a], torch.tensor(step), torch.tensor(consec), torch.tensor(500.0), **args)


def test_decision_rules():
    a = torch.randn(2, 8, 4)
    ok, delta, thr = _decide(a * 1.01, a)
    assert bool(ok) and float(delta) == pytest.approx(0.01, rel=1e-4) and float(thr) == pytest.approx(0.1)
    assert not bool(_decide(a * 1.5, a)[0])                      # large change
    assert not bool(_decide(a, a, step=1)[0])                    # warmup
    assert not bool(_decide(a, a, consec=3)[0])                  # max_consecutive_approx
    assert not bool(_decide(a, a, enabled=False)[0])
    assert not bool(_decide(a, torch.zeros_like(a))[0])          # empty anchor
    bad = a.clone(); bad[0, 0, 0] = float("nan")
    assert not bool(_decide(bad, a)[0])                          # NaN input
    # the worst sample decides: sample 1 changed by 50 %
    h = a.clone(); h[1] *= 1.5
    assert not bool(_decide(h, a)[0])


def test_adaptive_threshold():
    a = torch.randn(1, 4, 4)
    # tau(t) = b0 + b2 * t/1000 with t = 500 -> 0.01 + 0.5 * 0.2 = 0.11
    ok, delta, thr = _decide(a * 1.05, a, beta=(0.01, 0.0, 0.2, 0.0))
    assert float(thr) == pytest.approx(0.11, rel=1e-5) and bool(ok)
    ok, _, _ = _decide(a * 1.05, a, beta=(0.01, 0.0, 0.0, 0.0))
    assert not bool(ok)


def test_trajectory_step():
    step, prev = torch.tensor(-1), torch.tensor(-math.inf)
    seen = []
    for t in [999, 800, 600, 999, 500]:
        step, prev = D.trajectory_step(torch.tensor([t, t]), prev, step)
        seen.append(int(step))
    assert seen == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("ts, want", [
    ([999, 800, 600, 999, 500, 250], [0, 1, 2, 0, 1, 2]),  # falling (DDIM, flow Euler)
    ([0.0, 0.25, 0.5, 0.0, 0.5, 0.75], [0, 1, 2, 0, 1, 2]),  # rising (Z-Image, Lumina 2: 1 - sigma)
    ([0.5, 0.5, 0.75, 0.5], [0, 0, 1, 0]),  # a repeated timestep starts over; a turn back too
    ([float("nan")] * 3, [0, 1, 2]),  # unknown (NaN, a fragment whose control was not filled): the step advances
])
def test_trajectory_step_follows_the_trajectory_direction(ts, want):
    step, prev, first = torch.tensor(-1), torch.tensor(-math.inf), torch.tensor(math.nan)
    seen = []
    for t in ts:
        step, prev, first = D.trajectory_step(torch.tensor([t, t]), prev, step, first)
        seen.append(int(step))
    assert seen == want
    # the host rule of the regional clock agrees
    step, prev, first, host = -1, -math.inf, math.nan, []
    for t in ts:
        if math.isnan(t):
            step += 1
        else:
            step = 0 if D.starts_trajectory(t, prev, step, first) else step + 1
            first = t if step == 0 else first
            prev = t
        host.append(step)
    assert host == want


def test_update_never_stores_nan():
    h, y = torch.randn(1, 3, 2), torch.randn(1, 3, 2)
    a_in, a_res = torch.zeros_like(h), torch.zeros_like(h)
    y_bad = y.clone(); y_bad[0, 0, 0] = float("inf")
    (ni,), (nr,), c = D.update_state(torch.tensor(False), [h], [y_bad], [a_in], [a_res], torch.tensor(0))
    assert torch.equal(ni, a_in) and torch.equal(nr, a_res) and int(c) == 0
    (ni,), (nr,), c = D.update_state(torch.tensor(False), [h], [y], [a_in], [a_res], torch.tensor(2))
    assert torch.equal(ni, h) and torch.allclose(nr, y - h) and int(c) == 0
    (ni,), _, c = D.update_state(torch.tensor(True), [h], [y], [a_in], [a_res], torch.tensor(2))
    assert torch.equal(ni, a_in) and int(c) == 3
