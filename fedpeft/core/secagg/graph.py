"""The SecAgg+ neighbour graph: a random Harary (circulant) graph, as Bell et al. and Flower use.

The sampled node ids are shuffled with fresh OS randomness; with h = k/2, the node at position i
is linked to positions i-h .. i+h (mod n). ``k = 0`` or ``k >= n - 1`` gives the complete graph
(plain SecAgg). The lists are symmetric and every node has degree exactly k when k < n - 1.
"""

from __future__ import annotations

import random


def neighbour_graph(node_ids: list[int], k: int) -> dict[int, frozenset[int]]:
    """Each node's neighbours (itself excluded)."""
    nodes = sorted(set(node_ids))
    if len(nodes) != len(node_ids):
        raise ValueError("node ids must be distinct")
    if k < 0 or k % 2:
        raise ValueError(f"neighbours = {k}: must be 0 (all) or a positive even number")
    n = len(nodes)
    if k == 0 or k >= n - 1:
        return {u: frozenset(nodes) - {u} for u in nodes}
    order = nodes[:]
    random.SystemRandom().shuffle(order)
    h = k // 2
    graph = {}
    for i, u in enumerate(order):
        graph[u] = frozenset(order[(i + d) % n] for d in range(-h, h + 1) if d)
    return graph
