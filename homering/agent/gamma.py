"""The head's adaptive draft length: how many draft tokens (γ) a speculative trip carries.

:class:`GammaChooser` is a cost model fed by the trips it chose: no cluster state, one per plan and drafter on
the head (:class:`~homering.agent.speculative.Drafters`).

Sources: Leviathan et al. 2023, "Fast inference from transformers via speculative decoding", §3.4 (the
expected tokens per trip); the asynchronous drafting of pipelined speculative decoding (PipeSpec, McDanel et
al. 2025) for the drafts ahead whose wait it predicts.
"""

from __future__ import annotations

from homering.engine.drafting import GAMMA_MAX, Speculative

VERIFY_SHARE = 0.03
"""Prior cost of one more token in a trip's batch, as a share of the trip (the ring's hops dominate)."""
EXPLORE_EVERY = 8
"""Every this many trips, γ next to the best one is tried (its measured cost may have changed)."""
PLAIN_EXPLORE = 4
"""... and only every PLAIN_EXPLORE times as many when plain trips (γ = 0) are best: drafts that are not kept
cost their draft and verification time, which must stay a few percent of plain decoding."""
BACKOFF_MAX = 3
"""Each trip in a row whose drafts were all lost doubles that spacing, up to 2^BACKOFF_MAX times: a draft that
never agrees is probed ever more rarely (a kept draft resets it)."""
DECAY = 0.8
"""Weight of the past in the measured averages, per observation."""
PROBE_BUDGET = 0.02
"""While plain trips are best, probes may cost at most this share of the plain trips' time: a probe's measured
excess (a draft model catching up on the tokens since its last draft, the verification's extra tokens) spaces
the next one out."""
AHEAD_MIN = 0.3
"""A trip's next draft is drafted while the trip runs when the chance that it keeps every draft (α^(γ+1)) is
at least this (:meth:`~homering.engine.drafting.ModelDrafter.draft_ahead`)."""


def _ema(old: float | None, new: float) -> float:
    return new if old is None else DECAY * old + (1 - DECAY) * new


