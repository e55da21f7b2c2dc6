"""Tests for the Fair Bayesian Perturbation controller."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import pytest
import torch

from fairdiffusion.training.fbp import FBPController, FBPStepResult, FBPWindowRecord, derive_seed, diagnose_windows

ATTRS = {
    "race": ["Asian", "Black", "White"],
    "gender": ["Female", "Male"],
    "ethnicity": ["Non-Hispanic", "Hispanic"],
}
OFFSETS = torch.tensor([0, 3, 5])
RHO = 0.95


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """The GP matrices are tiny; intra-op threading only adds overhead."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_batch(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic batch whose loss depends on the group and on the step."""
    g = torch.Generator().manual_seed(1000 + step)
    gi = torch.stack(
        [
            torch.randint(0, 3, (n,), generator=g),
            torch.randint(0, 2, (n,), generator=g),
            torch.randint(0, 2, (n,), generator=g),
        ],
        dim=1,
    )
    loss = 0.1 + 0.05 * gi[:, 0] + 0.02 * gi[:, 1] + 0.01 * torch.rand(n, generator=g)
    return loss, gi


def run(ctrl: FBPController, start: int, stop: int) -> list[tuple[FBPStepResult, torch.Tensor]]:
    out = []
    for step in range(start, stop):
        loss, gi = make_batch(step)
        w = ctrl.sample_weights(gi, dtype=torch.float64)
        out.append((ctrl.observe(loss, gi), w))
    return out


def test_init_and_weight_names() -> None:
    ctrl = FBPController(ATTRS, window=5, seed=0)
    assert ctrl.weight_names == [
        "race=Asian",
        "race=Black",
        "race=White",
        "gender=Female",
        "gender=Male",
        "ethnicity=Non-Hispanic",
        "ethnicity=Hispanic",
    ]
    assert torch.equal(ctrl.sigma, torch.ones(7, dtype=torch.float64))


