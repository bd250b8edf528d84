"""Exact multiple-choice knapsack (MCKP) with a certified optimality gap.

Problem: channels i = 1..N, each with options j (integer cost ``c_ij >= 0``, real distortion
``d_ij``); choose exactly one option per channel, minimise ``sum d`` subject to
``sum c <= budget``.

Method (memory O(total options), no table over budget values):

1. **Per channel**: sort options by (cost, distortion), keep the Pareto set (strictly
   increasing cost, strictly decreasing distortion; equal costs keep the lowest distortion),
   then its lower convex hull. Only Pareto options can be in an optimum (a dominated option can
   always be swapped for its dominator), and only hull vertices matter for the LP relaxation.
2. **LP relaxation / Lagrangian**: start every channel at its cheapest option and take hull
   segments in order of decreasing efficiency ``-Δd/Δc`` while they fit. This is the exact LP
   optimum; the efficiency of the first segment that does not fit is the optimal multiplier
   ``λ``. ``LB = Σ_i min_j (d_ij + λ c_ij) − λ·budget`` is a lower bound on the MCKP optimum
   for any ``λ >= 0`` (weak duality), so it is valid whatever the rounding of ``λ``.
3. **Incumbent**: the hull solution, completed greedily with the later segments that still fit.
4. **Exact completion (core problem)**: with reduced costs ``r_ij = d_ij + λc_ij − m_i >= 0``
   every feasible solution satisfies ``D >= LB + Σ r``; options with ``LB + r_ij >= UB`` cannot
   improve the incumbent ``UB`` and are eliminated, which fixes almost every channel. The few
   remaining ("core") channels are solved by a dynamic program over Pareto states (cost,
   distortion) with dominance pruning and bound pruning (reduced costs plus linear bounds on
   what the remaining channels must pay to fill or free budget). The certified lower bound is
   the smallest bound of anything pruned; the reported gap is ``(UB − lower_bound)/|UB|``.

Numbers are float64; "optimal" means optimal up to ``rel_tol`` (default 1e-12 relative) and
floating-point rounding of the sums.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

__all__ = ["MCKPResult", "InfeasibleBudgetError", "solve_mckp", "as_flat_instance",
           "FlatInstance"]


_MAX_EXPAND = 2_000_000   # states × options expanded at once in the core DP (memory bound)


class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest achievable total cost."""


@dataclass
class MCKPResult:
    """Solution of a multiple-choice knapsack instance.

    ``choice[i]`` is the index of the chosen option of channel i (into that channel's arrays).
    ``gap = (total_distortion − lower_bound) / |total_distortion|`` (0 when both are 0) is
    certified: no solution within the budget has distortion below ``lower_bound``.
    """

    choice: np.ndarray            # int64 [N]
    total_cost: int
    total_distortion: float
    lower_bound: float
    gap: float
    optimal: bool                 # gap <= rel_tol (search completed)
    budget: int
    min_cost: int                 # smallest achievable total cost
    max_useful_cost: int          # cost of choosing every channel's lowest-distortion option
    lagrange_multiplier: float    # λ of the LP relaxation (0 when the budget is not binding)
    lp_bound: float               # Lagrangian / LP lower bound before the exact completion
    core_channels: int = 0        # channels left free after reduced-cost fixing
    dp_states: int = 0            # Pareto states created by the core dynamic program
    stats: dict = field(default_factory=dict)


@dataclass
class FlatInstance:
    """An MCKP instance in compressed-row form: options of channel i are
    ``costs[offsets[i]:offsets[i+1]]`` / ``distortions[...]``."""

    costs: np.ndarray        # int64 [total options]
    distortions: np.ndarray  # float64 [total options]
    offsets: np.ndarray      # int64 [N + 1]

    @property
    def num_channels(self) -> int:
        return int(self.offsets.size - 1)


