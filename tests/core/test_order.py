"""Segment and prefill-chunk sizes: literal cases worked out by hand, then properties.

A tree reaches `order.py` already in verification order (topological), so a segment is a
contiguous slice of that order and every prefix of segments must be an ancestor-closed subtree
with the root. The sizes here decide where those slices are cut.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowspec.order import (
    PREFILL_CHUNK_THRESHOLD,
    PREFILL_CHUNK_TOKENS,
    near_equal,
    prefill_chunks,
    segment_sizes,
)

# ---------------------------------------------------------------------------------------------
# near_equal
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "n_parts", "expected"),
    [
        (81, 5, [16, 16, 16, 16, 17]),  # docstring: 81 = 5·16 + 1 → one part of 17, last
        (3, 5, [0, 0, 1, 1, 1]),  # docstring: 3 = 5·0 + 3 → two empty parts first
        (10, 5, [2, 2, 2, 2, 2]),  # exact division
        (0, 3, [0, 0, 0]),  # nothing to split
        (7, 1, [7]),  # one part holds everything
        (14, 4, [3, 3, 4, 4]),  # 14 = 4·3 + 2 → the two larger parts come last
    ],
)
def test_near_equal(n: int, n_parts: int, expected: list[int]) -> None:
    """Sizes differ by at most one, smaller first, and sum to n."""
    assert near_equal(n, n_parts) == expected


# ---------------------------------------------------------------------------------------------
# segment_sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_nodes", "n_slots", "max_size", "expected"),
    [
        # Docstring: 81 // 5 = 16 ≤ 16 → 5 near-equal slices, 81 = 5·16 + 1.
        (81, 5, 16, [16, 16, 16, 16, 17]),
        # Docstring: 100 // 5 = 20 > 16 → ceil(100 / 16) = 7 slices, 100 = 7·14 + 2.
        (100, 5, 16, [14, 14, 14, 14, 14, 15, 15]),
        # Docstring: 3 // 5 = 0 → near_equal(3, 5) = [0, 0, 1, 1, 1], empty slices dropped.
        (3, 5, 16, [1, 1, 1]),
        # The root alone: near_equal(1, 5) = [0, 0, 0, 0, 1] → one segment.
        (1, 5, 16, [1]),
        (1, 1, 1, [1]),
        # Exactly n_slots · max_size = 80: 80 // 5 = 16 → five full slices.
        (80, 5, 16, [16, 16, 16, 16, 16]),
        # One more (81) is the docstring's "+1 for the rounding" case above; the last slice
        # before the switch is 84 = 5·16 + 4 → [16, 17, 17, 17, 17] (84 // 5 = 16 ≤ 16).
        (84, 5, 16, [16, 17, 17, 17, 17]),
        # 85 // 5 = 17 > 16: ceil(85 / 16) = 6 slices, 85 = 6·14 + 1.
        (85, 5, 16, [14, 14, 14, 14, 14, 15]),
        # max_size = 1. 5 = 5·1 → five singletons; 7 // 5 = 1 ≤ 1 → [1, 1, 1, 2, 2] (rounding);
        # 10 // 5 = 2 > 1 → ceil(10 / 1) = 10 singletons.
        (5, 5, 1, [1, 1, 1, 1, 1]),
        (7, 5, 1, [1, 1, 1, 2, 2]),
        (10, 5, 1, [1] * 10),
        # One slot: 16 // 1 = 16 ≤ 16 → one slice; 17 // 1 = 17 > 16 → ceil(17/16) = 2 → [8, 9].
        (16, 1, 16, [16]),
        (17, 1, 16, [8, 9]),
        # The expansion default (65 nodes, one segment of up to 64): 65 // 1 > 64 → [32, 33].
        (65, 1, 64, [32, 33]),
    ],
)
def test_segment_sizes(n_nodes: int, n_slots: int, max_size: int, expected: list[int]) -> None:
    """Cut into n_slots near-equal slices while floor(n/n_slots) ≤ max_size, else ceil(n/max_size)."""
    assert segment_sizes(n_nodes, n_slots, max_size) == expected
    assert sum(expected) == n_nodes


def test_segment_sizes_rejects_empty_tree() -> None:
    """A tree always has its root, so zero nodes is a caller bug."""
    with pytest.raises(AssertionError):
        segment_sizes(0, 5, 16)


# ---------------------------------------------------------------------------------------------
# prefill_chunks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_prompt", "expected"),
    [
        (1, [1]),
        (40, [40]),  # docstring
        (64, [64]),  # at the threshold: still one chunk
        (65, [32, 33]),  # ceil(65 / 60) = 2; 65 = 2·32 + 1
        (120, [60, 60]),  # ceil(120 / 60) = 2; exact
        (121, [40, 40, 41]),  # ceil(121 / 60) = 3; 121 = 3·40 + 1
        (130, [43, 43, 44]),  # docstring: ceil(130 / 60) = 3; 130 = 3·43 + 1
    ],
)
def test_prefill_chunks(n_prompt: int, expected: list[int]) -> None:
    """One chunk up to 64 tokens, else ceil(n/60) near-equal chunks, smaller first."""
    assert PREFILL_CHUNK_THRESHOLD == 64 and PREFILL_CHUNK_TOKENS == 60
    assert prefill_chunks(n_prompt) == expected


def test_prefill_chunks_rejects_empty_prompt() -> None:
    """A request needs at least one prompt token."""
    with pytest.raises(AssertionError):
        prefill_chunks(0)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

PROP = settings(max_examples=300, deadline=None, derandomize=True)


@PROP
@given(n=st.integers(0, 500), n_parts=st.integers(1, 40))
def test_prop_near_equal(n: int, n_parts: int) -> None:
    """n_parts sizes summing to n, non-decreasing, max − min ≤ 1."""
    sizes = near_equal(n, n_parts)
    assert len(sizes) == n_parts
    assert sum(sizes) == n
    assert sizes == sorted(sizes)
    assert max(sizes) - min(sizes) <= 1


@PROP
@given(n_nodes=st.integers(1, 400), n_slots=st.integers(1, 8), max_size=st.integers(1, 70))
def test_prop_segment_sizes(n_nodes: int, n_slots: int, max_size: int) -> None:
    """Segments cover the tree exactly, none empty, smaller first, near-equal.

    A tree that fits fills min(n_nodes, n_slots) slots with slices of at most max_size + 1
    (the rounding allowance); a tree that does not fit gets more slices, none above max_size,
    and no more than it needs (ceil(n_nodes / max_size)).
    """
    sizes = segment_sizes(n_nodes, n_slots, max_size)
    assert sum(sizes) == n_nodes
    assert min(sizes) >= 1
    assert sizes == sorted(sizes)
    assert max(sizes) - min(sizes) <= 1
    assert max(sizes) <= max_size + 1
    if len(sizes) > n_slots:
        assert max(sizes) <= max_size
        assert len(sizes) == math.ceil(n_nodes / max_size)
    else:
        assert len(sizes) == min(n_nodes, n_slots)


@PROP
@given(n_prompt=st.integers(1, 2000))
def test_prop_prefill_chunks(n_prompt: int) -> None:
    """Chunks cover the prompt, none empty, smaller first; chunked prompts use ≤ 60-token chunks."""
    chunks = prefill_chunks(n_prompt)
    assert sum(chunks) == n_prompt
    assert min(chunks) >= 1
    assert chunks == sorted(chunks)
    if n_prompt <= PREFILL_CHUNK_THRESHOLD:
        assert chunks == [n_prompt]
    else:
        assert len(chunks) == math.ceil(n_prompt / PREFILL_CHUNK_TOKENS)
        assert max(chunks) <= PREFILL_CHUNK_TOKENS


@st.composite
def topological_parents(draw: st.DrawFn, max_nodes: int = 120) -> np.ndarray:
    """[n] parents of a random topological tree: parents[0] = -1, parents[i] in [0, i)."""
    n = draw(st.integers(1, max_nodes))
    return np.array([-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)], dtype=np.int64)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(parents=topological_parents(), n_slots=st.integers(1, 6), max_size=st.integers(1, 20))
def test_prop_segment_prefixes_are_ancestor_closed(
    parents: np.ndarray, n_slots: int, max_size: int
) -> None:
    """Cutting a topological order by segment_sizes: every prefix of segments holds the root and
    every kept node's parent, i.e. the pipeline always verifies a connected subtree first."""
    sizes = segment_sizes(len(parents), n_slots, max_size)
    segments = np.split(np.arange(len(parents)), np.cumsum(sizes)[:-1])
    assert [len(s) for s in segments] == sizes
    seen: set[int] = set()
    for seg in segments:
        seen.update(seg.tolist())
        assert 0 in seen
        assert all(int(parents[i]) in seen for i in seen if i != 0)
    assert seen == set(range(len(parents)))
