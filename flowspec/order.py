"""Cutting trees and prompts into segments.

Theory of operation
-------------------
A tree is already in verification order when it reaches this module (score-sorted for FlowSpec,
layer order for the chunked baselines); a segment is a contiguous slice of that order. Because the
order is topological, every prefix of segments is an ancestor-closed subtree containing the root,
so the pipeline always verifies a connected, highest-scoring part of the tree first.

Rule: sizes only. Which nodes go where is `numpy.split` of the tree order by these sizes.
"""

from __future__ import annotations

import math

PREFILL_CHUNK_THRESHOLD = 64  # prompts longer than this are prefilled in chunks (reference code)
PREFILL_CHUNK_TOKENS = 60  # target chunk size when chunking


def near_equal(n: int, n_parts: int) -> list[int]:
    """`n` split into `n_parts` sizes that differ by at most one, smaller first.

    >>> near_equal(81, 5)
    [16, 16, 16, 16, 17]
    >>> near_equal(3, 5)
    [0, 0, 1, 1, 1]
    """
    assert n >= 0 and n_parts >= 1
    base, extra = divmod(n, n_parts)
    return [base] * (n_parts - extra) + [base + 1] * extra


def segment_sizes(n_nodes: int, n_slots: int, max_size: int) -> list[int]:
    """Sizes of the initial segments of a tree of `n_nodes` (root included).

    The pipeline has `n_slots` places for segments (the stages plus the draft node), so the tree is
    cut into `n_slots` near-equal slices while those stay within `max_size` (+1 for the rounding, as
    the reference code does); a larger tree is cut into as many slices as `max_size` requires.
    Empty slices are dropped: a tiny tree fills fewer slots.

    >>> segment_sizes(81, 5, 16)
    [16, 16, 16, 16, 17]
    >>> segment_sizes(100, 5, 16)
    [14, 14, 14, 14, 14, 15, 15]
    >>> segment_sizes(3, 5, 16)
    [1, 1, 1]
    """
    assert n_nodes >= 1 and n_slots >= 1 and max_size >= 1
    n_parts = n_slots if n_nodes // n_slots <= max_size else math.ceil(n_nodes / max_size)
    return [s for s in near_equal(n_nodes, n_parts) if s > 0]


def prefill_chunks(n_prompt: int) -> list[int]:
    """Chunk sizes for a prompt: one chunk up to 64 tokens, else ceil(n/60) near-equal chunks.

    >>> prefill_chunks(40)
    [40]
    >>> prefill_chunks(130)
    [43, 43, 44]
    """
    assert n_prompt >= 1, "a request needs at least one prompt token"
    if n_prompt <= PREFILL_CHUNK_THRESHOLD:
        return [n_prompt]
    return near_equal(n_prompt, math.ceil(n_prompt / PREFILL_CHUNK_TOKENS))
