"""Flat buckets of a state dict: what the ``collective`` transport broadcasts.

:func:`plan` lays the tensors of each dtype, in state-dict order, out in 1-D buckets of at
most ``bucket_bytes`` (a tensor larger than that gets a bucket of its own), the floating-point
ones cast to one dtype (the rollout's); :func:`fill` copies one bucket's tensors in, casting on
the way, so a sender can fill buckets it allocated once and keeps (:func:`empty_buckets`), one
at a time while the previous one is on the wire; :func:`pack` does both at once. Tensors that
share storage (tied embeddings) travel once and come back as views of one slice.
:func:`unpack` turns received buckets back into a state dict of views into them: no copy on the
receiving side.

The layout is plain JSON-able data (names, shapes, dtypes, bucket sizes and offsets), so it can
travel through a key-value store; only the buckets carry tensor bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

Layout = dict  # {"buckets": [[dtype, numel], ...], "tensors": [[name, shape, bucket, offset]]}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def plan(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None, bucket_bytes: int
         ) -> tuple[Layout, list[list[tuple[torch.Tensor, int]]]]:
    """The layout of ``state_dict`` in buckets (floating-point tensors cast to ``dtype``;
    None: each keeps its own) and, per bucket, the ``(tensor, offset)`` pairs that fill it:
    the shapes and dtypes are all it reads, so the buckets can be filled later, one by one
    (:func:`fill`), into buffers allocated once (:func:`empty_buckets`)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    tensors = list(state_dict.items())
    target = [dtype if dtype is not None and t.is_floating_point() else t.dtype
              for _, t in tensors]
    seen: dict[tuple, int] = {}  # (storage, offset, shape, stride, dtype) -> entry index
    entries: list[list] = []  # [name, shape, bucket, offset]
    plans: dict[torch.dtype, list[list]] = {}  # dtype -> buckets: [[index into tensors], ...]
    fill_of: dict[torch.dtype, int] = {}
    where: list[tuple[torch.dtype, int, int] | None] = []
    for i, ((name, t), dt) in enumerate(zip(tensors, target)):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               t.stride(), dt)
        if t.numel() and key in seen:  # tied: a view of the earlier tensor's slice
            where.append(None)
            entries.append([name, list(t.shape), seen[key], None])
            continue
        seen[key] = i
        per = max(1, bucket_bytes // torch.empty((), dtype=dt).element_size())
        buckets = plans.setdefault(dt, [])
        if not buckets or (fill_of[dt] and fill_of[dt] + t.numel() > per):
            buckets.append([])
            fill_of[dt] = 0
        buckets[-1].append(i)
        where.append((dt, len(buckets) - 1, fill_of[dt]))
        fill_of[dt] += t.numel()
        entries.append([name, list(t.shape), None, None])
    # number the buckets dtype by dtype
    first: dict[torch.dtype, int] = {}
    sizes: list[list] = []
    for dt, buckets in plans.items():
        first[dt] = len(sizes)
        sizes.extend([_dtype_name(dt), sum(tensors[i][1].numel() for i in members)]
                     for members in buckets)
    sources: list[list[tuple[torch.Tensor, int]]] = [[] for _ in sizes]
    for i, at in enumerate(where):
        if at is not None:
            dt, k, offset = at
            entries[i][2:] = [first[dt] + k, offset]
            sources[first[dt] + k].append((tensors[i][1], offset))
    for entry in entries:  # tied tensors: the position of the tensor they alias
        if entry[3] is None:
            entry[2:] = entries[entry[2]][2:]
    return {"buckets": sizes, "tensors": entries}, sources


def fill(sources: list[tuple[torch.Tensor, int]], bucket: torch.Tensor) -> torch.Tensor:
    """Copy one bucket's tensors (one of :func:`plan`'s lists) into ``bucket``, casting on
    the way: one copy per tensor, straight from where it lives (a device-to-device copy when
    both are on the accelerator)."""
    with torch.no_grad():
        for t, offset in sources:
            bucket[offset:offset + t.numel()].view(t.shape).copy_(t)
    return bucket


def pack(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None,
         bucket_bytes: int, device: torch.device | str | None = None
         ) -> tuple[Layout, list[torch.Tensor]]:
    """The layout and the buckets of ``state_dict``; floating-point tensors cast to ``dtype``
    (None: each keeps its own), buckets on ``device`` (None: the first tensor's)."""
    if device is None:
        device = next(iter(state_dict.values())).device if state_dict else "cpu"
    layout, sources = plan(state_dict, dtype, bucket_bytes)
    buckets = empty_buckets(layout, device)
    for bucket, members in zip(buckets, sources):
        fill(members, bucket)
    return layout, buckets


def empty_buckets(layout: Layout, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Uninitialised buckets to receive into."""
    return [torch.empty(numel, dtype=dtype_of(dtype), device=device)
            for dtype, numel in layout["buckets"]]


def unpack(layout: Layout, buckets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict, every tensor a view into ``buckets``."""
    out = {}
    for name, shape, k, offset in layout["tensors"]:
        numel = 1
        for n in shape:
            numel *= n
        out[name] = buckets[k][offset:offset + numel].view(shape)
    return out


def unpack_stream(layout: Layout, receive: Callable[[torch.Tensor], Callable[[], None] | None],
                  device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` bucket by bucket: each bucket is allocated and filled by
    ``receive(bucket)`` only when the consumer reaches it, then its tensors (tied ones
    included: they view their original's bucket) are yielded as views, so a consumer that
    copies them holds one bucket at a time, not the whole state dict.

    ``receive`` may start the transfer and return a callable that waits for it to end; then
    the next bucket's transfer is started before this bucket's tensors are yielded, so it
    arrives while the consumer loads this one (two buckets in memory instead of one)."""
    by_bucket: dict[int, list] = {}
    for entry in layout["tensors"]:
        by_bucket.setdefault(entry[2], []).append(entry)

    def start(k):
        dtype, numel = layout["buckets"][k]
        bucket = torch.empty(numel, dtype=dtype_of(dtype), device=device)
        return bucket, receive(bucket)

    count = len(layout["buckets"])
    pending = start(0) if count else None
    for k in range(count):
        bucket, wait = pending
        pending = None
        if wait is not None:
            wait()
            if k + 1 < count:  # on the wire while this bucket's tensors are consumed
                pending = start(k + 1)
        for name, shape, _, offset in by_bucket.get(k, []):
            size = 1
            for n in shape:
                size *= n
            yield name, bucket[offset:offset + size].view(shape)
        if pending is None and k + 1 < count:
            pending = start(k + 1)


def nbytes(buckets: list[torch.Tensor]) -> int:
    return sum(b.numel() * b.element_size() for b in buckets)