def test_sample_weights_formula() -> None:
    ctrl = FBPController(ATTRS, window=5, seed=3, rank=2)
    ctrl.sigma = torch.linspace(0.1, 0.7, 7, dtype=torch.float64)
    gi = torch.tensor([[0, 0, 0], [2, 1, 1], [1, 0, 1], [2, 1, 0]])
    w64 = ctrl.sample_weights(gi, dtype=torch.float64)
    w32 = ctrl.sample_weights(gi)
    gen = torch.Generator().manual_seed(derive_seed(3, 2))
    expected = []
    for _ in range(2):
        eps = torch.randn((4, 3), generator=gen, dtype=torch.float64)
        expected.append(1.0 + (ctrl.sigma[OFFSETS + gi] * eps).sum(dim=1))
    assert w64.shape == (4,) and w32.dtype == torch.float32
    torch.testing.assert_close(w64, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(w32, expected[1].float())
    # Row 1 uses sigma entries 2 (White), 4 (Male), 6 (Hispanic).
    eps0 = torch.randn((4, 3), generator=torch.Generator().manual_seed(derive_seed(3, 2)), dtype=torch.float64)
    manual = 1 + 0.1 * 0 + ctrl.sigma[2] * eps0[1, 0] + ctrl.sigma[4] * eps0[1, 1] + ctrl.sigma[6] * eps0[1, 2]
    assert math.isclose(float(w64[1]), float(manual), rel_tol=1e-12)


def test_y_with_absent_group() -> None:
    ctrl = FBPController(ATTRS, window=5, seed=0)
    # race: White absent; gender: only Male present; ethnicity: both present.
    gi = torch.tensor([[0, 1, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]])
    loss = torch.tensor([1.0, 3.0, 4.0, 6.0, 8.0])
    res = ctrl.observe(loss, gi)
    # race: Asian mean 2, Black mean 6 -> gap 4; gender: 0;
    # ethnicity: Non-Hispanic (1, 4, 8) mean 13/3, Hispanic (3, 6) mean 4.5.
    assert res.gaps["race"] == pytest.approx(4.0)
    assert res.gaps["gender"] == 0.0
    assert res.gaps["ethnicity"] == pytest.approx(4.5 - 13 / 3)
    assert res.y == pytest.approx(-(4.0 + 4.5 - 13 / 3))
    assert not res.window_closed and res.acquisition_value is None
    assert ctrl.steps[0].y == res.y and ctrl.steps[0].sigma == [1.0] * 7


def test_non_finite_losses_are_ignored() -> None:
    ctrl = FBPController(ATTRS, window=5, seed=0)
    gi = torch.tensor([[0, 0, 0], [1, 1, 1], [2, 1, 1]])
    gaps = ctrl.group_gaps(torch.tensor([1.0, 2.0, float("nan")]), gi)
    assert gaps == {
        "race": pytest.approx(1.0),
        "gender": pytest.approx(1.0),
        "ethnicity": pytest.approx(1.0),
    }


def test_decay_applied_every_step() -> None:
    ctrl = FBPController(ATTRS, window=5, exploitation_rate=RHO, seed=7)
    gen = torch.Generator().manual_seed(7)
    sigma = torch.ones(7, dtype=torch.float64)
    for step in range(4):
        loss, gi = make_batch(step)
        res = ctrl.observe(loss, gi)
        u = torch.rand(7, generator=gen, dtype=torch.float64)
        sigma = RHO * sigma + (1 - RHO) * u
        assert res.step == step and not res.window_closed
        assert res.sigma == sigma.tolist()


def test_window_closes_then_decays() -> None:
    ctrl = FBPController(ATTRS, window=5, exploitation_rate=RHO, seed=11)
    gen = torch.Generator().manual_seed(11)
    results = [r for r, _ in run(ctrl, 0, 5)]
    assert [r.window_closed for r in results] == [False] * 4 + [True]
    last = results[-1]
    assert not last.fit_failed and last.fit_failure_reason is None
    assert last.acquisition_value is not None and math.isfinite(last.acquisition_value)
    assert ctrl.state_dict()["window_x"] == [] and ctrl.state_dict()["window_y"] == []
    assert ctrl.window_index == 1 and len(ctrl.windows) == 1
    win = ctrl.windows[0]
    cand = torch.tensor(win.sigma, dtype=torch.float64)
    assert bool(((cand >= 0) & (cand <= 1)).all())
    assert win.acquisition_value == last.acquisition_value
    assert win.mean_gap == pytest.approx(-sum(r.y for r in results) / 5)
    # The decay is applied on the same step, after the BO update.
    for _ in range(4):
        torch.rand(7, generator=gen, dtype=torch.float64)
    u = torch.rand(7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(last.sigma, dtype=torch.float64), RHO * cand + (1 - RHO) * u)
    assert all(0.0 <= s <= 1.0 for s in last.sigma)


def test_deterministic_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    a = run(FBPController(ATTRS, window=5, seed=5), 0, 7)
    after_a = torch.rand(3)
    torch.manual_seed(123)
    b = run(FBPController(ATTRS, window=5, seed=5), 0, 7)
    after_b = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_a, torch.rand(3)) and torch.equal(after_a, after_b)
    for (ra, wa), (rb, wb) in zip(a, b, strict=True):
        assert ra == rb and torch.equal(wa, wb)


def test_state_dict_round_trip_is_exact() -> None:
    ref = FBPController(ATTRS, window=5, seed=9)
    straight = run(ref, 0, 8)
    first = FBPController(ATTRS, window=5, seed=9)
    part1 = run(first, 0, 3)  # stop mid-window (3 open observations)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = FBPController(ATTRS, window=5, seed=9)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert len(resumed.state_dict()["window_y"]) == 3
    part2 = run(resumed, 3, 8)
    for (ra, wa), (rb, wb) in zip(straight, part1 + part2, strict=True):
        assert ra == rb and torch.equal(wa, wb)
    assert resumed.steps == ref.steps and resumed.windows == ref.windows
    assert len(resumed.windows) == 1 and resumed.window_index == 1
    torch.testing.assert_close(resumed.sigma, ref.sigma, rtol=0, atol=0)


