"""Tests for the opt-in departures from the paper's Fair Bayesian Perturbation."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import pytest
import torch

from fairdiffusion.config import FBPConfig, parse_config
from fairdiffusion.errors import ConfigError
from fairdiffusion.training.fbp import FBPController, FBPStepResult
from fairdiffusion.training.fbp_variants import (
    FBPVariant,
    group_mean_offsets,
    perturbation_weights,
    window_objective,
)

ATTRS = {
    "race": ["Asian", "Black", "White"],
    "gender": ["Female", "Male"],
    "ethnicity": ["Non-Hispanic", "Hispanic"],
}
SIZES = [3, 2, 2]
ALL_VARIANTS = FBPVariant(
    objective="window", history_windows=2, mix_toward="candidate", weights="lognormal", mean_shift=True
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_batch(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch whose loss depends on the timestep far more than on the group (as in diffusion)."""
    g = torch.Generator().manual_seed(2000 + step)
    groups = torch.stack([torch.randint(0, size, (n,), generator=g) for size in SIZES], dim=1)
    timesteps = torch.randint(0, 1000, (n,), generator=g)
    loss = (0.05 + timesteps / 1000.0) * (1 + 0.05 * (groups[:, 0] == 0)) * (1 + 0.01 * torch.rand(n, generator=g))
    return loss, groups, timesteps


def run(ctrl: FBPController, start: int, stop: int) -> list[tuple[FBPStepResult, torch.Tensor]]:
    out = []
    for step in range(start, stop):
        loss, groups, timesteps = make_batch(step)
        weights = ctrl.sample_weights(groups, dtype=torch.float64)
        out.append((ctrl.observe(loss, groups, timesteps), weights))
    return out


