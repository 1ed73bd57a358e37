"""Flat buckets of a state dict: what the ``collective`` transport broadcasts.

:func:`pack` casts the floating-point tensors to one dtype (the rollout's) and copies the
tensors of each dtype, in state-dict order, into 1-D buckets of at most ``bucket_bytes`` (a
tensor larger than that gets a bucket of its own). Tensors that share storage (tied
embeddings) travel once and come back as views of one slice. :func:`unpack` turns received
buckets back into a state dict of views into them: no copy on the receiving side.

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


def pack(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None,
         bucket_bytes: int, device: torch.device | str | None = None
         ) -> tuple[Layout, list[torch.Tensor]]:
    """The layout and the buckets of ``state_dict``; floating-point tensors cast to ``dtype``
    (None: each keeps its own), buckets on ``device`` (None: the first tensor's)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    tensors = list(state_dict.items())
    if device is None:
        device = tensors[0][1].device if tensors else "cpu"
    target = [dtype if dtype is not None and t.is_floating_point() else t.dtype
              for _, t in tensors]
    seen: dict[tuple, int] = {}  # (storage, offset, shape, stride, dtype) -> entry index
    entries: list[list] = []  # [name, shape, bucket, offset]
    plans: dict[torch.dtype, list[list]] = {}  # dtype -> buckets: [[index into tensors], ...]
    fill: dict[torch.dtype, int] = {}
    bucket_of: list[tuple[torch.dtype, int, int] | None] = []
    for i, ((name, t), dt) in enumerate(zip(tensors, target)):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               t.stride(), dt)
        if t.numel() and key in seen:  # tied: a view of the earlier tensor's slice
            bucket_of.append(None)
            entries.append([name, list(t.shape), seen[key], None])
            continue
        seen[key] = i
        per = max(1, bucket_bytes // torch.empty((), dtype=dt).element_size())
        buckets = plans.setdefault(dt, [])
        if not buckets or (fill[dt] and fill[dt] + t.numel() > per):
            buckets.append([])
            fill[dt] = 0
        buckets[-1].append(i)
        bucket_of.append((dt, len(buckets) - 1, fill[dt]))
        fill[dt] += t.numel()
        entries.append([name, list(t.shape), None, None])
    # number the buckets dtype by dtype, then fill them (one copy, casting on the way)
    first: dict[torch.dtype, int] = {}
    out: list[torch.Tensor] = []
    sizes: list[list] = []
    for dt, buckets in plans.items():
        first[dt] = len(out)
        for members in buckets:
            numel = sum(tensors[i][1].numel() for i in members)
            out.append(torch.empty(numel, dtype=dt, device=device))
            sizes.append([_dtype_name(dt), numel])
    with torch.no_grad():
        for i, where in enumerate(bucket_of):
            if where is None:
                continue
            dt, k, offset = where
            t = tensors[i][1]
            out[first[dt] + k][offset:offset + t.numel()].copy_(t.reshape(-1))
            entries[i][2:] = [first[dt] + k, offset]
    for entry in entries:  # tied tensors: the position of the tensor they alias
        if entry[3] is None:
            entry[2:] = entries[entry[2]][2:]
    return {"buckets": sizes, "tensors": entries}, out


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


def unpack_stream(layout: Layout, receive: Callable[[torch.Tensor], None],
                  device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` bucket by bucket: each bucket is allocated and filled by
    ``receive(bucket)`` only when the consumer reaches it, then its tensors (tied ones
    included: they view their original's bucket) are yielded as views, so a consumer that
    copies them holds one bucket at a time, not the whole state dict."""
    by_bucket: dict[int, list] = {}
    for entry in layout["tensors"]:
        by_bucket.setdefault(entry[2], []).append(entry)
    for k, (dtype, numel) in enumerate(layout["buckets"]):
        bucket = torch.empty(numel, dtype=dtype_of(dtype), device=device)
        receive(bucket)
        for name, shape, _, offset in by_bucket.get(k, []):
            size = 1
            for n in shape:
                size *= n
            yield name, bucket[offset:offset + size].view(shape)


def nbytes(buckets: list[torch.Tensor]) -> int:
    return sum(b.numel() * b.element_size() for b in buckets)