def test_ranks_share_sigma_but_not_eps() -> None:
    r0 = run(FBPController(ATTRS, window=5, seed=4, rank=0), 0, 6)
    r1 = run(FBPController(ATTRS, window=5, seed=4, rank=1), 0, 6)
    for (res0, w0), (res1, w1) in zip(r0, r1, strict=True):
        assert not torch.equal(w0, w1)
        assert res0.sigma == res1.sigma and res0.y == res1.y
        assert res0.acquisition_value == res1.acquisition_value


def test_load_from_other_rank_reseeds_eps() -> None:
    src = FBPController(ATTRS, window=5, seed=4, rank=0)
    run(src, 0, 2)
    dst = FBPController(ATTRS, window=5, seed=4, rank=1)
    dst.load_state_dict(src.state_dict())
    _, gi = make_batch(2)
    assert torch.equal(dst.sigma, src.sigma)
    assert not torch.equal(dst.sample_weights(gi), src.sample_weights(gi))
    with pytest.raises(ValueError, match="seed"):
        FBPController(ATTRS, window=5, seed=5).load_state_dict(src.state_dict())


def test_constant_objective_window_falls_back() -> None:
    ctrl = FBPController(ATTRS, window=5, seed=2)
    gi = torch.zeros((4, 3), dtype=torch.long)  # one group per attribute -> y == 0
    results = [ctrl.observe(torch.rand(4), gi) for _ in range(5)]
    last = results[-1]
    assert last.window_closed and last.fit_failed and last.acquisition_value is None
    assert "constant" in (last.fit_failure_reason or "")
    assert ctrl.windows[0].fit_failed and ctrl.windows[0].sigma == ctrl.steps[0].sigma


def test_fit_exception_falls_back_to_best_sigma(monkeypatch: pytest.MonkeyPatch) -> None:
    ctrl = FBPController(ATTRS, window=5, seed=2)

    def boom(*args: object) -> None:
        raise RuntimeError("cholesky failed")

    monkeypatch.setattr(ctrl, "_fit_and_maximise", boom)
    results = [r for r, _ in run(ctrl, 0, 5)]
    best = max(range(5), key=lambda i: (results[i].y, -i))
    assert results[-1].fit_failed and "cholesky failed" in (results[-1].fit_failure_reason or "")
    assert ctrl.windows[0].sigma == ctrl.steps[best].sigma


@pytest.mark.parametrize(
    ("gi", "match"),
    [
        (torch.tensor([[0, 2, 0]]), "gender"),
        (torch.tensor([[3, 0, 0]]), "race"),
        (torch.tensor([[0, 0, -1]]), "ethnicity"),
        (torch.tensor([[0, 0]]), "shape"),
        (torch.tensor([[0.0, 0.0, 0.0]]), "integer"),
    ],
)
def test_bad_group_index_raises(gi: torch.Tensor, match: str) -> None:
    ctrl = FBPController(ATTRS, window=5, seed=0)
    with pytest.raises(ValueError, match=match):
        ctrl.sample_weights(gi)
    with pytest.raises(ValueError, match=match):
        ctrl.observe(torch.ones(gi.shape[0]), gi)


def test_fit_lag_applies_the_same_optimum_k_steps_late() -> None:
    sync = FBPController(ATTRS, window=5, seed=3)
    lagged = FBPController(ATTRS, window=5, seed=3, fit_lag=2)
    run(sync, 0, 5)
    results = [r for r, _ in run(lagged, 0, 8)]
    lagged.close()
    assert [r.window_closed for r in results] == [False] * 6 + [True, False]
    window = lagged.windows[0]
    assert window.step == 4 and window.applied_step == 6  # closed at step 4, used from step 6
    # The fit saw the same window, so it found the same optimum: only its use is late.
    assert window.sigma == sync.windows[0].sigma
    assert window.acquisition_value == sync.windows[0].acquisition_value
    # Applied at step 6 before that step's decay, exactly as a synchronous fit is.
    decay = torch.Generator().manual_seed(3)
    noise = [torch.rand(7, generator=decay, dtype=torch.float64) for _ in range(7)]
    expected = RHO * torch.tensor(window.sigma, dtype=torch.float64) + (1 - RHO) * noise[6]
    torch.testing.assert_close(torch.tensor(results[6].sigma, dtype=torch.float64), expected)


