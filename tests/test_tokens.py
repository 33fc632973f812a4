"""TokenSet: constructors, invariants (validate), keep-mask round trips, tighten, padding, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import random_keep

from dtop_kernels import TokenSet
from dtop_kernels.tokens import PAD_INDEX

I32 = torch.int32


def _expected_indices(keep: torch.Tensor) -> torch.Tensor:
    """Flat b*N + n of the active tokens, image then position (a naive loop)."""
    b, n = keep.shape
    flat = [i * n + j for i in range(b) for j in range(n) if keep[i, j]]
    return torch.tensor(flat, dtype=I32)


def _expected_cu(keep: torch.Tensor) -> torch.Tensor:
    cu = [0]
    for row in keep:
        cu.append(cu[-1] + int(row.sum()))
    return torch.tensor(cu, dtype=I32)


MASKS = [
    pytest.param(3, 37, [0, 37, 11], id="B3-N37-empty-full-partial"),
    pytest.param(1, 16, [16], id="B1-all"),
    pytest.param(1, 5, [0], id="B1-none"),
    pytest.param(4, 9, [1, 9, 0, 4], id="B4-N9-mixed"),
]


# ---------------------------------------------------------------------- from_mask
@pytest.mark.parametrize("b,n,counts", MASKS)
def test_from_mask_exact(b, n, counts, gen):
    keep = random_keep(b, n, counts, gen)
    ts = TokenSet.from_mask(keep)
    assert (ts.batch_size, ts.seq_len) == (b, n)
    assert ts.capacity == sum(counts)
    assert ts.max_seqlen == max(counts)
    assert torch.equal(ts.indices, _expected_indices(keep))
    assert torch.equal(ts.cu_seqlens, _expected_cu(keep))
    assert ts.indices.dtype == I32 and ts.cu_seqlens.dtype == I32
    assert torch.equal(ts.seqlens, torch.tensor(counts, dtype=I32))
    assert int(ts.num_active) == sum(counts)
    assert torch.equal(ts.keep_mask(), keep)
    ts.validate()


@pytest.mark.parametrize("b,n,counts", MASKS)
@pytest.mark.parametrize("extra", [0, 3, None], ids=["cap=T", "cap=T+3", "cap=BN"])
def test_from_mask_capacity(b, n, counts, extra, gen):
    keep = random_keep(b, n, counts, gen)
    t = sum(counts)
    cap = b * n if extra is None else min(b * n, t + extra)
    ts = TokenSet.from_mask(keep, capacity=cap)
    assert ts.capacity == cap
    assert ts.max_seqlen == min(n, cap)  # no host sync: the bound is min(N, capacity)
    assert torch.equal(ts.indices[:t], _expected_indices(keep))
    assert torch.all(ts.indices[t:] == PAD_INDEX)
    assert torch.equal(ts.cu_seqlens, _expected_cu(keep))
    assert torch.equal(ts.keep_mask(), keep)
    assert torch.equal(ts.valid_slots(), torch.arange(cap) < t)
    ts.validate()


def test_from_mask_capacity_too_small(gen):
    keep = random_keep(2, 8, [5, 4], gen)
    with pytest.raises(ValueError, match="capacity"):
        TokenSet.from_mask(keep, capacity=8)


@pytest.mark.parametrize("cap", [-1, 17, 3.0], ids=["negative", "over-BN", "float"])
def test_from_mask_bad_capacity(cap, gen):
    keep = random_keep(2, 8, [1, 2], gen)
    with pytest.raises(ValueError, match="capacity"):
        TokenSet.from_mask(keep, capacity=cap)


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(torch.ones(2, 5, dtype=torch.int64), id="int64"),
        pytest.param(torch.ones(2, 5, dtype=torch.uint8), id="uint8"),
        pytest.param(torch.ones(10, dtype=torch.bool), id="1d"),
        pytest.param(torch.ones(1, 2, 5, dtype=torch.bool), id="3d"),
        pytest.param([[True, False]], id="list"),
    ],
)
def test_from_mask_bad_keep(keep):
    with pytest.raises(TypeError, match="bool"):
        TokenSet.from_mask(keep)


# ---------------------------------------------------------------------- from_lists
def test_from_lists_sorts_and_handles_empty_images():
    lists = [[5, 1, 3], [], torch.tensor([6, 0]), [2]]
    ts = TokenSet.from_lists(lists, seq_len=7)
    keep = torch.zeros(4, 7, dtype=torch.bool)
    for i, pos in enumerate(lists):
        for p in list(pos):
            keep[i, int(p)] = True
    assert torch.equal(ts.indices, _expected_indices(keep))
    assert torch.equal(ts.cu_seqlens, torch.tensor([0, 3, 3, 5, 6], dtype=I32))
    assert ts.max_seqlen == 3
    assert torch.equal(ts.keep_mask(), keep)
    ts.validate()


def test_from_lists_all_empty():
    ts = TokenSet.from_lists([[], []], seq_len=4)
    assert ts.capacity == 0 and ts.max_seqlen == 0
    assert torch.equal(ts.cu_seqlens, torch.zeros(3, dtype=I32))
    assert not ts.keep_mask().any()
    ts.validate()


@pytest.mark.parametrize(
    "lists,match",
    [
        pytest.param([[0, 7]], r"\[0, 7\)", id="too-large"),
        pytest.param([[1], [-1]], r"\[0, 7\)", id="negative"),
        pytest.param([[2, 3, 2]], "duplicates", id="duplicate"),
    ],
)
def test_from_lists_errors(lists, match):
    with pytest.raises(ValueError, match=match):
        TokenSet.from_lists(lists, seq_len=7)


@pytest.mark.parametrize("n", [0, -3], ids=["zero", "negative"])
def test_bad_seq_len(n):
    with pytest.raises(ValueError, match="seq_len"):
        TokenSet.from_lists([[0]], seq_len=n)
    with pytest.raises(ValueError, match="seq_len"):
        TokenSet.all_active(2, n)


# ---------------------------------------------------------------------- all_active
@pytest.mark.parametrize("b,n", [(1, 1), (3, 37), (0, 4)], ids=["1x1", "3x37", "B0"])
def test_all_active(b, n):
    ts = TokenSet.all_active(b, n)
    assert ts.capacity == b * n and ts.max_seqlen == n
    assert torch.equal(ts.keep_mask(), torch.ones(b, n, dtype=torch.bool))
    assert torch.equal(ts.indices, torch.arange(b * n, dtype=I32))
    assert torch.equal(ts.cu_seqlens, torch.arange(b + 1, dtype=I32) * n)
    ts.validate()


# ---------------------------------------------------------------------- from_indices/validate
def _raw(idx: list[int], cu: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(idx, dtype=I32), torch.tensor(cu, dtype=I32)


def test_from_indices_valid_with_padding():
    idx, cu = _raw([1, 2, 6, -1, -1], [0, 2, 2, 3])  # N = 3, B = 3: image 2 owns 6..8
    ts = TokenSet.from_indices(idx, cu, seq_len=3, max_seqlen=2)
    assert ts.batch_size == 3 and ts.capacity == 5
    expected = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert torch.equal(ts.keep_mask(), expected)


@pytest.mark.parametrize(
    "idx,cu,max_seqlen,match",
    [
        pytest.param([0, 9], [0, 1, 2], None, "does not belong to image 1", id="out-of-range"),
        pytest.param([0, -2], [0, 1, 2], None, "does not belong", id="negative"),
        pytest.param([2, 1], [0, 2, 2], None, "strictly increasing", id="unsorted"),
        pytest.param([1, 1], [0, 2, 2], None, "strictly increasing", id="duplicate"),
        pytest.param([5, 1], [0, 1, 2], None, "does not belong to image 0", id="wrong-image"),
        pytest.param([0, 1], [1, 1, 2], None, r"cu_seqlens\[0\] must be 0", id="cu0-not-0"),
        pytest.param([0, 1, 5], [0, 2, 1, 3], None, "non-decreasing", id="cu-decreasing"),
        pytest.param([0, 1], [0, 1, 3], None, "exceeds capacity", id="cu-over-capacity"),
        pytest.param([0, 1, 2], [0, 3, 3], 2, "max_seqlen", id="count-over-max_seqlen"),
    ],
)
def test_validate_catches(idx, cu, max_seqlen, match):
    # N = 4; B = len(cu) - 1.
    i, c = _raw(idx, cu)
    with pytest.raises(ValueError, match=match):
        TokenSet.from_indices(i, c, seq_len=4, max_seqlen=max_seqlen)
    # validate=False skips the device-side checks; validate() then catches the same fault.
    ts = TokenSet.from_indices(i, c, seq_len=4, max_seqlen=max_seqlen, validate=False)
    with pytest.raises(ValueError, match=match):
        ts.validate()


def test_validate_ignores_padding_slots():
    idx, cu = _raw([3, 0, 0, 7], [0, 1, 1])  # garbage after T = 1 is padding
    TokenSet.from_indices(idx, cu, seq_len=4).validate()


# ---------------------------------------------------------------------- metadata errors
@pytest.mark.parametrize(
    "field,bad",
    [
        pytest.param("indices", torch.arange(4, dtype=torch.int64), id="indices-int64"),
        pytest.param("cu_seqlens", torch.tensor([0, 2, 4], dtype=torch.int64), id="cu-int64"),
        pytest.param("indices", torch.arange(4, dtype=torch.float32), id="indices-float"),
        pytest.param("indices", [0, 1, 2, 3], id="indices-list"),
    ],
)
def test_wrong_index_type(field, bad):
    args = {"indices": torch.arange(4, dtype=I32), "cu_seqlens": torch.tensor([0, 2, 4], dtype=I32)}
    args[field] = bad
    with pytest.raises(TypeError):
        TokenSet(args["indices"], args["cu_seqlens"], 2, 2, 2)


@pytest.mark.parametrize(
    "indices,cu,b,n,m,match",
    [
        pytest.param(torch.zeros(2, 2, dtype=I32), [0, 2, 4], 2, 2, 2, "1-D", id="indices-2d"),
        pytest.param(torch.arange(4, dtype=I32), [0, 4], 2, 2, 2, "B \\+ 1", id="cu-length"),
        pytest.param(torch.arange(5, dtype=I32), [0, 2, 4], 2, 2, 2, "exceeds B\\*N",
                     id="capacity-over-BN"),
        pytest.param(torch.arange(4, dtype=I32), [0, 2, 4], 2, 2, 3, "max_seqlen",
                     id="max_seqlen-over-N"),
        pytest.param(torch.arange(4, dtype=I32), [0, 2, 4], -1, 2, 2, "batch size",
                     id="negative-B"),
        pytest.param(torch.arange(8, dtype=I32)[::2], [0, 2, 4], 2, 2, 2, "contiguous",
                     id="non-contiguous"),
    ],
)
def test_bad_metadata(indices, cu, b, n, m, match):
    with pytest.raises(ValueError, match=match):
        TokenSet(indices, torch.tensor(cu, dtype=I32), b, n, m)


def test_device_mismatch():
    idx = torch.arange(4, dtype=I32, device="meta")
    cu = torch.tensor([0, 2, 4], dtype=I32)
    with pytest.raises(ValueError, match="same device"):
        TokenSet(idx, cu, 2, 2, 2)


def test_meta_device_metadata_only():
    # Host-side checks never read device values, so a meta TokenSet can be built.
    ts = TokenSet(torch.empty(6, dtype=I32, device="meta"),
                  torch.empty(3, dtype=I32, device="meta"), 2, 4, 4)
    assert ts.device.type == "meta" and ts.capacity == 6


# ---------------------------------------------------------------------- utilities
@pytest.mark.parametrize("b,n,counts", MASKS)
def test_tighten(b, n, counts, gen):
    keep = random_keep(b, n, counts, gen)
    padded = TokenSet.from_mask(keep, capacity=b * n)
    tight = padded.tighten()
    exact = TokenSet.from_mask(keep)
    assert tight.capacity == sum(counts) and tight.max_seqlen == max(counts)
    assert torch.equal(tight.indices, exact.indices)
    assert torch.equal(tight.cu_seqlens, exact.cu_seqlens)
    assert torch.equal(tight.keep_mask(), keep)
    tight.validate()


@pytest.mark.parametrize("multiple", [1, 4, 64])
def test_tighten_to_a_bucket(multiple, gen):
    b, n, counts = 3, 20, [7, 0, 13]
    keep = random_keep(b, n, counts, gen)
    padded = TokenSet.from_mask(keep, capacity=b * n)
    tight = padded.tighten(multiple)
    t = sum(counts)
    assert tight.capacity == min(-(-t // multiple) * multiple, b * n)
    assert tight.capacity % multiple == 0 or tight.capacity == b * n
    assert tight.max_seqlen == max(counts)
    assert torch.equal(tight.keep_mask(), keep)
    tight.validate()
    with pytest.raises(ValueError, match="multiple must be a positive int"):
        padded.tighten(0)


def test_slot_image_and_dense_mask():
    ts = TokenSet.from_mask(torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.bool),
                            capacity=6)
    assert ts.slot_image().tolist() == [0, 0, 2, 2, 3, 3]  # padding slots -> B
    pick = torch.tensor([True, False, False, True, True, True])  # padding picks are ignored
    expected = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(ts.dense_mask(pick), expected)


def test_to_keeps_layout():
    ts = TokenSet.from_lists([[2, 0], [1]], seq_len=3)
    moved = ts.to("cpu")
    assert torch.equal(moved.indices, ts.indices) and moved.max_seqlen == ts.max_seqlen
    assert "batch_size=2" in repr(ts)
