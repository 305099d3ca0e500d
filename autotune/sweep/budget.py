"""A sweep's time: the clock, the shares of the budget, and what a trial is expected to cost.

The budget is split in two: the search may spend all but `CONFIRM_SHARE` of it, which is kept
for re-measuring the best layouts against the baseline (`autotune.sweep.confirm`). A trial's
expected cost comes from what its backend's measured trials took (`Ledger.costs`), so a wider
layout (more tokens a pass) is priced by its width. A search trial measures as many windows as
fit its share of the search (`trial_pacing`): a short budget measures more layouts, each more
roughly, and the paired re-measurement measures the best ones fully.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace

from autotune.agreement import answer_family, family_reference, is_reference
from autotune.config import TrialConfig
from autotune.measure import Pacing, spent_prompts, warmed_by_ramp, width_of
from autotune.space import config_key
from autotune.study import Role
from backends import backend_class

__all__ = [
    "CONFIRM_SHARE",
    "LAYOUTS_AIMED",
    "MARGIN_S",
    "REFERENCE_PACING",
    "REFERENCE_PROMPTS",
    "Budget",
]

CONFIRM_SHARE = 0.25  # of the budget kept for the paired re-measurement
MARGIN_S = 5.0  # kept back from every deadline for writing the outputs
# A backend not measured yet is priced at this many times its first guess when deciding what
# fits the time left: the guess is one number for every machine (hf on 2 vCPUs: 9.6-23.6
# tokens/s at batch 1-4 where it guesses 25), and a trial that overruns eats the time kept for
# re-measuring.
_UNMEASURED = 2.0
# The most one search trial may be expected to take, as a share of the search's part of the
# budget: a 10-minute sweep spent a third of its search on one climb step to batch 64.
_STEP_SHARE = 0.2
# The layouts a search aims to measure at least: a trial measures fewer windows (down to one)
# until it is expected to fit the search's part of the budget over this many. A 5-minute sweep
# on 2 vCPUs measured 16 layouts with three windows each (docs/results/dev-2vcpu-epyc.md).
LAYOUTS_AIMED = 30
# A reference run answers the first prompts of every trial's pass (the same balanced order)
# once, cold; the agreement of a trial is over these.
REFERENCE_PROMPTS = 8
REFERENCE_PACING = Pacing(prompts=REFERENCE_PROMPTS, warmup=0)


class Budget:
    """The clock of one sweep and its shares; what trials are expected to cost, from the
    ``ledger``'s measured costs (`autotune.sweep.ledger.Ledger`)."""

    def __init__(self, options, clock: Callable[[], float], ledger, target, topology) -> None:
        self.options = options
        self.clock = clock
        self.ledger = ledger
        self.target = target
        self.topology = topology
        self.started = clock()

    def elapsed_s(self) -> float:
        return self.clock() - self.started

    def time_left_s(self) -> float:
        """Seconds left of the whole budget."""
        return self.options.budget_s - self.elapsed_s()

    def search_left_s(self) -> float:
        """Seconds left for the search: the budget less the share kept for confirming."""
        return self.time_left_s() - self.options.budget_s * CONFIRM_SHARE

    def room_s(self) -> float:
        """The most one search trial may be expected to take now: the search's time left, and
        never more than `_STEP_SHARE` of the search's part of the budget."""
        search = self.options.budget_s * (1 - CONFIRM_SHARE)
        return min(self.search_left_s(), _STEP_SHARE * search)

    def trial_share_s(self) -> float:
        """What one search trial is meant to take: the search's part of the budget over
        `LAYOUTS_AIMED`."""
        return self.options.budget_s * (1 - CONFIRM_SHARE) / LAYOUTS_AIMED

    def sweep_pacing(self) -> Pacing:
        """The options' pacing, each pass ending when its last window closes
        (`Pacing.cut_tail`), for the search trials and the pairs alike: a one-window pass run
        to its end credits its window with tokens generated in the tail (on 2 vCPUs, a batched
        layout 10-17% too fast, `experiments/bench_tail.py`)."""
        return replace(self.options.pacing, cut_tail=True)

    def trial_pacing(self, config: TrialConfig) -> Pacing:
        """The sweep's pacing for a trial of ``config``, with as many windows a pass, from the
        pacing's own down to one, as fit `trial_share_s` (all of them where --prompts sized
        the passes), and no warmup wave where the pass's own ramp-up warms the layout
        (`warmed_by_ramp`); each pass cut at its last window (`sweep_pacing`)."""
        pacing = self.sweep_pacing()
        if pacing.prompts:
            return pacing
        if self.warmed_by_ramp(config):
            pacing = replace(pacing, warmup=0)
        for windows in range(pacing.windows, 1, -1):
            fitted = replace(pacing, windows=windows)
            if self.expected_s(config, fitted) <= self.trial_share_s():
                return fitted
        return replace(pacing, windows=1)

    def warmed_by_ramp(self, config: TrialConfig) -> bool:
        """Whether a search trial of ``config`` needs no warmup wave (`measure.warmed_by_ramp`
        under the sweep's pacing)."""
        return warmed_by_ramp(config, self.topology, self.options.pacing)

    def planned_tokens(self, config: TrialConfig, pacing: Pacing | None = None) -> int:
        """Tokens a trial of ``config`` generates at least: its warmup waves and its timed
        passes, each sized by the pacing (the trial's unless given) for the layout's width, up
        to its cut where it has one (`spent_prompts`)."""
        pacing, width = pacing or self.trial_pacing(config), width_of(config)
        requests = pacing.warmup * width + pacing.repeats * spent_prompts(config, pacing)
        return requests * config.max_new_tokens

    def expected_s(self, config: TrialConfig, pacing: Pacing | None = None) -> float:
        """What a trial of ``config`` is expected to take: its backend's load time and seconds
        per generated token as measured so far (else the backend's first guess), times the
        tokens the trial generates (more for a wider layout). The seconds per token are those
        of its backend's trials at the same width where there are some (their median), else
        the backend's best so far: a wider layout is worth trying only if it is at least that
        fast (the naive and the recipes' batch-1 layouts would price it at twice its cost).
        A layout on fewer cores than those it is priced by is slower in proportion
        (`_fewer_cores`)."""
        seen = self.ledger.costs.get(config.backend) or self._kin_costs(config)
        if seen:
            load = statistics.fmean(load for _, _, load, _ in seen)
            width = width_of(config)
            slower = self._fewer_cores(config)
            alike = [per * slower(threads) for w, threads, _, per in seen if w == width]
            per_token = statistics.median(alike) if alike else min(per for *_, per in seen)
        else:
            guess = backend_class(config.backend)
            load, per_token = guess.first_guess_load_s, 1.0 / guess.first_guess_tokens_per_s
        return load + per_token * self.planned_tokens(config, pacing)

    def _fewer_cores(self, config: TrialConfig) -> Callable[[int], float]:
        """For a measured layout of ``config``'s width that ran ``threads`` threads, how many
        times slower a token of ``config`` is taken to be: that layout's share of the usable
        CPUs over its own where it computes on the CPUs only, else 1. A real 5-minute sweep
        priced a 1x1 batch-32 neighbour by 1x2 batch 32 at 26 s, and it took 44 s."""
        if any(d.is_gpu for d in backend_class(config.backend).placement(config, self.topology)):
            return lambda threads: 1.0
        usable = self.topology.usable_cpus
        own = max(1, min(config.total_threads, usable))
        return lambda threads: max(1.0, min(threads, usable) / own)

    def _kin_costs(self, config: TrialConfig) -> list[tuple[int, int, float, float]]:
        """The measured costs of the other backends that run the same weights (its answer
        family: hf's for ddp and the pipeline), for a backend with none yet: a far better
        guess than one number for every machine (ddp on a GPU node was priced at 685 s where
        hf there ran 11 600 tokens/s)."""
        family = answer_family(config)
        return [
            cost
            for backend, costs in self.ledger.costs.items()
            if backend_class(backend).answer_family == family
            for cost in costs
        ]

    def cost_s(self, config: TrialConfig) -> float:
        """What running ``config`` now is expected to take: its trial, and first its answer
        family's reference run where that has not run yet; `_UNMEASURED` times that for a
        backend with no measured trial."""
        family = answer_family(config)
        cost = self.expected_s(config, self.trial_pacing(config))
        if family not in self.ledger.references and not is_reference(config):
            reference = family_reference(family, self.target, self.options.base)
            cost += self.expected_s(reference, REFERENCE_PACING)
        return cost if config.backend in self.ledger.costs else _UNMEASURED * cost

    def affordable(self, config: TrialConfig, left: float) -> bool:
        """Not measured yet, and expected to fit the ``left`` seconds of the search."""
        return config_key(config) not in self.ledger.seen and self.cost_s(config) <= left

    def trial_deadline_s(self, config: TrialConfig, role: Role) -> float:
        """How long one trial may run: never into the confirmation share's last seconds, never
        more than 4x its expected cost (the baseline, which every speedup needs, up to 10 min)."""
        room = self.time_left_s() - MARGIN_S
        limit = max(5.0, min(room, 4 * self.expected_s(config) + 30))
        if role is Role.BASELINE:
            limit = max(limit, min(room, 600.0))
        if self.options.trial_timeout_s:
            limit = min(limit, self.options.trial_timeout_s)
        return limit
