"""Training schedules as pure functions of the optimizer step.

Because nothing here has state, a resumed run recomputes exactly the values of an
uninterrupted one from the step counter alone.
"""

import math


def warmup_cosine(step: int, total: int, warmup: int, start: float, peak: float, final: float) -> float:
    """Linear warmup start -> peak over `warmup` steps, then cosine peak -> final at `total`."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total: int, start: float, final: float) -> float:
    progress = min(1.0, step / max(1, total))
    return final + 0.5 * (start - final) * (1.0 + math.cos(math.pi * progress))


def linear(step: int, total: int, start: float, final: float) -> float:
    progress = min(1.0, step / max(1, total))
    return start + (final - start) * progress
