"""The walking skeleton's planner: layers in proportion to available RAM."""

from __future__ import annotations

from homering.cluster.schema import AgentProfile


def ring_order(profiles: list[AgentProfile]) -> list[AgentProfile]:
    """Agents in ring order: by name, with the head (most available RAM) moved to the end.

    The head holds the last window and the output layer, the largest share of
    memory besides its layers (as in prima.cpp, where the head closes the ring).
    """
    head = max(profiles, key=lambda p: (p.ram_available, [-ord(c) for c in p.name]))
    rest = sorted((p for p in profiles if p.name != head.name), key=lambda p: p.name)
    return rest + [head]


def split_proportional(weights: list[float], total: int) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total``, each >= 1 when total allows.

    Largest-remainder rounding (Hamilton's method).
    """
    n = len(weights)
    if n == 0:
        return []
    floor_each = 1 if total >= n else 0
    rest = total - floor_each * n
    wsum = sum(weights) or float(n)
    ideal = [rest * (w if sum(weights) else 1.0) / wsum for w in weights]
    counts = [int(x) for x in ideal]
    order = sorted(range(n), key=lambda i: ideal[i] - counts[i], reverse=True)
    for i in order[: rest - sum(counts)]:
        counts[i] += 1
    return [c + floor_each for c in counts]


def plan_proportional(profiles: list[AgentProfile], n_layers: int) -> list[tuple[str, int]]:
    """Contiguous shares proportional to ``ram_available``, in ring order (head last)."""
    ring = ring_order(profiles)
    counts = split_proportional([float(p.ram_available) for p in ring], n_layers)
    return [(p.name, c) for p, c in zip(ring, counts)]
