"""Counting live tensors: a CPU-side check that a run left no memory (or autograd graph) behind."""

from __future__ import annotations

import gc

import torch
from torch._subclasses.fake_tensor import FakeTensor


def live_tensors():
    """(bytes of distinct live tensor storages, tensors that carry autograd state) in this process."""
    gc.collect()
    seen, total, graph = set(), 0, 0
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj) or isinstance(obj, FakeTensor) or obj.is_meta:
                continue  # torch.compile's tracing fakes (kept in its caches) hold no data and no real graph
            if obj.grad_fn is not None or obj.grad is not None:
                graph += 1
            st = obj.untyped_storage()
            key = (st.data_ptr(), obj.device)
        except Exception:  # noqa: S112 - exotic tensors (meta, sparse) are not what we count
            continue
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total, graph