def _as_int_costs(a: np.ndarray, where: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "b" or a.dtype.kind not in "iuf":
        raise ValueError(f"{where}: costs must be numbers, got dtype {a.dtype}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{where}: costs must be whole numbers (DReLU counts)")
    out = a.astype(np.int64)
    if out.size and out.min() < 0:
        raise ValueError(f"{where}: costs must be >= 0, got {int(out.min())}")
    return out


def as_flat_instance(costs, distortions) -> FlatInstance:
    """Validate per-channel option arrays and pack them into a :class:`FlatInstance`.

    ``costs``/``distortions``: 2-D arrays [N, K] (every channel has K options) or sequences of
    1-D arrays (one per channel, lengths may differ between channels but must agree between
    the two arguments). A :class:`FlatInstance` passed as ``costs`` is returned as it is
    (``distortions`` is then ignored).
    """
    if isinstance(costs, FlatInstance):
        return costs
    if isinstance(costs, np.ndarray) and isinstance(distortions, np.ndarray) \
            and costs.ndim == 2 and distortions.ndim == 2:
        if costs.shape != distortions.shape:
            raise ValueError(f"costs {list(costs.shape)} and distortions "
                             f"{list(distortions.shape)} must have the same shape")
        n, k = costs.shape
        if n and k == 0:
            raise ValueError("every channel needs at least one option (got K = 0)")
        flat_c = _as_int_costs(costs.reshape(-1), "costs")
        flat_d = np.asarray(distortions, dtype=np.float64).reshape(-1)
        offsets = np.arange(n + 1, dtype=np.int64) * k
    else:
        if len(costs) != len(distortions):
            raise ValueError(f"costs has {len(costs)} channels but distortions has "
                             f"{len(distortions)}")
        cs = [np.asarray(c).reshape(-1) if np.ndim(c) else np.asarray([c]) for c in costs]
        ds = [np.asarray(d, dtype=np.float64).reshape(-1) if np.ndim(d) else
              np.asarray([d], dtype=np.float64) for d in distortions]
        lengths = np.array([c.size for c in cs], dtype=np.int64)
        for i, (c, d) in enumerate(zip(cs, ds)):
            if c.size != d.size:
                raise ValueError(f"channel {i}: {c.size} costs but {d.size} distortions")
            if c.size == 0:
                raise ValueError(f"channel {i} has no options; every channel needs at least one")
        offsets = np.zeros(len(cs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat_c = _as_int_costs(np.concatenate(cs) if cs else np.zeros(0, np.int64), "costs")
        flat_d = np.concatenate(ds) if ds else np.zeros(0, np.float64)
    if not np.all(np.isfinite(flat_d)):
        bad = np.flatnonzero(~np.isfinite(flat_d))
        chan = int(np.searchsorted(offsets, bad[0], side="right") - 1)
        raise ValueError(f"{bad.size} distortion values are NaN or infinite (first in channel "
                         f"{chan}); fix or drop them before solving")
    return FlatInstance(np.ascontiguousarray(flat_c), np.ascontiguousarray(flat_d), offsets)


# --------------------------------------------------------------------------- per-channel hulls

@numba.njit(cache=True)
def _pareto_hull(costs, dists, offsets):  # pragma: no cover - compiled
    """Per channel: Pareto options (global indices, cost ascending) and lower hull vertices.

    Also returns the hull segment efficiencies ``-Δd/Δc`` forced non-increasing within a
    channel (guards against rounding on near-collinear points), one per hull vertex except
    the channel's first (stored at the segment's end vertex).
    """
    n = offsets.size - 1
    total = offsets[n]
    par = np.empty(total, np.int64)
    par_off = np.zeros(n + 1, np.int64)
    hull = np.empty(total, np.int64)
    hull_off = np.zeros(n + 1, np.int64)
    eff = np.empty(total, np.float64)
    kmax = 0
    for i in range(n):
        kmax = max(kmax, offsets[i + 1] - offsets[i])
    order = np.empty(kmax, np.int64)
    p = 0
    h = 0
    for i in range(n):
        a = offsets[i]
        k = offsets[i + 1] - a
        for t in range(k):  # insertion sort by (cost, distortion, index); k is small
            j = a + t
            s = t
            while s > 0:
                q = order[s - 1]
                if costs[q] > costs[j] or (costs[q] == costs[j] and dists[q] > dists[j]):
                    order[s] = q
                    s -= 1
                else:
                    break
            order[s] = j
        start = p
        best = np.inf
        last_cost = -1
        for t in range(k):
            j = order[t]
            if costs[j] == last_cost:
                continue  # same cost as the previous, higher or equal distortion
            last_cost = costs[j]
            if dists[j] < best:
                best = dists[j]
                par[p] = j
                p += 1
        par_off[i + 1] = p
        hs = h
        for t in range(start, p):
            j = par[t]
            while h - hs >= 2:
                o = hull[h - 2]
                m = hull[h - 1]
                cross = ((costs[m] - costs[o]) * (dists[j] - dists[o])
                         - (dists[m] - dists[o]) * (costs[j] - costs[o]))
                if cross <= 0.0:
                    h -= 1
                else:
                    break
            hull[h] = j
            h += 1
        hull_off[i + 1] = h
        prev = np.inf
        for t in range(hs + 1, h):
            e = (dists[hull[t - 1]] - dists[hull[t]]) / (costs[hull[t]] - costs[hull[t - 1]])
            if e > prev:
                e = prev
            eff[t] = e
            prev = e
    return par[:p], par_off, hull[:h], hull_off, eff[:h]


@numba.njit(cache=True)
def _greedy_fill(seg_chan, seg_dc, start, remaining, nchan):  # pragma: no cover - compiled
    """Take sorted segments from ``start`` on while they fit; a skipped segment blocks the
    later segments of its channel (they extend it). Returns the taken mask and what is left."""
    blocked = np.zeros(nchan, np.bool_)
    taken = np.zeros(seg_chan.size, np.bool_)
    for s in range(start, seg_chan.size):
        c = seg_chan[s]
        if blocked[c]:
            continue
        if seg_dc[s] <= remaining:
            taken[s] = True
            remaining -= seg_dc[s]
        else:
            blocked[c] = True
    return taken, remaining


# --------------------------------------------------------------------------- solver

def solve_mckp(costs, distortions, budget: int, *, rel_tol: float = 1e-12,
               max_states: int = 20_000_000) -> MCKPResult:
    """Minimise the summed distortion choosing one option per channel with total cost <= budget.

    ``costs``/``distortions``: [N, K] arrays or sequences of per-channel 1-D arrays (see
    :func:`as_flat_instance`); costs are non-negative integers, distortions finite floats.
    Returns an :class:`MCKPResult` whose ``gap`` is certified; it is <= ``rel_tol`` unless the
    core dynamic program would store more than ``max_states`` states in all (about 8 bytes
    each), in which case the best solution found is returned with its honest gap and
    ``optimal=False``.

    Raises :class:`InfeasibleBudgetError` when ``budget`` is below the smallest achievable
    total cost (every channel at its cheapest option).
    """
    inst = as_flat_instance(costs, distortions)
    if isinstance(budget, (bool, np.bool_)) or not float(budget).is_integer():
        raise ValueError(f"budget must be a whole number of DReLUs, got {budget!r}")
    budget = int(budget)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if not rel_tol >= 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
    c_all, d_all, off = inst.costs, inst.distortions, inst.offsets
    n = inst.num_channels
    if n == 0:
        return MCKPResult(np.zeros(0, np.int64), 0, 0.0, 0.0, 0.0, True, budget, 0, 0, 0.0, 0.0)

    par, par_off, hull, hull_off, eff_v = _pareto_hull(c_all, d_all, off)
    first = hull[hull_off[:-1]]             # cheapest option of each channel (a hull vertex)
    last = hull[hull_off[1:] - 1]           # lowest-distortion option
    min_cost = int(c_all[first].sum())
    max_useful = int(c_all[last].sum())
    if budget < min_cost:
        raise InfeasibleBudgetError(
            f"budget {budget} is below the smallest achievable total cost {min_cost} (every "
            f"channel at its cheapest option); raise the budget to at least {min_cost}")

    def finish(choice_flat: np.ndarray, lower: float, lam: float, lp: float, optimal: bool,
               core: int = 0, states: int = 0, **stats) -> MCKPResult:
        chan = np.arange(n)
        choice = choice_flat - off[chan]
        tc = int(c_all[choice_flat].sum())
        td = float(math.fsum(d_all[choice_flat]))
        lower = min(float(lower), td)
        diff = td - lower
        gap = 0.0 if diff <= 0 else (diff / abs(td) if td != 0 else math.inf)
        return MCKPResult(choice.astype(np.int64), tc, td, lower, gap,
                          bool(optimal and gap <= rel_tol), budget, min_cost, max_useful,
                          float(lam), float(lp), core, states, dict(stats))

    if budget >= max_useful:  # the budget does not bind: every channel takes its best option
        return finish(last, float(d_all[last].sum()), 0.0, float(d_all[last].sum()), True)

    # Hull segments (end vertex t of each channel's hull except its first vertex).
    hchan = np.repeat(np.arange(n, dtype=np.int64), np.diff(hull_off))
    is_seg = np.ones(hull.size, dtype=bool)
    is_seg[hull_off[:-1]] = False
    seg_end = np.flatnonzero(is_seg)
    seg_chan = hchan[seg_end]
    seg_dc = c_all[hull[seg_end]] - c_all[hull[seg_end - 1]]
    seg_eff = eff_v[seg_end]
    order = np.lexsort((seg_end, -seg_eff))  # efficiency descending; within a channel in order
    seg_chan, seg_dc, seg_eff = seg_chan[order], seg_dc[order], seg_eff[order]
    del order, seg_end
    residual = budget - min_cost
    cum = np.cumsum(seg_dc)
    t = int(np.searchsorted(cum, residual, side="right"))  # segments [0, t) fit entirely
    # t < number of segments because budget < max_useful
    lam = float(seg_eff[t])
    left = residual - (int(cum[t - 1]) if t else 0)
    taken, _ = _greedy_fill(seg_chan, seg_dc, t, left, n)
    taken[:t] = True
    steps = np.bincount(seg_chan[taken], minlength=n)
    incumbent = hull[hull_off[:-1] + steps]
    del cum, taken, seg_chan, seg_dc, seg_eff, hchan, is_seg
    ub = float(d_all[incumbent].sum())

    # Lagrangian bound and reduced costs over the Pareto options.
    pc = c_all[par]
    pd = d_all[par]
    v = pd + lam * pc
    m = np.minimum.reduceat(v, par_off[:-1])
    pchan = np.repeat(np.arange(n, dtype=np.int64), np.diff(par_off))
    red = v - m[pchan]
    del v
    lb = float(m.sum() - lam * budget)
    lp = lb
    tol = rel_tol * abs(ub)
    if ub - lb <= tol:
        return finish(incumbent, lb, lam, lp, True)

    # Reduced-cost fixing: options whose bound cannot beat the incumbent are dropped.
    bound = lb + red
    keep = bound < ub - tol
    pruned_min = float(bound[~keep].min()) if not keep.all() else math.inf
    del bound
    kcount = np.add.reduceat(keep.astype(np.int64), par_off[:-1])
    kept_idx = np.flatnonzero(keep)                      # positions into par (channel-grouped)
    kept_off = np.zeros(n + 1, np.int64)
    np.cumsum(kcount, out=kept_off[1:])
    single = kcount == 1
    fixed_choice = par[kept_idx[kept_off[:-1][single]]]
    c_fix = int(c_all[fixed_choice].sum())
    d_fix = float(d_all[fixed_choice].sum())
    free = np.flatnonzero(~single)
    bf = budget - c_fix
    core = _CoreDP(free, kept_idx, kept_off, par, pc, pd, red, lam, lb, bf, d_fix,
                   ub, tol, pruned_min, max_states)
    core.run()
    if core.best is None:
        choice = incumbent
    else:
        choice = np.empty(n, np.int64)
        choice[single] = fixed_choice
        choice[free] = core.best_choice()
    if core.complete:
        lower = min(core.ub, core.pruned_min)
    else:
        lower = min(core.ub, core.pruned_min, core.alive_min)
    return finish(choice, max(lower, lb), lam, lp, core.complete, core=int(free.size),
                  states=core.total_states, greedy_distortion=ub,
                  stages=core.stages_done)


class _CoreDP:
    """Dynamic program over Pareto states (cost, distortion) of the core channels.

    Works in "positions into the Pareto arrays" (``pc``, ``pd``, ``red``); the options of free
    channel ``free[q]`` are ``kept_idx[kept_off[f]:kept_off[f+1]]`` with ``f = free[q]``.
    """

    def __init__(self, free, kept_idx, kept_off, par, pc, pd, red, lam, lb, bf, d_fix,
                 ub, tol, pruned_min, max_states):
        self.par, self.pc, self.pd, self.red = par, pc, pd, red
        self.lam, self.lb, self.bf, self.d_fix = lam, lb, bf, d_fix
        self.ub, self.tol, self.pruned_min = ub, tol, pruned_min
        self.max_states = max_states
        self.best = None
        self.complete = False
        self.alive_min = math.inf
        self.total_states = 0
        self.stages_done = 0
        nf = free.size
        opts = [kept_idx[kept_off[f]:kept_off[f + 1]] for f in free]  # cost ascending
        lp_opt = np.empty(nf, np.int64)      # option of zero reduced cost (cheapest such)
        min_opt = np.empty(nf, np.int64)
        mu = np.full(nf, np.inf)             # least reduced cost per DReLU freed below the LP option
        nu = np.full(nf, np.inf)             # least reduced cost per DReLU spent above it
        spread = np.empty(nf, np.int64)
        for q, o in enumerate(opts):
            r = red[o]
            c = pc[o]
            j = int(np.argmin(r))
            lp_opt[q], min_opt[q] = o[j], o[0]
            spread[q] = c[-1] - c[0]
            if j > 0:
                mu[q] = np.min((r[:j] - r[j]) / (c[j] - c[:j]))
            if j < len(o) - 1:
                nu[q] = np.min((r[j + 1:] - r[j]) / (c[j + 1:] - c[j]))
        perm = np.argsort(-spread, kind="stable")  # wide channels first: bounds tighten faster
        self.free = free[perm]
        self.opts = [opts[q] for q in perm]
        lp_opt, min_opt, mu, nu = lp_opt[perm], min_opt[perm], mu[perm], nu[perm]
        self.lp_opt, self.min_opt = lp_opt, min_opt
        max_c = np.array([pc[o[-1]] for o in self.opts], dtype=np.int64)

        def suffix_sum(x):
            out = np.zeros(nf + 1, dtype=x.dtype)
            out[:-1] = np.cumsum(x[::-1])[::-1]
            return out

        def suffix_min(x):
            out = np.full(nf + 1, np.inf)
            out[:-1] = np.minimum.accumulate(x[::-1])[::-1]
            return out

        self.suf_min = suffix_sum(pc[min_opt])
        self.suf_max = suffix_sum(max_c)
        self.suf_clp = suffix_sum(pc[lp_opt])
        self.suf_dlp = suffix_sum(pd[lp_opt])
        self.suf_dmin = suffix_sum(pd[min_opt])
        self.suf_mu = suffix_min(mu)
        self.suf_nu = suffix_min(nu)
        self.parents: list[np.ndarray] = []
        self.picks: list[np.ndarray] = []

    def _bounds(self, j, cost, redsum):
        """Lower bounds on the final distortion of completions of states after stage j."""
        lam = self.lam
        s0 = (self.bf - self.suf_clp[j + 1]) - cost          # slack if the rest take LP options
        fill = min(self.suf_nu[j + 1], lam)
        mu = self.suf_mu[j + 1]
        pos = s0 >= 0
        ex = np.empty(s0.shape, np.float64)
        ex[pos] = fill * s0[pos]
        ex[~pos] = mu * (-s0[~pos])   # mu = inf: the rest cannot free budget at all
        ex2 = lam * np.maximum(0, (self.bf - self.suf_max[j + 1]) - cost)
        return self.lb + redsum + np.maximum(ex, ex2)

    def _expand(self, j, cost, dist, redsum, o, lo, hi):
        """States [lo, hi) × options ``o`` of stage j, minus infeasible and bound-pruned ones."""
        k = o.size
        cs, ds, rs = cost[lo:hi], dist[lo:hi], redsum[lo:hi]
        nc = (cs[:, None] + self.pc[o][None, :]).reshape(-1)
        nd = (ds[:, None] + self.pd[o][None, :]).reshape(-1)
        nr = (rs[:, None] + self.red[o][None, :]).reshape(-1)
        parent = np.repeat(np.arange(lo, hi, dtype=np.int32), k)
        pick = np.tile(o.astype(np.int32), hi - lo)
        feas = nc + self.suf_min[j + 1] <= self.bf
        bnd = self._bounds(j, nc, nr)
        keep = feas & (bnd < self.ub - self.tol)
        drop = feas & ~keep
        if drop.any():
            self.pruned_min = min(self.pruned_min, float(bnd[drop].min()))
        return [x[keep] for x in (nc, nd, nr, parent, pick, bnd)]

    def run(self) -> None:
        cost = np.zeros(1, np.int64)
        dist = np.zeros(1, np.float64)
        redsum = np.zeros(1, np.float64)
        bnd = np.full(1, self.lb)
        nf = self.free.size
        self._try_incumbent(-1, cost, dist)   # all core channels at LP / cheapest options
        for j in range(nf):
            o = self.opts[j]
            ro = self.red[o]
            ok = self.lb + ro < self.ub - self.tol   # options that can still beat the incumbent
            if not ok.all():
                self.pruned_min = min(self.pruned_min, float((self.lb + ro[~ok]).min()))
                o = o[ok]
            if o.size == 0 or cost.size == 0:
                self.complete = True
                return
            if self.total_states + cost.size * o.size > self.max_states:
                self.alive_min = float(bnd.min())   # every better solution extends a live state
                return
            step = max(1, _MAX_EXPAND // o.size)        # bounded temporary memory
            parts = [self._expand(j, cost, dist, redsum, o, lo, min(lo + step, cost.size))
                     for lo in range(0, cost.size, step)]
            nc, nd, nr, parent, pick, bnd = (np.concatenate(x) for x in zip(*parts))
            del parts
            if nc.size:
                srt = np.lexsort((nd, nc))
                nc, nd, nr, parent, pick, bnd = (x[srt] for x in (nc, nd, nr, parent, pick, bnd))
                prev = np.empty_like(nd)
                prev[0] = np.inf
                np.minimum.accumulate(nd[:-1], out=prev[1:])
                dom = nd < prev      # Pareto in (cost, distortion): drop dominated states
                nc, nd, nr, parent, pick, bnd = (x[dom] for x in (nc, nd, nr, parent, pick, bnd))
            self.total_states += int(nc.size)
            self.parents.append(parent)
            self.picks.append(pick)
            self.stages_done = j + 1
            if nc.size:
                self._try_incumbent(j, nc, nd)
                alive = bnd < self.ub - self.tol
                if not alive.all():
                    self.pruned_min = min(self.pruned_min, float(bnd[~alive].min()))
                    idx = np.flatnonzero(alive)
                    nc, nd, nr, bnd = nc[idx], nd[idx], nr[idx], bnd[idx]
                    self._remap(j, idx)
            cost, dist, redsum = nc, nd, nr
        self.complete = True

    def _remap(self, j, idx):
        """Keep only states ``idx`` of stage j (the incumbent is already materialised)."""
        self.parents[j] = self.parents[j][idx]
        self.picks[j] = self.picks[j][idx]

    def _try_incumbent(self, j, nc, nd):
        """Complete states with the LP options (if they fit) or the cheapest kept options."""
        d_lp = np.where(nc + self.suf_clp[j + 1] <= self.bf, nd + self.suf_dlp[j + 1], np.inf)
        d_min = np.where(nc + self.suf_min[j + 1] <= self.bf, nd + self.suf_dmin[j + 1], np.inf)
        ia, ib = int(np.argmin(d_lp)), int(np.argmin(d_min))
        cand_a, cand_b = self.d_fix + d_lp[ia], self.d_fix + d_min[ib]
        if min(cand_a, cand_b) < self.ub:   # inf never passes
            use_a = cand_a <= cand_b
            s = ia if use_a else ib
            self.ub = float(min(cand_a, cand_b))
            self.best = (j, s, use_a, self._materialise(j, s, use_a))

    def _materialise(self, j, s, use_lp) -> np.ndarray:
        """Global option indices for the free channels of the solution (stage j, state s)."""
        out = np.empty(self.free.size, np.int64)
        tail = self.lp_opt[j + 1:] if use_lp else self.min_opt[j + 1:]
        out[j + 1:] = self.par[tail]
        for q in range(j, -1, -1):
            out[q] = self.par[self.picks[q][s]]
            s = int(self.parents[q][s])
        return out

    def best_choice(self) -> np.ndarray:
        """Chosen global option index for each free channel, in the order of ``free`` as given
        to the solver (the caller indexes with the original ``free`` array)."""
        sol = self.best[3]
        out = np.empty_like(sol)
        order = np.argsort(self.free)
        # self.free is a permutation of the caller's (sorted) free array
        out[:] = sol[order]
        return out
