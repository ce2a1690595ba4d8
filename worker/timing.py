"""Milliseconds for a result's ``timings``, rounded the same way everywhere."""

from __future__ import annotations

import time


def ms_since(start: float) -> float:
    """Milliseconds since ``start`` (a ``time.perf_counter()`` reading), to 0.1 ms."""
    return round((time.perf_counter() - start) * 1000, 1)