def test_lognormal_weights_are_positive_with_mean_one() -> None:
    eps = torch.randn((200_000, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scales = torch.full_like(eps, 0.6)
    lognormal = perturbation_weights("lognormal", eps, scales)
    assert bool((lognormal > 0).all())
    assert float(lognormal.mean()) == pytest.approx(1.0, abs=0.01)
    gaussian = perturbation_weights("gaussian", eps, scales)
    assert float((gaussian < 0).double().mean()) > 0.1, "the paper's weights go negative at this sigma"


def test_clipped_weights_are_non_negative_with_batch_mean_one() -> None:
    eps = torch.randn((64, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    clipped = perturbation_weights("clipped", eps, torch.ones_like(eps))
    assert bool((clipped >= 0).all()) and bool((clipped == 0).any())
    assert float(clipped.mean()) == pytest.approx(1.0)
    all_negative = perturbation_weights("clipped", -torch.ones((4, 1), dtype=torch.float64), torch.full((4, 1), 2.0))
    assert torch.equal(all_negative, torch.zeros(4, dtype=torch.float64))


def test_mean_offsets_have_a_reference_group_and_a_bounded_sum() -> None:
    offsets = group_mean_offsets(torch.tensor([0.0, 1.0, 1.0, 1.0]), SIZES, max_shift=0.6)
    torch.testing.assert_close(offsets, torch.tensor([0.0, -0.2, 0.2, 0.0, 0.2, 0.0, 0.2], dtype=torch.float64))
    # A White Male Hispanic sample's offsets sum to the bound.
    assert float(offsets[2] + offsets[4] + offsets[6]) == pytest.approx(0.6)


@pytest.mark.parametrize("weights", ["gaussian", "lognormal"])
def test_mean_shift_changes_the_per_group_mean_weight(weights: str) -> None:
    ctrl = FBPController(ATTRS, window=5, variant=FBPVariant(weights=weights, mean_shift=True))  # type: ignore[arg-type]
    assert ctrl.shift.shape == (4,) and bool((ctrl.mean_offsets == 0).all()), "starts at the paper's weights"
    ctrl.sigma = torch.zeros(7, dtype=torch.float64)  # isolate the mean
    ctrl.shift = torch.tensor([0.5, 1.0, 0.5, 0.5], dtype=torch.float64)  # race=White up-weighted
    groups = torch.tensor([[0, 0, 0], [1, 0, 0], [2, 0, 0]])
    w = ctrl.sample_weights(groups, dtype=torch.float64)
    up = 1 + 0.5 / 3 if weights == "gaussian" else float(torch.exp(torch.tensor(0.5 / 3)))
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, up], dtype=torch.float64))


def test_window_objective_sees_through_the_timestep_noise() -> None:
    batches = [make_batch(step, n=64) for step in range(30)]
    loss, groups, timesteps = (torch.cat(part) for part in zip(*batches, strict=True))
    y, gaps = window_objective(loss, groups, timesteps, SIZES, buckets=10, num_timesteps=1000)
    # The planted effect: Asian losses 5% higher; gender and ethnicity have none.
    assert gaps[0] == pytest.approx(0.05, abs=0.03)
    assert gaps[1] < 0.03 and gaps[2] < 0.03 and y == pytest.approx(-sum(gaps.values()))
    raw, _ = window_objective(loss, groups, torch.zeros_like(timesteps), SIZES, buckets=1, num_timesteps=1000)
    assert raw < y, "without buckets the timestep spread adds to the gaps"


def recorded_fits(ctrl: FBPController, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Records the points each GP fit gets; the fit itself returns the best point (no GP: fast)."""
    fits: list[torch.Tensor] = []

    def spy(xs: torch.Tensor, ys: torch.Tensor, window_index: int) -> tuple[torch.Tensor, float]:
        fits.append(xs.clone())
        return xs[int(torch.argmax(ys))].clone(), 0.0

    monkeypatch.setattr(ctrl, "_fit_and_maximise", spy)
    return fits


def test_history_windows_fits_on_the_last_k_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    ctrl = FBPController(ATTRS, window=4, seed=1, variant=FBPVariant(history_windows=3))
    fits = recorded_fits(ctrl, monkeypatch)
    run(ctrl, 0, 20)
    assert [len(xs) for xs in fits] == [4, 8, 12, 12, 12]
    used = torch.tensor([record.sigma for record in ctrl.steps], dtype=torch.float64)
    torch.testing.assert_close(fits[-1], used[8:20], rtol=0, atol=0)  # windows 3, 4 and 5
    paper = FBPController(ATTRS, window=4, seed=1)
    paper_fits = recorded_fits(paper, monkeypatch)
    run(paper, 0, 8)
    assert [len(xs) for xs in paper_fits] == [4, 4]


def test_window_objective_gives_one_point_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    ctrl = FBPController(ATTRS, window=4, seed=2, variant=FBPVariant(objective="window", history_windows=3))
    fits = recorded_fits(ctrl, monkeypatch)
    results = [r for r, _ in run(ctrl, 0, 16)]
    assert [len(xs) for xs in fits] == [2, 3, 3], "no fit on the first window's single point"
    assert results[3].fit_failed and "fewer than 2 points" in (results[3].fit_failure_reason or "")
    used = torch.tensor([record.sigma for record in ctrl.steps], dtype=torch.float64)
    torch.testing.assert_close(fits[-1][-1], used[12:16].mean(dim=0))
    with pytest.raises(ValueError, match="timesteps"):
        ctrl.observe(*make_batch(16)[:2])


def test_mixing_toward_the_candidate_keeps_sigma_near_it() -> None:
    uniform = FBPController(ATTRS, window=1000, seed=3)
    candidate = FBPController(ATTRS, window=1000, seed=3, variant=FBPVariant(mix_toward="candidate"))
    for ctrl in (uniform, candidate):
        run(ctrl, 0, 100)
    # Before any fit the candidate is the starting point, sigma = 1.
    assert float(uniform.sigma.mean()) < 0.65, "U(0,1) pulls sigma toward 0.5"
    assert float(candidate.sigma.min()) > 0.85


def test_all_variants_resume_exactly_with_a_pending_fit() -> None:
    def controller() -> FBPController:
        return FBPController(ATTRS, window=4, seed=8, fit_lag=2, variant=ALL_VARIANTS)

    straight = controller()
    expected = run(straight, 0, 14)
    straight.close()
    first = controller()
    part1 = run(first, 0, 9)  # the second window's fit is pending, the third window is open
    state = first.state_dict()
    first.close()
    assert state["pending"] is not None and state["history"] and state["window_batches"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = controller()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    part2 = run(resumed, 9, 14)
    resumed.close()
    for (ra, wa), (rb, wb) in zip(expected, part1 + part2, strict=True):
        assert ra == rb and torch.equal(wa, wb)
    assert resumed.windows == straight.windows and resumed.windows[-1].mean_shift
    with pytest.raises(ValueError, match="variant"):
        FBPController(ATTRS, window=4, seed=8, fit_lag=2).load_state_dict(state)


def test_fbp_defaults_are_the_paper() -> None:
    assert FBPConfig().is_paper()
    assert not FBPConfig(weights="lognormal").is_paper()
    assert not FBPConfig(objective="window", history_windows=5).is_paper()


@pytest.mark.parametrize(
    ("fbp", "key", "message"),
    [
        ({"objective": "window"}, "training.fbp", "history_windows must be at least 2"),
        ({"history_windows": 0}, "training.fbp.history_windows", "greater than or equal to 1"),
        ({"mean_shift_max": 1.0}, "training.fbp.mean_shift_max", "less than 1"),
        ({"weights": "uniform"}, "training.fbp.weights", "'gaussian', 'lognormal' or 'clipped'"),
        ({"mix_toward": "zero"}, "training.fbp.mix_toward", "'uniform' or 'candidate'"),
    ],
)
def test_bad_fbp_variant_settings_name_the_key(fbp: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key) + ": .*" + re.escape(message)):
        parse_config({"training": {"fbp": fbp}})
