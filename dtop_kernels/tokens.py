"""The ragged token layout shared by every op: :class:`TokenSet`.

B images of N tokens each; each image keeps its own subset of active tokens. The active tokens
of all images are packed one image after another:

- ``indices``: int32 ``[capacity]``, flat row index ``b * N + n`` of each active token, sorted by
  image then position (so strictly increasing over the valid part);
- ``cu_seqlens``: int32 ``[B + 1]``, image ``b`` owns ``indices[cu_seqlens[b]:cu_seqlens[b + 1]]``;
- ``capacity`` (host int, the length of ``indices``) and ``max_seqlen`` (host int) are upper
  bounds on the total and per-image counts.

The true total ``T = cu_seqlens[B]`` lives on the device and may be smaller than ``capacity``:
slots ``T..capacity-1`` are padding, ignored by every op (their ``indices`` entries are -1 when
built here). This is what lets :func:`dtop_kernels.dtop_select` produce the next set without
reading counts back to the host. :meth:`TokenSet.tighten` trades one host sync for exact bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

PAD_INDEX = -1


@dataclass(frozen=True, eq=False)
class TokenSet:
    """Active tokens of a batch of B images with N tokens each (see module docstring).

    Build with :meth:`from_mask`, :meth:`from_lists`, :meth:`all_active` or :meth:`from_indices`.
    """

    indices: torch.Tensor  # int32 [capacity]
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    batch_size: int  # B
    seq_len: int  # N, tokens per image in the dense layout
    max_seqlen: int  # host upper bound on any image's count (<= N)
    # (indices, cu_seqlens) storage and versions last seen valid by validate(): a set is checked
    # once until its tensors are modified in place
    _checked: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_metadata(self)

    # ------------------------------------------------------------------ properties
    @property
    def capacity(self) -> int:
        """Host upper bound on the total number of active tokens (= len(indices))."""
        return self.indices.shape[0]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    @property
    def num_active(self) -> torch.Tensor:
        """Total active tokens T, a 0-d int32 device tensor (no host sync)."""
        return self.cu_seqlens[-1]

    @property
    def seqlens(self) -> torch.Tensor:
        """Active tokens per image, int32 ``[B]`` on the device."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def slot_image(self) -> torch.Tensor:
        """Image of each packed slot, int64 ``[capacity]``; padding slots get B."""
        return slot_positions(self.cu_seqlens, self.capacity)[0]

    def valid_slots(self) -> torch.Tensor:
        """Bool ``[capacity]``: True for the first T slots (real tokens), False for padding."""
        slots = torch.arange(self.capacity, device=self.device, dtype=torch.int32)
        return slots < self.cu_seqlens[-1]

    def keep_mask(self) -> torch.Tensor:
        """Bool ``[B, N]`` mask of the active tokens (no host sync)."""
        return self.dense_mask(self.valid_slots())

    def dense_mask(self, slots: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, N]``: True at the tokens of the valid slots where ``slots`` [capacity] is
        True (no host sync)."""
        n = self.batch_size * self.seq_len
        flat = torch.zeros(n + 1, dtype=torch.bool, device=self.device)
        ok = slots & self.valid_slots() & (self.indices >= 0) & (self.indices < n)
        idx = torch.where(ok, self.indices, n).long()
        # index_fill_ takes the value as a scalar argument; ``flat[idx] = True`` would build it
        # as a CPU tensor and copy it to the device with a stream synchronization on CUDA
        flat.index_fill_(0, idx, True)
        return flat[:n].view(self.batch_size, self.seq_len)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def all_active(
        cls, batch_size: int, seq_len: int, device: torch.device | str | None = None
    ) -> TokenSet:
        """Every token of every image is active (the dense layout, packed)."""
        _check_sizes(batch_size, seq_len)
        total = batch_size * seq_len
        _check_int32(total)
        indices = torch.arange(total, dtype=torch.int32, device=device)
        cu = torch.arange(batch_size + 1, dtype=torch.int32, device=device) * seq_len
        return cls(indices, cu, batch_size, seq_len, seq_len)

    @classmethod
    def from_mask(cls, keep: torch.Tensor, *, capacity: int | None = None) -> TokenSet:
        """From a bool keep mask ``[B, N]`` (True = active).

        Without ``capacity`` the set is exact, which reads the count back to the host once.
        With ``capacity`` (>= the true total, e.g. ``B * N``) there is no host sync; padding fills
        the rest. ``max_seqlen`` is ``min(N, capacity)`` in that case. A total above ``capacity``
        raises on CPU; on CUDA it cannot be seen without a sync: ``validate()`` catches it.
        """
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 2:
            raise TypeError(
                f"keep must be a bool tensor [B, N]; got {_describe(keep)}"
            )
        b, n = keep.shape
        _check_sizes(b, n)
        _check_int32(b * n)
        counts = keep.sum(dim=1, dtype=torch.int32)
        cu = torch.zeros(b + 1, dtype=torch.int32, device=keep.device)
        torch.cumsum(counts, dim=0, out=cu[1:])
        if capacity is None:
            indices = keep.reshape(-1).nonzero().squeeze(1).to(torch.int32)  # host sync
            max_seqlen = int(counts.max()) if b > 0 else 0
            return cls(indices, cu, b, n, max_seqlen)
        if not isinstance(capacity, int) or capacity < 0 or capacity > b * n:
            raise ValueError(f"capacity must be an int in [0, B*N={b * n}]; got {capacity!r}")
        indices = _compacted(torch.arange(b * n, dtype=torch.int32, device=keep.device),
                             keep.reshape(-1), capacity)
        if keep.device.type == "cpu" and int(cu[-1]) > capacity:
            raise ValueError(f"{int(cu[-1])} active tokens do not fit in capacity={capacity}; "
                             "pass a capacity of at least keep.sum() (or None for an exact set)")
        return cls(indices, cu, b, n, min(n, capacity))

    @classmethod
    def from_lists(
        cls,
        per_image: Sequence[Sequence[int] | torch.Tensor],
        seq_len: int,
        device: torch.device | str | None = None,
    ) -> TokenSet:
        """From one list of token positions (0..N-1) per image; positions are sorted here.

        Raises if a position is out of range or repeated.
        """
        b = len(per_image)
        _check_sizes(b, seq_len)
        _check_int32(b * seq_len)
        flat: list[torch.Tensor] = []
        counts = []
        for i, pos in enumerate(per_image):
            p = torch.as_tensor(pos, dtype=torch.int64).reshape(-1).cpu()
            if p.numel() and (int(p.min()) < 0 or int(p.max()) >= seq_len):
                raise ValueError(
                    f"image {i}: token positions must lie in [0, {seq_len}); got "
                    f"min {int(p.min())}, max {int(p.max())}"
                )
            p = torch.sort(p).values
            if p.numel() > 1 and bool((p[1:] == p[:-1]).any()):
                raise ValueError(f"image {i}: token positions contain duplicates")
            flat.append(p + i * seq_len)
            counts.append(p.numel())
        indices = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.int64)
        cu = torch.zeros(b + 1, dtype=torch.int64)
        if b:
            cu[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
        return cls(
            indices.to(device=device, dtype=torch.int32),
            cu.to(device=device, dtype=torch.int32),
            b,
            seq_len,
            max(counts, default=0),
        )

    @classmethod
    def from_indices(
        cls,
        indices: torch.Tensor,
        cu_seqlens: torch.Tensor,
        seq_len: int,
        max_seqlen: int | None = None,
        *,
        validate: bool = True,
    ) -> TokenSet:
        """From raw ``indices`` [capacity] and ``cu_seqlens`` [B + 1] (int32, same device).

        ``validate=True`` checks every invariant (one host sync); pass False on a hot path when
        the arrays come from a trusted producer.
        """
        b = cu_seqlens.shape[0] - 1 if cu_seqlens.dim() == 1 else -1
        ts = cls(indices, cu_seqlens, b, seq_len, seq_len if max_seqlen is None else max_seqlen)
        if validate:
            ts.validate()
        return ts

    # ------------------------------------------------------------------ utilities
    def validate(self) -> TokenSet:
        """Check the device-side invariants (one host sync); raise ValueError naming the fault.

        ``cu_seqlens`` starts at 0, never decreases and ends at most at ``capacity``; no image
        has more than ``max_seqlen`` tokens; the valid ``indices`` of image b lie in
        ``[b * N, (b + 1) * N)`` and increase strictly. A set that passed is not checked again
        until its tensors are modified in place.
        """
        key = _version_key(self)
        if key is not None and self._checked == key:
            return self
        b, n = self.batch_size, self.seq_len
        both = torch.cat([self.cu_seqlens, self.indices]).long().cpu()  # the one host sync
        cu, idx = both[: b + 1], both[b + 1:]
        counts = check_offsets(
            cu, "cu_seqlens", self.capacity,
            rows_what=f"capacity (len(indices)) = {self.capacity}: the offsets count more "
                      "tokens than indices holds",
            max_seqlen=self.max_seqlen, counted="active tokens", max_what="max_seqlen")
        total = int(cu[-1])
        valid = idx[:total]
        image = torch.repeat_interleave(torch.arange(b), counts) if b else valid
        lo, hi = image * n, (image + 1) * n
        bad = (valid < lo) | (valid >= hi)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise ValueError(
                f"indices[{j}] = {int(valid[j])} does not belong to image {int(image[j])} (out "
                f"of range: expected a flat index b*N + position in [{int(lo[j])}, {int(hi[j])}))"
            )
        if total > 1 and bool((valid[1:] <= valid[:-1]).any()):
            j = int((valid[1:] <= valid[:-1]).nonzero()[0])
            raise ValueError(
                f"indices must be strictly increasing within the valid part (sorted by image, "
                f"then position, no duplicates); indices[{j}] = {int(valid[j])} >= "
                f"indices[{j + 1}] = {int(valid[j + 1])}"
            )
        object.__setattr__(self, "_checked", key)
        return self

    def compact(self, keep: torch.Tensor) -> TokenSet:
        """The set of the slots where ``keep`` (bool ``[capacity]``) is True, same capacity and
        bounds, in the same order (no host sync). Padding slots never stay."""
        cap, b = self.capacity, self.batch_size
        keep = keep & self.valid_slots()
        counts = torch.zeros(b + 1, dtype=torch.int32, device=keep.device)
        counts.scatter_add_(0, self.slot_image(), keep.int())
        cu = torch.zeros(b + 1, dtype=torch.int32, device=keep.device)
        torch.cumsum(counts[:b], dim=0, out=cu[1:])
        return TokenSet(_compacted(self.indices, keep, cap), cu, b, self.seq_len,
                        self.max_seqlen)

    def repack(self, packed: torch.Tensor, new: TokenSet) -> torch.Tensor:
        """Rows for ``new`` (a subset of this set's tokens, e.g. after :meth:`compact` or
        ``dtop_select``) taken from ``packed`` [capacity, C] in this set's layout: returns
        [new.capacity, C]; padding rows copy an arbitrary row (they carry no meaning). One index
        map over the B*N token positions; no host sync."""
        nn_ = self.batch_size * self.seq_len
        dev = packed.device
        slot_of = torch.zeros(nn_ + 1, dtype=torch.long, device=dev)
        dest = torch.where(self.valid_slots(), self.indices.long(), nn_)
        slot_of.scatter_(0, dest, torch.arange(self.capacity, device=dev))
        src = slot_of[torch.where(new.valid_slots(), new.indices.long(), nn_)]
        return packed.index_select(0, src)

    def with_prefix(self, p: int) -> tuple[TokenSet, torch.Tensor]:
        """The set over ``p + N`` tokens per image whose first ``p`` tokens (prefix tokens:
        class, registers) are active in every image, followed by this set's tokens (token n
        becomes ``p + n``); and where each of this set's slots sits in it (int64 [capacity];
        padding slots land on padding). Capacity and max_seqlen grow by ``B * p`` and ``p``.
        No host sync; ``p = 0`` returns this set."""
        if not isinstance(p, int) or isinstance(p, bool) or p < 0:
            raise ValueError(f"p (prefix tokens) must be a non-negative int; got {p!r}")
        slots = torch.arange(self.capacity, device=self.device)
        if p == 0:
            return self, slots
        b, n = self.batch_size, self.seq_len
        _check_int32(b * (n + p))
        image = self.slot_image()
        shift = torch.where(image < b, image + 1, b)  # padding: after every prefix slot
        slots = slots + p * shift
        cu = self.cu_seqlens + p * torch.arange(b + 1, dtype=torch.int32, device=self.device)
        ok = self.valid_slots()
        indices = torch.empty(self.capacity + b * p, dtype=torch.int32, device=self.device)
        indices.scatter_(0, slots, torch.where(ok, self.indices + (p * shift).int(), PAD_INDEX))
        first = torch.arange(p, dtype=torch.int32, device=self.device)
        prefix_slots = cu[:-1, None].long() + first.long()  # [B, p]
        prefix = torch.arange(b, dtype=torch.int32, device=self.device)[:, None] * (n + p) + first
        indices.scatter_(0, prefix_slots.reshape(-1), prefix.reshape(-1))
        return TokenSet(indices, cu, b, n + p, self.max_seqlen + p), slots

    def tighten(self, multiple: int = 1) -> TokenSet:
        """Exact max_seqlen and a capacity of T rounded up to ``multiple`` (a bucket; at most
        the current capacity), read back from the device (one host sync).

        Worth it where a host sync is cheap (CPU) or once per stage when the saved work outweighs
        the stall (ops that cannot skip padding rows on the device, e.g. cuBLAS GEMMs); padding
        past the bucket is dropped. A bucket (e.g. 64) keeps the shapes few across batches.
        """
        if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
            raise ValueError(f"multiple must be a positive int; got {multiple!r}")
        total, max_seqlen = _read_counts(self.cu_seqlens)
        cap = min(-(-total // multiple) * multiple, self.capacity)
        return TokenSet(self.indices[:max(cap, total)], self.cu_seqlens, self.batch_size,
                        self.seq_len, max_seqlen)

    def to(self, device: torch.device | str) -> TokenSet:
        return TokenSet(self.indices.to(device), self.cu_seqlens.to(device), self.batch_size,
                        self.seq_len, self.max_seqlen)

    def __repr__(self) -> str:
        return (
            f"TokenSet(batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"capacity={self.capacity}, max_seqlen={self.max_seqlen}, device={self.device})"
        )


def _read_counts(cu_seqlens: torch.Tensor) -> tuple[int, int]:
    """(T, the largest count) read back to the host (one sync); under torch.compile a
    deliberate graph break (the read runs eagerly between two graphs)."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_read_counts)(cu_seqlens)
    cu = cu_seqlens.cpu()
    counts = cu[1:] - cu[:-1]
    return int(cu[-1]), int(counts.max()) if counts.numel() else 0


