"""The reverse sigmoid of Lee et al. (2019) as an attacker writes it down, inverts it row by row,
and estimates its parameters from the answers: the defence is a known, deterministic function of the
confidences, so an adaptive attacker (Kerckhoffs) undoes it before attacking.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit


def _perturbed(z: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """``f(p) = p - beta (sigmoid(gamma logit p) - 1/2)`` of the confidence whose logit is ``z``."""
    return expit(z) - beta * (expit(gamma * z) - 0.5)


def reverse_sigmoid(probabilities: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """The perturbation of Lee et al. 2019 (sec. III) as the attacker writes it down: ``f`` of each
    confidence, clipped at 0, renormalised (without the top-label swap an API may add in the rare rows
    where the perturbation moves the top)."""
    with np.errstate(divide="ignore"):
        z = logit(np.asarray(probabilities, dtype=np.float64))
    q = np.maximum(_perturbed(z, beta, gamma), 0.0)
    return q / q.sum(axis=-1, keepdims=True)


def _monotone_pieces(beta: float, gamma: float, bound: float = 100.0,
                     points: int = 400_001) -> list[tuple[np.ndarray, np.ndarray]]:
    """``f`` over logits in ``[-bound, bound]`` cut where it turns: ``(f, z)`` per piece, ``f`` ascending."""
    z = np.linspace(-bound, bound, points)
    f = _perturbed(z, beta, gamma)
    step = np.diff(f)
    slope = np.sign(step) * (np.abs(step) > 8 * np.finfo(float).eps * np.abs(f[1:]))
    moving = np.flatnonzero(slope)  # flat stretches (f saturated in float64, or rounding noise) do not turn
    turns = moving[1:][slope[moving[1:]] != slope[moving[:-1]]]
    pieces = []
    for part_z, part_f in zip(np.split(z, turns), np.split(f, turns)):
        order = np.argsort(part_f, kind="stable")
        pieces.append((part_f[order], part_z[order]))
    return pieces


def _assignments(q: np.ndarray, pieces: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Which monotone piece of ``f`` each entry of each row lies on, ``(n, k)`` per hypothesis, the most
    confident first: the top on a piece reaching ``p >= 1/k`` (the highest first); the other entries
    on the first piece (or the second where the first cannot reach their value), except one of them,
    or the two or three with the smallest answers (``f`` is lowest in the middle), on another piece
    below 1/2."""
    n, k = q.shape
    top = q.argmax(axis=1)
    top_pieces = [i for i, (_, z) in enumerate(pieces) if z.max() >= logit(1.0 / k)][::-1]
    other_pieces = [i for i, (_, z) in enumerate(pieces) if i > 0 and z.min() <= 0]
    ranked = np.argsort(np.where(np.arange(k) == top[:, None], np.inf, q), axis=1)
    movers = [np.zeros((n, k), dtype=bool)] + [np.arange(k)[None].repeat(n, 0) == j for j in range(k)]
    for count in (2, 3):
        mover = np.zeros((n, k), dtype=bool)
        np.put_along_axis(mover, ranked[:, :count], True, axis=1)
        movers.append(mover)
    assignments = []
    for top_piece in top_pieces:
        for other_piece in other_pieces:
            for mover in movers:
                piece = np.where(mover, other_piece, 0)
                piece[np.arange(n), top] = top_piece
                assignments.append(piece)
    return assignments


def invert_reverse_sigmoid(answers: np.ndarray, beta: float, gamma: float,
                           grid: int = 128, steps: int = 50) -> np.ndarray:
    """The most confident ``p`` with ``reverse_sigmoid(p) == answers``, row by row (NaN rows where
    there is none).

    ``f`` is monotone in pieces (for ``gamma < 1``: falling from ``beta/2`` near 0, rising through the
    middle, falling again towards 1), so an answer ``q_i = f(p_i) / S`` (``S`` the unknown normaliser)
    has one preimage per piece. For each assignment of entries to pieces (``_assignments``, most
    confident first), ``sum_{i != top} p_i = 1 - p_top`` (both sides from logits, exact near certainty)
    is solved for ``S``: the sign change on a grid of ``S`` with the smallest jump, then bisection.
    Some answers have several preimages (a confident row, and a less confident one with a runner-up
    class); the first found, the most confident, is the one a trained model gives far more often."""
    q = np.asarray(answers, dtype=np.float64)
    n, k = q.shape
    pieces = _monotone_pieces(beta, gamma)
    floors, ceilings = np.array([f[0] for f, _ in pieces]), np.array([f[-1] for f, _ in pieces])
    spill = 1 if len(pieces) > 1 else 0  # the piece an entry of the first overflows into
    recovered = np.full((n, k), np.nan)
    for assignment in _assignments(q, pieces):
        todo = np.flatnonzero(np.isnan(recovered[:, 0]))
        if len(todo) == 0:
            break
        p, solved = _solve_normaliser(q[todo], assignment[todo], pieces, floors, ceilings, spill, grid, steps)
        recovered[todo[solved]] = p[solved]
    return recovered


