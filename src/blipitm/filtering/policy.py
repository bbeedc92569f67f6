"""What a run keeps: a :class:`Threshold` on one score, or the best :class:`KeepFraction` of
all scored pairs; either becomes a :class:`Cut` that decides each row."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from blipitm.errors import InvalidInputError
from blipitm.filtering.scoring import By


@dataclass(frozen=True)
class Cut:
    """Keep a row iff its score > threshold, or == threshold and its global row number is at
    most ``last_tied`` (ties broken by input order, as a stable sort would)."""

    threshold: float
    last_tied: float = math.inf

    def keep(self, scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
        ok = ~np.isnan(scores)
        return ok & (
            (scores > self.threshold) | ((scores == self.threshold) & (rows <= self.last_tied))
        )


@dataclass(frozen=True, init=False)
class Threshold:
    """Keep the pairs whose ``by`` score is at least ``value`` (CapFilt: ITM >= 0.5). ``by``:
    a :class:`By` or its name."""

    value: float
    by: By

    def __init__(self, value: float, by: By | str = By.ITM) -> None:
        object.__setattr__(self, "value", float(value))
        object.__setattr__(self, "by", By.parse(by))

    def cut(self, scores: Callable[[], np.ndarray]) -> Cut:
        return Cut(self.value)


@dataclass(frozen=True, init=False)
class KeepFraction:
    """Keep exactly ceil(fraction * N) of the N scored pairs, the best by their ``by`` score,
    ties broken by input order: the exact global quantile DataComp's ``apply_filter.py`` takes.
    ``fraction`` is in [0, 1]; ``by``: a :class:`By` or its name."""

    fraction: float
    by: By

    def __init__(self, fraction: float, by: By | str = By.ITM) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise InvalidInputError(
                f"keep_fraction must be in [0, 1], got {fraction}", loc=("keep_fraction",)
            )
        object.__setattr__(self, "fraction", fraction)
        object.__setattr__(self, "by", By.parse(by))

    def cut(self, scores: Callable[[], np.ndarray]) -> Cut:
        """The cut over all of ``scores()`` (every shard's ``by`` column, in input order; NaN:
        no score): called only here, since it holds 4 bytes per pair."""
        values = scores()
        rows = np.flatnonzero(~np.isnan(values))
        k = math.ceil(Fraction(str(self.fraction)) * len(rows))
        if k == 0:
            return Cut(math.inf)
        order = rows[np.lexsort((rows, -values[rows]))][:k]
        return Cut(float(values[order[-1]]), float(order[-1]))


KeepPolicy = Threshold | KeepFraction