def test_fit_lag_state_round_trip_with_a_pending_fit_is_exact() -> None:
    straight = FBPController(ATTRS, window=4, seed=8, fit_lag=2)
    expected = run(straight, 0, 11)
    straight.close()
    first = FBPController(ATTRS, window=4, seed=8, fit_lag=2)
    part1 = run(first, 0, 5)  # window closed at step 3, its fit applies at step 5: pending
    state = first.state_dict()
    first.close()
    assert state["pending"] is not None and state["pending"]["apply_step"] == 5
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = FBPController(ATTRS, window=4, seed=8, fit_lag=2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    part2 = run(resumed, 5, 11)
    resumed.close()
    for (ra, wa), (rb, wb) in zip(expected, part1 + part2, strict=True):
        assert ra == rb and torch.equal(wa, wb)
    assert resumed.windows == straight.windows and len(resumed.windows) == 2


def test_fit_lag_must_be_shorter_than_the_window() -> None:
    with pytest.raises(ValueError, match="fit_lag"):
        FBPController(ATTRS, window=5, fit_lag=5)


def window(index: int, sigma: list[float], gap: float) -> FBPWindowRecord:
    return FBPWindowRecord(window_index=index, step=index, acquisition_value=0.0, mean_gap=gap, sigma=sigma)


def test_diagnose_windows_flags_a_pinned_sigma_and_a_flat_gap() -> None:
    names = ["race=Asian", "race=Black"]
    pinned = [window(i, [1.0, 0.3 + 0.1 * i], 0.5 - 0.05 * i) for i in range(4)]
    assert diagnose_windows(pinned[:2], names, patience=3) == {}  # too few windows yet
    findings = diagnose_windows(pinned, names, patience=3)
    assert list(findings) == ["sigma_at_bound/race=Asian"]
    assert "bound 1" in findings["sigma_at_bound/race=Asian"]
    flat = [window(i, [0.4, 0.6 - 0.1 * i], 0.2 + 1e-4 * i) for i in range(3)]
    assert list(diagnose_windows(flat, names, patience=3)) == ["flat_gap"]
    moving = [window(i, [0.4 + 0.1 * i, 0.0 + 0.2 * i], 0.2 - 0.05 * i) for i in range(3)]
    assert diagnose_windows(moving, names, patience=3) == {}


def test_the_fit_matches_botorch_with_its_default_settings() -> None:
    """The controller turns gpytorch's debug checks off for speed; no number may change.

    The window's candidate is recomputed by calling botorch directly, with every
    gpytorch / linear_operator setting at its default (debug checks on).
    """
    from botorch.acquisition import UpperConfidenceBound
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.optim import optimize_acqf
    from gpytorch.mlls import ExactMarginalLogLikelihood

    ctrl = FBPController(ATTRS, window=10, seed=4)
    xs, ys = [], []
    for step, (result, _) in enumerate(run(ctrl, 0, 10)):
        xs.append(torch.tensor(ctrl.steps[step].sigma, dtype=torch.float64))
        ys.append(result.y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4 + 0)  # the controller's seed + the window index
        gp = SingleTaskGP(torch.stack(xs), torch.tensor(ys, dtype=torch.float64).unsqueeze(-1))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
        bounds = torch.stack([torch.zeros(7), torch.ones(7)]).to(torch.float64)
        cand, acq = optimize_acqf(
            UpperConfidenceBound(gp, beta=0.1), bounds=bounds, q=1, num_restarts=5, raw_samples=20
        )
    assert ctrl.windows[0].acquisition_value == float(acq)
    # The window records the candidate itself; the mix toward U(0,1) follows on the same step.
    assert ctrl.windows[0].sigma == cand.reshape(-1).clamp(0.0, 1.0).tolist()