class GammaChooser:
    """Chooses a draft model's γ per trip: the draft length with the fewest milliseconds per kept token (a
    prompt lookup drafts as far as its match is trusted instead:
    :meth:`~homering.engine.drafting.NgramDrafter.propose`).

    The cost of a γ is the latency model of Leviathan et al. 2023, §3.4, time per trip over the tokens a
    trip keeps on average,

        (t(γ) + w(γ)) / E(γ),   E(γ) = (1 - α^(γ+1)) / (1 - α),

    with α the per-token acceptance rate measured over all trips; t(γ) the measured time of a trip with γ
    drafts around the ring (a moving average per γ; until measured T + γ c_v, with T a plain trip's time,
    the plan's predicted time per token until trips are measured, and c_v a prior share of T); and w(γ)
    the head's wait for the draft, γ c_d with c_d a draft token's measured time. With ``ahead`` (a draft
    model that drafts the next trip while this one runs, when α^(γ+1) ≥ :data:`AHEAD_MIN`) the draft is
    ready when the trip kept every draft and its extra token was the draft's guess, so w(γ) = γ c_d (1 -
    α^(γ+1)). Waits are modelled rather than measured per γ: the trip after a change of γ drafts its extra
    tokens on the spot, and a measured cost would hold that once-only wait against the longer draft.

    The tokens a trip happened to keep do not enter t(γ): they vary from trip to trip far more than its
    time does, and α pools them over every γ. Every :data:`EXPLORE_EVERY` trips a neighbour of the best γ
    is tried, so a γ that got cheaper is found again; with drafts that are never kept γ settles at 0 (plain
    trips) and the loss is the occasional one-token probe, spaced so that what probes cost over plain trips
    (measured: a draft model catches up on every token since its last draft) stays within
    :data:`PROBE_BUDGET`. γ grows by one at a time, like TCP's slow start: a longer draft is tried only once
    the longest so far paid off (a first trip with γ = 6 that is all rejected costs six drafted tokens and a
    7-token verification). One chooser serves every request of a drafter on the head, so what one request
    measured helps the next.

    Args:
        trip_ms: the plan's predicted time of one trip (ms), or 0 when unknown.
        ahead: the drafter drafts ahead (:meth:`~homering.engine.drafting.ModelDrafter.draft_ahead`).
    """

    def __init__(self, trip_ms: float, *, ahead: bool = False) -> None:
        self.acc, self.rej = 2.0, 1.0  # decayed counts of accepted and rejected draft tokens (prior α ≈ 0.6)
        self.trip_ms = trip_ms or 0.0
        self.ahead = ahead
        self.draft_ms: float | None = None  # c_d: ms per draft token
        self.time: dict[int, float] = {}  # γ → measured ms of a trip with γ drafts around the ring
        self._trips = 0
        self._up = True
        self._probe_excess = 0.0  # ms a probe (a γ > 0 trip while plain trips were best) cost over a plain trip
        self._lost = 0  # trips in a row whose drafts were all lost
        self._next_probe = 0  # the trip count at which plain trips may be probed again
        self._probing = False  # the last γ chosen was a probe
        self._cap = 1  # the longest draft worth trying yet: one more than the longest that paid off (slow start)

    @property
    def alpha(self) -> float:
        return self.acc / (self.acc + self.rej)

    def wait(self, g: int) -> float:
        """w(γ): the head's expected wait for a draft of ``g`` tokens, ms."""
        keep = min(self.alpha, 0.999) ** (g + 1)
        hidden = self.ahead and g > 0 and keep >= AHEAD_MIN
        return g * (self.draft_ms or 0.0) * ((1 - keep) if hidden else 1.0)

    def predicted(self, g: int) -> float:
        """Milliseconds per kept token with γ = ``g``, from its measured trip time (predicted until measured)."""
        a, t = min(self.alpha, 0.999), max(self.trip_ms, 1e-3)
        time_ = self.time.get(g, t + g * VERIFY_SHARE * t) + self.wait(g)
        return time_ * (1 - a) / (1 - a ** (g + 1)) if g else time_

    @property
    def cost(self) -> dict[int, float]:
        """γ → ms per kept token, for the γ measured so far."""
        return {g: self.predicted(g) for g in self.time}

    @property
    def best(self) -> int:
        """The γ that pays best as measured so far, up to the longest worth trying (0: plain trips)."""
        return min(range(min(self._cap, GAMMA_MAX) + 1), key=self.predicted)

    def choose(self, room: int, s: Speculative) -> int:
        """γ for the next trip of a request with settings ``s``, at most ``room`` (what is left of
        max_tokens and the context)."""
        top = min(s.n_max, room)
        if top <= 0:
            return 0
        low = min(s.n_min, top)
        if not s.adaptive:
            return top
        top = max(low, min(top, self._cap))
        best = min(range(low, top + 1), key=self.predicted)
        self._trips += 1
        if best == 0:
            if self._trips < self._next_probe:
                return 0
            budget = PROBE_BUDGET * max(self.trip_ms, 1e-3)  # ms of probing allowed per plain trip
            least = EXPLORE_EVERY * PLAIN_EXPLORE << min(self._lost, BACKOFF_MAX)
            self._next_probe = self._trips + max(least, int(self._probe_excess / budget))
            self._probing = top > 0
            return min(top, 1)
        if self._trips % EXPLORE_EVERY == 0:
            self._up = not self._up
            step = 1 if (self._up or best == low) and best < top else -1
            return max(low, min(top, best + step))
        return best

    @property
    def probing(self) -> bool:
        """Whether the last γ chosen is a probe: a draft while plain trips are best."""
        return self._probing

    def defer(self) -> None:
        """The γ just chosen does not go (its drafter is not ready to draft cheaply) and the trip is plain; a
        probe goes on the next trip instead."""
        if self._probing:
            self._probing = False
            self._next_probe = self._trips + 1

    def record(
        self,
        gamma: int,
        drafted: int,
        trip_ms: float,
        draft_ms: float,
        *,
        accepted: int,
        catch_up_ms: float = 0.0,
        token_ms: float | None = None,
    ) -> None:
        """A trip asked for ``gamma`` drafts, verified ``drafted`` (padding included) and kept ``accepted`` of
        them; it took ``trip_ms`` around the ring after ``draft_ms`` of drafting, of which ``catch_up_ms``
        brought a draft model up to the tokens since its last draft: a cost of drafting after a pause, which
        counts against probes (:data:`PROBE_BUDGET`) but not in the cost of a γ while drafting goes on.
        ``token_ms``: the draft model's own time per draft token, when it measures it (else the trip's
        drafting per token stands for it)."""
        steady = max(0.0, draft_ms - catch_up_ms)
        gamma = gamma if drafted else 0  # nothing to draft (a lookup without a match): a plain trip
        if drafted:
            self.acc = DECAY * self.acc + accepted
            self.rej = DECAY * self.rej + (1 if accepted < drafted else 0)
            self.draft_ms = _ema(self.draft_ms, token_ms if token_ms is not None else steady / drafted)
            self._lost = 0 if accepted else self._lost + 1
        else:
            self.trip_ms = trip_ms if not self.trip_ms else _ema(self.trip_ms, trip_ms)
        if (self._probing or not accepted) and gamma and self.trip_ms:  # a probe, or a draft that was all lost
            excess = max(0.0, trip_ms + draft_ms - (accepted + 1) * self.trip_ms)
            # a costlier probe counts at once (the draft model's weights may have left the page cache since the
            # last one), a cheaper one only on average
            self._probe_excess = max(excess, _ema(self._probe_excess or None, excess))
            spacing = int(self._probe_excess / (PROBE_BUDGET * self.trip_ms))
            self._next_probe = max(self._next_probe, self._trips + spacing)  # what it cost spaces the next one out
        self._probing = False
        self.time[gamma] = _ema(self.time.get(gamma), trip_ms)
        if gamma >= self._cap and self.predicted(gamma) < self.predicted(gamma - 1):  # the longer draft pays off
            self._cap = gamma + 1