# ---------------------------------------------------------------------- slot maps
def slot_positions(cu_seqlens: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, position in its image) of every packed slot 0..capacity-1, int64, from the
    offsets alone (no host sync); padding slots get image B."""
    slots = torch.arange(capacity, device=cu_seqlens.device, dtype=torch.int32)
    image = torch.searchsorted(cu_seqlens[1:], slots, right=True)
    start = cu_seqlens.long()[image.clamp(max=max(cu_seqlens.shape[0] - 2, 0))]
    return image, slots.long() - start


def _compacted(values: torch.Tensor, keep: torch.Tensor, capacity: int) -> torch.Tensor:
    """int32 [capacity]: the ``values`` where ``keep`` is True, in order, then PAD_INDEX;
    kept values past ``capacity`` are dropped (no host sync)."""
    dest = torch.cumsum(keep, dim=0, dtype=torch.int64) - 1
    dest = torch.where(keep, dest, capacity).clamp_(max=capacity)  # the rest: a spare slot
    buf = torch.full((capacity + 1,), PAD_INDEX, dtype=torch.int32, device=keep.device)
    buf.scatter_(0, dest, values.to(torch.int32))
    return buf[:capacity]


# ---------------------------------------------------------------------- checks
def check_offsets(cu: torch.Tensor, name: str, rows: int, *, rows_what: str, max_seqlen: int,
                  counted: str, max_what: str) -> torch.Tensor:
    """Raise ValueError naming the first broken rule of the host offsets ``cu`` ([B + 1]): they
    start at 0, never decrease, end at most at ``rows`` (``rows_what`` describes that bound) and
    no image counts more than ``max_seqlen``. Returns the counts ([B])."""
    if int(cu[0]) != 0:
        raise ValueError(f"{name}[0] must be 0; got {int(cu[0])} (offsets start at 0: "
                         f"{name} = [0, cumsum(counts)])")
    counts = cu[1:] - cu[:-1]
    if counts.numel() and bool((counts < 0).any()):
        j = int((counts < 0).nonzero()[0])
        raise ValueError(f"{name} must be non-decreasing; {name}[{j + 1}] = {int(cu[j + 1])} < "
                         f"{name}[{j}] = {int(cu[j])} (build it as [0, cumsum(counts)])")
    if int(cu[-1]) > rows:
        raise ValueError(f"{name}[-1] = {int(cu[-1])} exceeds {rows_what}")
    if counts.numel() and int(counts.max()) > max_seqlen:
        raise ValueError(f"image {int(counts.argmax())} has {int(counts.max())} {counted}, more "
                         f"than {max_what} = {max_seqlen}; pass a bound of at least the largest "
                         "count")
    return counts


def _version_key(ts: TokenSet) -> tuple | None:
    """Identifies the current contents of the set's tensors (changes on any in-place write);
    None for inference-mode tensors, which keep no version counter (checked every time)."""
    if ts.indices.is_inference() or ts.cu_seqlens.is_inference():
        return None
    return tuple((t.data_ptr(), t._version) for t in (ts.indices, ts.cu_seqlens)) + (
        ts.max_seqlen,)


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return type(t).__name__


def _is_int(v: object) -> bool:
    """A host int, or a symbolic one (a dynamic dimension under torch.export / compile)."""
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _check_sizes(b: int, n: int) -> None:
    if not _is_int(b) or b < 0:
        raise ValueError(f"batch size must be a non-negative int; got {b!r}")
    if not _is_int(n) or n <= 0:
        raise ValueError(f"seq_len (tokens per image) must be a positive int; got {n!r}")


def _check_int32(total: int) -> None:
    if total >= 2**31:
        raise ValueError(f"B*N = {total} tokens overflows the int32 indices; split the batch")


def _check_metadata(ts: TokenSet) -> None:
    """Host-side checks only (no sync): dtypes, shapes, devices, bounds."""
    for name in ("indices", "cu_seqlens"):
        t = getattr(ts, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"TokenSet.{name} must be a tensor; got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"TokenSet.{name} must be int32; got {t.dtype} (use .int())")
        if t.dim() != 1:
            raise ValueError(f"TokenSet.{name} must be 1-D; got shape {tuple(t.shape)}")
        if t.stride(0) != 1 and t.numel() > 1:
            raise ValueError(f"TokenSet.{name} must be contiguous")
    if ts.indices.device != ts.cu_seqlens.device:
        raise ValueError(
            f"indices ({ts.indices.device}) and cu_seqlens ({ts.cu_seqlens.device}) must be on "
            "the same device"
        )
    _check_sizes(ts.batch_size, ts.seq_len)
    if ts.cu_seqlens.shape[0] != ts.batch_size + 1:
        raise ValueError(
            f"cu_seqlens must have B + 1 = {ts.batch_size + 1} entries; got "
            f"{ts.cu_seqlens.shape[0]}"
        )
    if ts.capacity > ts.batch_size * ts.seq_len:
        raise ValueError(
            f"capacity (len(indices)) = {ts.capacity} exceeds B*N = "
            f"{ts.batch_size * ts.seq_len}"
        )
    if not _is_int(ts.max_seqlen) or not 0 <= ts.max_seqlen <= ts.seq_len:
        raise ValueError(f"max_seqlen must be an int in [0, N={ts.seq_len}]; got {ts.max_seqlen!r}")