def _solve_normaliser(q: np.ndarray, piece: np.ndarray, pieces: list[tuple[np.ndarray, np.ndarray]],
                      floors: np.ndarray, ceilings: np.ndarray, spill: int, grid: int,
                      steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``invert_reverse_sigmoid`` under one assignment of entries to pieces: the rows' ``p`` and
    which rows it solves."""
    n, k = q.shape
    rows = np.arange(n)
    top = q.argmax(axis=1)
    is_top = np.arange(k) == top[:, None]
    low = np.max(floors[piece] / np.maximum(q, 1e-300), axis=1)
    high = np.min(ceilings[np.where(piece == 0, spill, piece)] / np.maximum(q, 1e-300), axis=1)

    def logits(scale: np.ndarray) -> np.ndarray:
        values = scale[..., None] * (q[:, None] if scale.ndim == 2 else q)
        where = np.broadcast_to(piece[:, None] if scale.ndim == 2 else piece, values.shape)
        where = np.where((where == 0) & (values > ceilings[0]), spill, where)
        z = np.empty(values.shape)
        for index, (f, zs) in enumerate(pieces):
            on = where == index
            z[on] = np.interp(values[on], f, zs)
        return z

    def excess(z: np.ndarray) -> np.ndarray:
        """``sum_{i != top} p_i - (1 - p_top)``: zero for a distribution."""
        mask = np.broadcast_to(is_top[:, None] if z.ndim == 3 else is_top, z.shape)
        return np.where(mask, -expit(-z), expit(z)).sum(axis=-1)

    # S where the first piece's largest answer reaches that piece's end (p -> 0): the sum of the tiny
    # confidences varies there over many orders of magnitude, so the grid is geometric towards it
    critical = np.clip(ceilings[0] / np.where(piece == 0, q, 0).max(axis=1).clip(1e-300), low, high)
    towards = 1 - np.logspace(-15, 0, grid // 2)[::-1]
    scales = np.concatenate([low[:, None] + (critical - low)[:, None] * towards[None],
                             critical[:, None] + np.clip(high - critical, 0, None)[:, None]
                             * np.linspace(0, 1, grid // 2)[None]], axis=1)
    values = excess(logits(scales))
    crossing = np.sign(values[:, :-1]) != np.sign(values[:, 1:])
    jump = np.abs(values[:, :-1]) + np.abs(values[:, 1:])  # small at a root, large at a discontinuity
    first = np.where(crossing, jump, np.inf).argmin(axis=1)
    a, b = scales[rows, first], scales[rows, first + 1]
    sign_a = np.sign(values[rows, first])
    for _ in range(steps):
        middle = (a + b) / 2
        same = np.sign(excess(logits(middle))) == sign_a
        a, b = np.where(same, middle, a), np.where(same, b, middle)
    z = logits((a + b) / 2)
    residual = np.abs(excess(z)) < 1e-9 * expit(-z[rows, top]) + 1e-15
    p = np.where(is_top, 0.0, expit(z))
    p[rows, top] = 1.0 - p.sum(axis=1)
    return p, (high > low) & crossing.any(axis=1) & residual


def estimate_reverse_sigmoid(answers: np.ndarray, references: np.ndarray | None = None,
                             confident: tuple[np.ndarray, ...] = (), tolerance: float | None = None,
                             steps: int = 10) -> tuple[float, float]:
    """``(beta, gamma)`` of the reverse sigmoid from its ``(n, k)`` ``answers`` and either the
    reference models' ``(models, n, k)`` probabilities on the same inputs, or ``confident``: answers
    to inputs the attacker made the model near certain of (e.g. its records scaled up).

    A row's answer fits confidences under almost any ``(beta, gamma)`` (k - 1 unknowns and the
    normaliser for k - 1 numbers), so matching the references' outputs alone leaves gamma 5-10% off
    (the target's tiny confidences are not the references'), and LiRA does not survive that error.
    What pins gamma down is where rows stop having any preimage: with beta at or a little above the
    true one, every row inverts up to the true gamma and some fail beyond it (rows that invert at no
    gamma, such as those whose top the API swapped back, aside). So: beta (and a first gamma) from
    the references (``_matching_start``, within 1%, raised by 1%), or from the envelope of the
    confident answers (``_envelope_beta``, exact up to rounding: raised by 0.1%), or, with neither,
    from the envelope of the answers themselves (raised by 0.5%); then the largest gamma at which
    all but ``tolerance`` of the rows still invert, by bisection in ``steps`` halvings (the start's
    gamma kept if no gamma in reach fails). ``tolerance``: 0.5% with references (as measured below),
    else 2%: at the true beta a few rows (up to 1.3% on the digits targets) stop inverting below the
    true gamma, and a quarter of them within 5% above it. Measured on the digits targets at (0.7, 0.4), 300 rows:
    with references (MLP), beta within 1% and gamma within 0.3-3.5% for five settings from
    (0.33, 0.23) to (1.05, 0.83), in 6-15 s; from records scaled by 4 and 16, beta 0.7000 on the
    softmax and MLP targets (seeds 0-2) and gamma within 0.5% from 300 auxiliary records (6.5% high
    from 200 training members of the MLP, whose rows are almost all confident); from the answers
    alone, beta 0.4% off on the MLP but 3-5% on the softmax target, whose rows are rarely confident
    enough for ``beta p^gamma`` to vanish."""
    answers = np.asarray(answers, dtype=np.float64)
    if tolerance is None:
        tolerance = 0.005 if references is not None else 0.02
    if references is not None:
        beta, gamma = _matching_start(answers, references)
        beta *= 1.01
    elif confident:
        beta, gamma = max(_envelope_beta(np.asarray(batch, dtype=np.float64), 0.5) for batch in confident) * 1.001, 0.25
    else:
        beta, gamma = _envelope_beta(answers, 0.99) * 1.005, 0.25
    lowest = 0.5 * gamma
    never = np.isnan(invert_reverse_sigmoid(answers, beta, lowest)[:, 0])  # e.g. rows whose top was swapped back

    def fails(gamma: float) -> bool:
        return bool(np.mean(np.isnan(invert_reverse_sigmoid(answers, beta, gamma)[:, 0]) & ~never) > tolerance)

    bracket = _bisect(fails, lowest, 2.0 * gamma, steps)
    return beta, gamma if bracket is None else bracket[0]


def _envelope_beta(answers: np.ndarray, quantile: float) -> float:
    """beta from answers alone: on the first piece ``f`` rises towards ``beta/2`` as ``p -> 0`` and on
    the top piece ``f > 1 - beta/2``, so a row's smallest answer over its top stays below
    ``r* = (beta/2) / (1 - beta/2)`` and confident rows come within a fraction of a percent of it;
    ``beta = 2r / (1 + r)`` at the ``quantile`` of the rows' ratios (the median when nearly every row
    is confident; a high quantile otherwise, below the few rows above ``r*``, e.g. those whose top
    the API swapped back)."""
    top = answers.max(axis=1, keepdims=True)
    ratio = np.quantile(np.where(answers == top, np.inf, answers / top).min(axis=1), quantile)
    return float(2 * ratio / (1 + ratio))


def _matching_start(answers: np.ndarray, references: np.ndarray, size: int = 20) -> tuple[float, float]:
    """The ``(beta, gamma)`` on a ``size`` x ``size`` grid over (0, 2] whose perturbation of the
    references' outputs, averaged in log space, is closest to the answers (sorted row by row)."""
    observed = np.sort(np.log(np.maximum(answers, 1e-300)), axis=-1)

    def distance(beta: float, gamma: float) -> float:
        perturbed = np.sort(np.log(np.maximum(reverse_sigmoid(references, beta, gamma), 1e-300)), axis=-1)
        return float(np.mean((perturbed.mean(axis=0) - observed) ** 2))

    axis = np.linspace(2.0 / size, 2.0, size)
    start = min(((b, g) for b in axis for g in axis), key=lambda point: distance(*point))
    refined = minimize(lambda point: distance(*point) if min(point) > 0 else np.inf, np.array(start),
                       method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-10})
    return float(refined.x[0]), float(refined.x[1])


def _bisect(holds, low: float, high: float, steps: int) -> tuple[float, float] | None:
    """The bracket ``[a, b]`` where a predicate false at ``a`` turns true at ``b``, ``steps`` halvings
    from ``[low, high]`` (widened geometrically, up to 8 times, until the predicate fails at ``low``
    and holds at ``high``; None if it never does)."""
    for _ in range(8):
        if holds(low):
            low, high = low / 2, low
        elif not holds(high):
            low, high = high, high * 2
        else:
            break
    else:
        return None
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (low, middle) if holds(middle) else (middle, high)
    return low, high
