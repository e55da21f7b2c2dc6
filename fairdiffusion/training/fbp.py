"""Fair Bayesian Perturbation (FBP) controller.

Implements the "Fair Bayesian Perturbation" method of Luo et al. 2024,
"FairDiffusion: Enhancing Equity in Latent Diffusion Models via Fair Bayesian
Perturbation" (Methods, section "Fair Bayesian Perturbation"): every training
sample's denoising loss is scaled by a random weight ``1 + sum_a sigma_g * eps``
whose per-group scale ``sigma`` is tuned online by Bayesian optimisation (GP +
UCB) to minimise the loss gap between demographic groups, while an exploitation
/ exploration mix keeps ``sigma`` moving between optimisations.

By default (``fit_lag=0``) the GP is fitted and the acquisition maximised when a
window closes, before the next step, exactly in the paper's order. With
``fit_lag=k`` the fit runs on a background thread and its optimum replaces sigma
``k`` steps after the window closed. The staleness is exactly ``k`` steps, fixed
and independent of timing (the step waits for the fit if it is not done), so
training stays reproducible and resumable; during those ``k`` steps sigma keeps
its exploitation / exploration walk from the pre-fit value, and those steps are
observed into the next window as usual.

Every departure from the paper (``variant``: a window-level objective, a GP over the
last K windows, mixing toward the GP's candidate, positive weights, per-group mean
offsets) is opt-in and lives in :mod:`fairdiffusion.training.fbp_variants`, with its reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fairdiffusion.training.fbp_variants import (
    FBPVariant,
    explore_around,
    group_mean_offsets,
    perturbation_weights,
    window_objective,
)

__all__ = [
    "FBPController",
    "FBPStepRecord",
    "FBPStepResult",
    "FBPVariant",
    "FBPWindowRecord",
    "derive_seed",
    "diagnose_windows",
]


@dataclass
class FBPStepResult:
    """Outcome of one :meth:`FBPController.observe` call.

    Attributes:
        step: 0-based index of this observation.
        y: BO objective, minus the summed per-attribute loss gaps.
        gaps: Loss gap (max - min present-group mean loss) per attribute.
        sigma: Perturbation scales after this step's update.
        window_closed: Whether this observation closed a window (BO ran).
        acquisition_value: UCB value at the chosen sigma when a fit succeeded.
        fit_failed: Whether the window closed without a usable GP optimum.
        fit_failure_reason: Why the fit was skipped or failed, else ``None``.
    """

    step: int
    y: float
    gaps: dict[str, float]
    sigma: list[float]
    window_closed: bool = False
    acquisition_value: float | None = None
    fit_failed: bool = False
    fit_failure_reason: str | None = None


@dataclass
class FBPStepRecord:
    """Per-step trajectory entry: the sigma that was *used* and its objective."""

    step: int
    y: float
    sigma: list[float]
    #: The per-group weight mean offsets used (``mean_shift`` variant), else empty.
    mean_shift: list[float] = field(default_factory=list)


@dataclass
class FBPWindowRecord:
    """Per-window trajectory entry written when a window closes."""

    window_index: int
    step: int
    acquisition_value: float | None
    #: Minus the mean objective of the window's own points (``objective: window``: its
    #: gap of bucket-normalised losses, relative units rather than loss units).
    mean_gap: float
    sigma: list[float] = field(default_factory=list)
    fit_failed: bool = False
    #: Step whose update first used this window's sigma (``step`` + ``fit_lag``).
    applied_step: int | None = None
    #: The per-group weight mean offsets chosen (``mean_shift`` variant), else empty.
    mean_shift: list[float] = field(default_factory=list)


@dataclass
class _PendingFit:
    xs: Tensor
    ys: Tensor
    window_index: int
    close_step: int
    apply_step: int
    #: The closed window's own mean gap (``xs``/``ys`` may hold earlier windows too).
    mean_gap: float | None = None
    future: Future[tuple[Tensor | None, float | None, str | None]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "xs": self.xs.clone(),
            "ys": self.ys.clone(),
            "window_index": self.window_index,
            "close_step": self.close_step,
            "apply_step": self.apply_step,
            "mean_gap": self.mean_gap,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _PendingFit:
        return cls(
            state["xs"].to(torch.float64),
            state["ys"].to(torch.float64),
            int(state["window_index"]),
            int(state["close_step"]),
            int(state["apply_step"]),
            state.get("mean_gap"),
        )


def derive_seed(*entropy: int) -> int:
    """Mixes non-negative ints into one 63-bit torch seed.

    The ``eps`` generator of :class:`FBPController` is seeded with
    ``derive_seed(seed, rank)``; the decay generator with ``seed`` itself.
    """
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class FBPController:
    """Online controller of the per-group perturbation scales ``sigma``.

    Args:
        attributes: Ordered mapping attribute name -> ordered group names.
            ``sigma`` has one entry per group, concatenated in this order.
        window: Observations per BO window (the authors' ``fair_time_window``;
            ``training.fbp.time_window``).
        exploitation_rate: rho in ``sigma <- rho*sigma + (1-rho)*U(0,1)``
            (the authors' ``fair_exploitation_rate``; ``training.fbp.exploitation_rate``).
        ucb_beta: Exploration weight of the UCB acquisition function.
        seed: Base seed; shared by all processes.
        rank: Process index; only changes the ``eps`` stream of
            :meth:`sample_weights`.
        fit_lag: 0 fits when the window closes (the paper's order); ``k`` in
            ``[1, window)`` fits on a background thread and applies the optimum
            ``k`` steps later.
        variant: Departures from the paper (:class:`FBPVariant`); ``None``: the paper.
        num_timesteps: The scheduler's training timesteps (``objective: window`` buckets them).
    """

    def __init__(
        self,
        attributes: Mapping[str, Sequence[str]],
        window: int = 30,
        exploitation_rate: float = 0.95,
        ucb_beta: float = 0.1,
        seed: int = 0,
        rank: int = 0,
        fit_lag: int = 0,
        variant: FBPVariant | None = None,
        num_timesteps: int = 1000,
    ) -> None:
        if not attributes or any(len(g) == 0 for g in attributes.values()):
            raise ValueError("attributes must be non-empty, each with at least one group")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 <= exploitation_rate <= 1.0:
            raise ValueError(f"exploitation_rate must be in [0, 1], got {exploitation_rate}")
        if not 0 <= fit_lag < window:
            raise ValueError(f"fit_lag must be in [0, window), got {fit_lag} with window {window}")
        self.attributes = {name: list(groups) for name, groups in attributes.items()}
        self.window, self.exploitation_rate, self.ucb_beta = window, exploitation_rate, ucb_beta
        self.seed, self.rank, self.fit_lag = seed, rank, fit_lag
        self.variant, self.num_timesteps = variant or FBPVariant(), num_timesteps
        sizes = [len(g) for g in self.attributes.values()]
        self._sizes = torch.tensor(sizes)
        self._offsets = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()])
        self.weight_names = [f"{a}={g}" for a, gs in self.attributes.items() for g in gs]
        # The paper initialises every group's perturbation scale to 1.
        self.sigma = torch.ones(sum(sizes), dtype=torch.float64)
        # Unit-box coordinates of the weight mean offsets (mean_shift variant; none
        # otherwise); 0.5 is offset 0, the paper's weights. The GP's point is (sigma, shift).
        n_shift = sum(sizes) - len(sizes) if self.variant.mean_shift else 0
        self.shift = torch.full((n_shift,), 0.5, dtype=torch.float64)
        #: The last GP optimum (at first the initial point): what ``mix_toward: candidate`` explores around.
        self._candidate = self._point()
        # eps differs per process (rank); the decay noise must not, so that
        # every process holds the same sigma without communicating.
        self._eps_gen = torch.Generator().manual_seed(derive_seed(seed, rank))
        self._decay_gen = torch.Generator().manual_seed(seed)
        self.step = 0
        self.window_index = 0
        self._win_x: list[Tensor] = []
        self._win_y: list[float] = []
        #: ``objective: window``: the window's (losses, group codes, timesteps), step by step.
        self._win_batches: list[tuple[Tensor, Tensor, Tensor]] = []
        #: ``history_windows`` K > 1: the GP points of the K - 1 windows before the open one.
        self._history: list[tuple[Tensor, Tensor]] = []
        self.steps: list[FBPStepRecord] = []
        self.windows: list[FBPWindowRecord] = []
        #: Wall time spent inside this controller on the caller's thread (fits included
        #: when ``fit_lag`` is 0; waits for an unfinished background fit otherwise).
        self.busy_seconds = 0.0
        self._executor: ThreadPoolExecutor | None = None
        self._pending: _PendingFit | None = None
        #: One-time cost paid here, at set-up, rather than inside the first window's fit on
        #: the training loop's clock: importing botorch and gpytorch (~2 s), then their
        #: first-call costs (~0.9 s, see :func:`_warm_up_bo`). Zero once a process has paid it.
        self.setup_seconds = _warm_up_bo()

    @property
    def n_attributes(self) -> int:
        """Number of protected attributes (columns of ``group_index``)."""
        return len(self.attributes)

    @property
    def mean_offsets(self) -> Tensor:
        """Per-group weight mean offsets in force, in sigma's order (zeros without ``mean_shift``)."""
        if not self.variant.mean_shift:
            return torch.zeros_like(self.sigma)
        return group_mean_offsets(self.shift, self._sizes.tolist(), self.variant.mean_shift_max)

    def _point(self) -> Tensor:
        return torch.cat([self.sigma, self.shift])

    def _set_point(self, point: Tensor) -> None:
        n = self.sigma.shape[0]
        self.sigma, self.shift = point[:n].clone(), point[n:].clone()

    def _shift_record(self) -> list[float]:
        return self.mean_offsets.tolist() if self.variant.mean_shift else []

    def _check_groups(self, group_index: Tensor) -> Tensor:
        if group_index.dim() != 2 or group_index.shape[1] != self.n_attributes:
            raise ValueError(
                f"group_index must have shape [N, {self.n_attributes}] with columns "
                f"{list(self.attributes)}, got {tuple(group_index.shape)}"
            )
        if group_index.dtype.is_floating_point or group_index.dtype == torch.bool:
            raise ValueError(f"group_index must be an integer tensor, got {group_index.dtype}")
        gi = group_index.detach().cpu().long()
        for a, name in enumerate(self.attributes):
            col, n = gi[:, a], int(self._sizes[a])
            if col.numel() and (col.min() < 0 or col.max() >= n):
                raise ValueError(
                    f"group_index for attribute {name!r} must lie in [0, {n - 1}], "
                    f"got values in [{int(col.min())}, {int(col.max())}]"
                )
        return gi

    def sample_weights(self, group_index: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Draws the per-sample loss weights of the current step.

        ``w_i = 1 + sum_a sigma[offset_a + group_index[i, a]] * eps_{i,a}``
        with ``eps ~ N(0, 1)`` of shape ``[B, n_attributes]`` (float64) drawn
        from this process's own generator (the paper; the ``weights`` and
        ``mean_shift`` variants change the formula, see
        :func:`~fairdiffusion.training.fbp_variants.perturbation_weights`).

        Args:
            group_index: Integer tensor ``[B, n_attributes]`` of group codes.
            dtype: Dtype of the returned weights.

        Returns:
            Tensor ``[B]`` on ``group_index.device``.

        Raises:
            ValueError: On a wrong shape or an out-of-range group code.
        """
        started = time.perf_counter()
        gi = self._check_groups(group_index)
        # Paper ("Fair Bayesian Perturbation"): each sample's loss weight is 1
        # plus a zero-mean Gaussian perturbation per protected attribute, scaled
        # by the sigma of the sample's group. Weights are not clipped (as in the
        # paper), so they can be negative when sigma is large. The variants
        # (weights: lognormal / clipped, mean_shift) are in fbp_variants.
        eps = torch.randn(gi.shape, generator=self._eps_gen, dtype=torch.float64)
        index = self._offsets + gi
        offsets = self.mean_offsets[index] if self.variant.mean_shift else None
        weights = perturbation_weights(self.variant.weights, eps, self.sigma[index], offsets)
        weights = weights.to(device=group_index.device, dtype=dtype)
        self.busy_seconds += time.perf_counter() - started
        return weights

    def group_gaps(self, per_sample_loss: Tensor, group_index: Tensor) -> dict[str, float]:
        """Per-attribute loss gap over the groups present in the batch.

        Samples with a non-finite loss are ignored; an attribute with fewer than
        two present groups has gap 0 (the authors' script instead lets an absent
        group's NaN mean zero the whole attribute's gap).

        Args:
            per_sample_loss: ``[N]`` per-sample losses.
            group_index: Integer tensor ``[N, n_attributes]`` of group codes.

        Returns:
            Mapping attribute name -> max minus min group mean loss.

        Raises:
            ValueError: On mismatched lengths, a wrong shape or a bad group code.
        """
        loss = per_sample_loss.detach().cpu().to(torch.float64).reshape(-1)
        gi = self._check_groups(group_index)
        if loss.shape[0] != gi.shape[0]:
            raise ValueError(f"{loss.shape[0]} losses but {gi.shape[0]} group rows")
        finite = torch.isfinite(loss)
        gaps: dict[str, float] = {}
        for a, name in enumerate(self.attributes):
            means = [loss[m].mean() for g in range(int(self._sizes[a])) if (m := finite & (gi[:, a] == g)).any()]
            gaps[name] = float(max(means) - min(means)) if len(means) >= 2 else 0.0
        return gaps

    def observe(self, per_sample_loss: Tensor, group_index: Tensor, timesteps: Tensor | None = None) -> FBPStepResult:
        """Records one optimiser step and updates ``sigma``.

        Must be called with the loss gathered across all processes, so that
        every process sees identical inputs and keeps an identical ``sigma``.

        Args:
            per_sample_loss: ``[N]`` per-sample (unweighted) losses.
            group_index: Integer tensor ``[N, n_attributes]`` of group codes.
            timesteps: ``[N]`` each sample's timestep; needed by ``objective: window``.

        Returns:
            The :class:`FBPStepResult` of this step.

        Raises:
            ValueError: On bad group codes, or no ``timesteps`` with ``objective: window``.
        """
        started = time.perf_counter()
        gaps = self.group_gaps(per_sample_loss, group_index)
        # Paper: the BO objective is the negative sum of group loss gaps.
        y = -sum(gaps.values())
        result = FBPStepResult(step=self.step, y=y, gaps=gaps, sigma=[])
        self.steps.append(FBPStepRecord(self.step, y, self.sigma.tolist(), self._shift_record()))
        self._win_x.append(self._point())
        self._win_y.append(y)
        if self.variant.objective == "window":
            self._keep_batch(per_sample_loss, group_index, timesteps)
        if self._pending is not None and self.step >= self._pending.apply_step:
            self._apply_pending(result)
        if len(self._win_y) >= self.window:
            if self.fit_lag == 0:
                self._close_window(result)
            else:
                self._submit_window()
        self._mix()
        result.sigma = self.sigma.tolist()
        self.step += 1
        self.busy_seconds += time.perf_counter() - started
        return result

    def _keep_batch(self, per_sample_loss: Tensor, group_index: Tensor, timesteps: Tensor | None) -> None:
        if timesteps is None:
            raise ValueError("objective 'window' needs each sample's timestep: pass timesteps to observe")
        loss = per_sample_loss.detach().cpu().to(torch.float64).reshape(-1)
        steps = timesteps.detach().cpu().long().reshape(-1)
        if steps.shape != loss.shape:
            raise ValueError(f"{loss.shape[0]} losses but {steps.shape[0]} timesteps")
        self._win_batches.append((loss, self._check_groups(group_index), steps))

    def _mix(self) -> None:
        point = self._point()
        if self.variant.mix_toward == "candidate":
            target = explore_around(self._candidate, self.variant.candidate_noise, self._decay_gen)
        else:
            # Order follows the authors' training script: the exploration mix is
            # applied on EVERY step, including right after a window's BO update
            # (so the GP candidate is already mixed once before it is first used).
            target = torch.rand(point.shape, generator=self._decay_gen, dtype=torch.float64)
        rho = self.exploitation_rate
        self._set_point(rho * point + (1.0 - rho) * target)

    def _window_points(self) -> tuple[Tensor, Tensor]:
        """The open window's GP points: one per step (paper), or one for the whole window."""
        xs = torch.stack(self._win_x)
        if self.variant.objective == "step":
            return xs, torch.tensor(self._win_y, dtype=torch.float64).unsqueeze(-1)
        losses, groups, timesteps = (torch.cat(part) for part in zip(*self._win_batches, strict=True))
        sizes, buckets = self._sizes.tolist(), self.variant.timestep_buckets
        y, _ = window_objective(losses, groups, timesteps, sizes, buckets, self.num_timesteps)
        # One point per window (fbp_variants, reason 2): the mean of the points used over
        # the window, which shaped its losses. Per-step points from the window so far
        # would be 30 correlated views of one number that the GP takes as independent.
        return xs.mean(dim=0, keepdim=True), torch.tensor([[y]], dtype=torch.float64)

    def _take_window(self) -> tuple[Tensor, Tensor, float]:
        """Closes the open window: the GP's points (with ``history_windows``) and the window's mean gap."""
        xs, ys = self._window_points()
        fit = [*self._history, (xs, ys)]
        # Variant (fbp_variants, reason 4): with history_windows K > 1 the GP also sees
        # the K - 1 windows before this one; the paper (K = 1) keeps none.
        keep = self.variant.history_windows - 1
        self._history = fit[-keep:] if keep else []
        self._win_x, self._win_y, self._win_batches = [], [], []
        return torch.cat([x for x, _ in fit]), torch.cat([y for _, y in fit]), -float(ys.mean())

    def _close_window(self, result: FBPStepResult) -> None:
        xs, ys, mean_gap = self._take_window()
        candidate, acq, reason = self._optimise_window(xs, ys, self.window_index)
        self._record_window(result, xs, ys, candidate, acq, reason, self.step, mean_gap)

    def _optimise_window(
        self, xs: Tensor, ys: Tensor, window_index: int
    ) -> tuple[Tensor | None, float | None, str | None]:
        if ys.shape[0] < 2:
            return None, None, "fewer than 2 points to fit (objective: window, first window)"
        if float(ys.max() - ys.min()) == 0.0:
            # Constant objective (e.g. every batch held a single group): the
            # GP has nothing to learn and Standardize would divide by zero.
            return None, None, "constant objective in window"
        try:
            candidate, acq = self._fit_and_maximise(xs, ys, window_index)
        except Exception as exc:  # any BO failure must not stop training
            return None, None, f"{type(exc).__name__}: {exc}"
        return candidate, acq, None

    def _submit_window(self) -> None:
        xs, ys, mean_gap = self._take_window()
        self._pending = _PendingFit(xs, ys, self.window_index, self.step, self.step + self.fit_lag, mean_gap)
        self._start_pending()

    def _start_pending(self) -> None:
        assert self._pending is not None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fbp-fit")
        pending = self._pending
        pending.future = self._executor.submit(self._optimise_window, pending.xs, pending.ys, pending.window_index)

    def _apply_pending(self, result: FBPStepResult) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None and pending.future is not None
        candidate, acq, reason = pending.future.result()
        mean_gap = -float(pending.ys.mean()) if pending.mean_gap is None else pending.mean_gap
        self._record_window(result, pending.xs, pending.ys, candidate, acq, reason, pending.close_step, mean_gap)

    def close(self) -> None:
        """Stops the background fitting thread, if any (pending fits are dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _record_window(
        self,
        result: FBPStepResult,
        xs: Tensor,
        ys: Tensor,
        candidate: Tensor | None,
        acq: float | None,
        reason: str | None,
        close_step: int,
        mean_gap: float,
    ) -> None:
        # Degenerate window (no candidate): training must not stop because BO could
        # not run, so we fall back to the best sigma actually observed in this window
        # (first argmax of y; with history_windows, in the windows fitted), a safe,
        # data-backed choice.
        self._set_point(candidate if candidate is not None else xs[int(torch.argmax(ys))])
        self._candidate = self._point()
        self.windows.append(
            FBPWindowRecord(
                window_index=self.window_index,
                step=close_step,
                acquisition_value=acq,
                mean_gap=mean_gap,
                sigma=self.sigma.tolist(),
                fit_failed=reason is not None,
                applied_step=self.step,
                mean_shift=self._shift_record(),
            )
        )
        result.window_closed, result.acquisition_value = True, acq
        result.fit_failed, result.fit_failure_reason = reason is not None, reason
        self.window_index += 1

    def _fit_and_maximise(self, xs: Tensor, ys: Tensor, window_index: int) -> tuple[Tensor, float]:
        # On the training thread (fit_lag 0) the fit runs single-threaded: a 30-point GP is
        # dispatch-bound, and torch's intra-op threads only add synchronisation (measured on
        # 2 cores: fit 0.21 s on one thread, 1.28 s on two; the same model and candidate).
        # A background fit (fit_lag > 0) must not change the training thread's thread count.
        with _single_threaded(enabled=self.fit_lag == 0):
            return self._fit_and_maximise_bo(xs, ys, window_index)

    def _fit_and_maximise_bo(self, xs: Tensor, ys: Tensor, window_index: int) -> tuple[Tensor, float]:
        cand, acq = _fit_and_search(xs, ys, self.seed + window_index, self.ucb_beta)
        cand = cand.detach().reshape(-1).to(torch.float64)
        if acq is None or not bool(torch.isfinite(cand).all() & torch.isfinite(acq).all()):
            raise FloatingPointError("non-finite BO candidate or acquisition value")
        return cand.clamp(0.0, 1.0), float(acq)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume (plain tensors / Python types)."""
        return {
            "attributes": {k: list(v) for k, v in self.attributes.items()},
            "window": self.window,
            "seed": self.seed,
            "rank": self.rank,
            "sigma": self.sigma.clone(),
            "window_x": [x.clone() for x in self._win_x],
            "window_y": list(self._win_y),
            "eps_generator": self._eps_gen.get_state(),
            "decay_generator": self._decay_gen.get_state(),
            "step": self.step,
            "window_index": self.window_index,
            "steps": [asdict(r) for r in self.steps],
            "windows": [asdict(r) for r in self.windows],
            # A fit still running is saved as its inputs: it is deterministic, so
            # a resumed run refits it and applies it at the same step.
            "pending": None if self._pending is None else self._pending.state_dict(),
            "variant": asdict(self.variant),
            "shift": self.shift.clone(),
            "candidate": self._candidate.clone(),
            "history": [(x.clone(), y.clone()) for x, y in self._history],
            "window_batches": [tuple(t.clone() for t in batch) for batch in self._win_batches],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict`.

        If the state was saved by a process of a different rank, the shared
        state is restored but the ``eps`` generator is re-seeded from
        ``(seed, rank, step)`` so that processes stay decorrelated.

        Raises:
            ValueError: If attributes, window or seed differ from this controller.
        """
        for key in ("attributes", "window", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict {key}={state[key]!r} != {getattr(self, key)!r}")
        # A state saved before the variants existed is the paper's.
        variant = state.get("variant", asdict(FBPVariant()))
        if variant != asdict(self.variant):
            raise ValueError(f"state_dict variant={variant!r} != {asdict(self.variant)!r}")
        self.sigma = state["sigma"].clone().to(torch.float64)
        self.shift = state.get("shift", self.shift).clone().to(torch.float64)
        self._candidate = state.get("candidate", self._point()).clone().to(torch.float64)
        self._history = [(x.to(torch.float64), y.to(torch.float64)) for x, y in state.get("history", [])]
        self._win_batches = [(loss, groups, steps) for loss, groups, steps in state.get("window_batches", [])]
        self._win_x = [x.clone().to(torch.float64) for x in state["window_x"]]
        self._win_y = [float(y) for y in state["window_y"]]
        self.step, self.window_index = int(state["step"]), int(state["window_index"])
        self._decay_gen.set_state(state["decay_generator"])
        if int(state["rank"]) == self.rank:
            self._eps_gen.set_state(state["eps_generator"])
        else:
            self._eps_gen.manual_seed(derive_seed(self.seed, self.rank, self.step))
        self.steps = [FBPStepRecord(**r) for r in state["steps"]]
        self.windows = [FBPWindowRecord(**r) for r in state["windows"]]
        pending = state.get("pending")
        self._pending = None if pending is None else _PendingFit.from_state(pending)
        if self._pending is not None:
            self._start_pending()


def _load_bo() -> tuple[Any, Any, Any, Any, Any]:
    """botorch's pieces, imported on first use (heavy; only FBP needs them)."""
    from botorch.acquisition import UpperConfidenceBound
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.optim import optimize_acqf
    from gpytorch.mlls import ExactMarginalLogLikelihood

    return UpperConfidenceBound, fit_gpytorch_mll, SingleTaskGP, optimize_acqf, ExactMarginalLogLikelihood


@contextmanager
def _without_debug_checks() -> Iterator[None]:
    """gpytorch's and linear_operator's debug checks off (both default on) for one fit.

    They validate inputs on every GP call and never change a number: over 8 windows the
    sigma chosen was bit-identical with and without them, and a 30-point, 7-dimensional
    window took 0.26 s instead of 0.34 s (single thread, median of 8).
    """
    import gpytorch
    import linear_operator

    with gpytorch.settings.debug(False), linear_operator.settings.debug(False):
        yield


def _fit_and_search(xs: Tensor, ys: Tensor, seed: int, beta: float) -> tuple[Tensor, Tensor]:
    """Fits a ``SingleTaskGP`` to the points and maximises UCB over the unit box: (candidate, value)."""
    UpperConfidenceBound, fit_gpytorch_mll, SingleTaskGP, optimize_acqf, ExactMarginalLogLikelihood = _load_bo()
    d = xs.shape[1]
    # Seeded and isolated from the global RNG, so every process gets the
    # same candidate and the caller's RNG streams are left untouched. On the
    # background thread (fit_lag > 0) this forks the global CPU generator
    # while training runs, so the training loop must draw from its own
    # generators, never the global one (fairdiffusion.training.loop does).
    with torch.random.fork_rng(devices=[]), _without_debug_checks():
        torch.manual_seed(seed)
        gp = SingleTaskGP(xs.to(torch.float64), ys.to(torch.float64))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
        ucb = UpperConfidenceBound(gp, beta=beta)
        # Paper: sigma is searched in the unit box; the restart / raw-sample
        # budget matches the authors' training script.
        bounds = torch.stack([torch.zeros(d), torch.ones(d)]).to(torch.float64)
        return optimize_acqf(ucb, bounds=bounds, q=1, num_restarts=5, raw_samples=20)


@cache
def _warm_up_bo() -> float:
    """Imports botorch and runs one fit on a fixed toy window, once per process; returns the seconds.

    The first GP fit and UCB search of a process cost about 0.9 s more than later ones
    (lazy imports inside botorch and scipy, torch's first-call dispatch set-up): 1.16 s
    against 0.24-0.5 s on 2 cores. Paid here, at the controller's construction, beside the
    import, so that no window pays it on the training loop's clock. The toy fit goes through
    the windows' own :func:`_fit_and_search` and leaves no trace: its random draws come from
    a forked generator, and it changes no later fit (the candidates of a test run are
    bit-identical with and without it).
    """
    started = time.perf_counter()
    xs = torch.linspace(0.0, 1.0, 8, dtype=torch.float64).unsqueeze(-1).repeat(1, 2)
    xs[:, 1] = xs[:, 1].flip(0)
    ys = torch.sin(6.0 * xs[:, :1]) + xs[:, 1:]
    with _single_threaded(enabled=True):
        _fit_and_search(xs, ys, seed=0, beta=0.1)
    return time.perf_counter() - started


@contextmanager
def _single_threaded(enabled: bool) -> Iterator[None]:
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(threads)


#: A gap whose range over the recent windows is below this fraction of its mean is flat.
FLAT_GAP_TOLERANCE = 0.02
#: Distance from 0 or 1 within which a sigma entry counts as sitting on the bound.
BOUND_TOLERANCE = 1e-3


def diagnose_windows(windows: Sequence[FBPWindowRecord], weight_names: Sequence[str], patience: int) -> dict[str, str]:
    """Signs that Fair Bayesian Perturbation is visibly not working.

    Looks at the last ``patience`` windows: a sigma entry that the GP put on the
    same bound of the search box every time (the optimum lies outside the box, or
    the objective does not depend on it), and a subgroup loss gap whose range is
    below :data:`FLAT_GAP_TOLERANCE` of its mean (the perturbation does not move it).

    Args:
        windows: Window records, oldest first.
        weight_names: Names of the sigma entries (``attribute=group``).
        patience: How many recent windows must agree.

    Returns:
        A message per finding, keyed by what it is about (``sigma_at_bound/<name>`` or
        ``flat_gap``) so that a caller can warn once per kind; empty when there are
        fewer windows or nothing to report.
    """
    recent = list(windows)[-patience:]
    if len(recent) < patience:
        return {}
    findings: dict[str, str] = {}
    for j, name in enumerate(weight_names):
        values = [w.sigma[j] for w in recent]
        for bound in (0.0, 1.0):
            if all(abs(v - bound) <= BOUND_TOLERANCE for v in values):
                findings[f"sigma_at_bound/{name}"] = (
                    f"sigma[{name}] sat at its bound {bound:g} for the last {patience} windows: the GP finds "
                    "no better value inside [0, 1] (check the group's size and the loss gap)"
                )
    gaps = [w.mean_gap for w in recent]
    mean = sum(gaps) / len(gaps)
    if max(gaps) - min(gaps) <= FLAT_GAP_TOLERANCE * abs(mean):
        findings["flat_gap"] = (
            f"the subgroup loss gap stayed flat at {mean:.4g} (range {max(gaps) - min(gaps):.2g}) over the last "
            f"{patience} windows: the perturbation is not moving it"
        )
    return findings
