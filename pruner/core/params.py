"""Declared parameters of allocators and methods: one place that knows a parameter's type, default, allowed range
and paper symbol.

The CLI flags, the dashboard's controls and every validation are generated from these declarations, so adding a
parameterised allocator or method needs no edit outside its own file and its registry line. This module imports
nothing from the rest of the package (it sits at the bottom of the import graph with the formulas).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """One numeric parameter.

    ``name`` is the Python keyword and the CLI flag (``--name``); ``symbol`` the paper's letter (λ, M, β, ρ);
    ``low``/``high`` bound the allowed range (None: unbounded), open at an end when ``low_open``/``high_open``.
    ``step`` is the dashboard control's increment; ``slider`` (low, high), a part of the allowed range, makes the
    Allocation page offer a slider over it (what-if exploration) instead of a number input.
    """

    name: str
    symbol: str
    kind: type
    default: float | int
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    step: float | None = None
    slider: tuple[float, float] | None = None

    def __post_init__(self):
        if self.kind not in (int, float):
            raise ValueError(f"parameter {self.name!r}: kind must be int or float; got {self.kind!r}")
        if not self.name.isidentifier():
            raise ValueError(f"parameter name must be a Python identifier; got {self.name!r}")
        self.check(self.default)  # a default outside its own range is a declaration bug
        if self.slider is not None and not (self.slider[0] <= self.default <= self.slider[1]):
            raise ValueError(f"parameter {self.name!r}: the slider's range {self.slider} must hold the default")
        for end in self.slider or ():  # a slider dragged to its end must not offer a value the check refuses
            try:
                self.check(end)
            except ValueError as err:
                raise ValueError(f"parameter {self.name!r}: the slider's end {end:g} is not allowed ({err})") from err

    @property
    def title(self) -> str:
        """'λ (lam)' — how messages and controls name it."""
        return self.symbol if self.symbol == self.name else f"{self.symbol} ({self.name})"

    def range_text(self) -> str:
        """'[0, 0.5)', '> 0', 'an integer ≥ 1', ... — the allowed values in words."""
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return (f"{what} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '≥'} {self.low:g}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '≤'} {self.high:g}"
        return f"a finite {'integer' if self.kind is int else 'number'}"

    def check(self, value) -> float | int:
        """The value as ``kind`` if it is allowed; otherwise ValueError naming the allowed range."""
        bad = ValueError(f"{self.title} must be {self.range_text()}; got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if self.kind is int:
            if float(value) != int(value):
                raise bad
            value = int(value)
        else:
            value = float(value)
        if not math.isfinite(value):
            raise bad
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise bad
        return value


def check_params(owner: str, declared: tuple[Param, ...], given: dict | None) -> dict:
    """``given`` checked against ``declared``, with defaults filled in, in declaration order.

    A name that is not declared is an error naming the ones that are: a parameter silently ignored would make two
    different requests look like one.
    """
    given = dict(given or {})
    known = {p.name: p for p in declared}
    unknown = sorted(set(given) - set(known))
    if unknown:
        allowed = ", ".join(p.title for p in declared) or "none"
        raise ValueError(f"{owner} takes no parameter {', '.join(map(repr, unknown))}; its parameters: {allowed}")
    return {p.name: p.check(given[p.name]) if given.get(p.name) is not None else p.default for p in declared}


def params_text(values: dict, declared: tuple[Param, ...]) -> str:
    """'λ=0.08, M=5' in declaration order."""
    symbols = {p.name: p.symbol for p in declared}
    return ", ".join(f"{symbols.get(k, k)}={v:g}" for k, v in values.items())
