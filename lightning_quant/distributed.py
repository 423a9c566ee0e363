"""Calibration and QAT across processes (DDP): shard the calibration batches, merge observer state, share weights.

Under ``torch.distributed`` (Lightning's ``strategy="ddp"``, ``torchrun``, SLURM) every rank calibrates on its own
share of the calibration batches, then :func:`sync_quantizers` all-reduces the observers' state so every rank
holds the same qparams, equal to one process calibrating on the union of the shares:

- min/max ranges: MIN/MAX all-reduce (exactly equal to a single-process calibration on the same batches);
- histograms (``percentile``, ``mse``, ``entropy``): re-gridded onto one shared power-of-two bin layout and
  summed (the merge is exact; the bin width can differ from a single process's, which depends on data order);
- moving averages: the mean of the ranks' averages; ``mean_minmax``: the sample-weighted mean of the ranks' means;
  DPU fix-position votes: summed.

Outside ``torch.distributed`` (or with one process) every function here is a no-op, so single-process code
calls them unconditionally. :class:`~lightning_quant.QuantCallback` does all of this by itself.

Failures never hang: before every collective the ranks agree that their local work succeeded
(:func:`all_ranks_succeed`, :func:`check_all_ranks`). When one rank fails (a NaN batch in its shard, a bad
transform), every rank raises :class:`~lightning_quant.errors.RankFailedError` naming the failing rank and its
original message at once, instead of the others waiting in a collective until the process group times out.

Example (single process: nothing to shard or merge):
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import scheme_for_target
    >>> from lightning_quant.calibration import calibrate
    >>> from lightning_quant.quantizers import prepare
    >>> model = prepare(nn.Sequential(nn.Linear(4, 2)).eval(), scheme_for_target("x86"))
    >>> data = [torch.randn(3, 4) for _ in range(4)]
    >>> shard = shard_batches(data, num_batches=4)
    >>> calibrate(model, shard, progress=False, shard=True)  # the range estimates are left to the merge
    4
    >>> sync_quantizers(model)  # no other rank: estimates the ranges from this process's statistics
    0
    >>> all(fq.calibrated.item() for fq in model.modules() if isinstance(fq, FakeQuantize))
    True
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler

from lightning_quant.errors import RankFailedError
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.prepare import warn_degenerate_ranges

__all__ = [
    "all_ranks_succeed",
    "broadcast_state",
    "check_all_ranks",
    "rank_and_world",
    "shard_batches",
    "sync_quantizers",
]

_OPS = {"min": "MIN", "max": "MAX", "sum": "SUM"}


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` when ``torch.distributed`` is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _flag_device(group: Any) -> torch.device:
    """Where a collective's tensor must live: the current CUDA device for a NCCL-only group, else the CPU."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "cpu:" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_all_ranks(error: BaseException | None, step: str, *, group: Any = None) -> None:
    """Collective: every rank of ``group`` reports whether its local ``step`` succeeded; if any failed, all raise.

    Call it on every rank at the same point, after the local work and before the next collective, with the
    exception the local work raised (or None). It costs one all-reduce of a flag when every rank succeeded;
    on a failure the ranks also gather who failed and why (``all_gather_object``).

    Example (one process: nothing to agree with; an error is raised as itself):
        >>> check_all_ranks(None, "calibration")
        >>> check_all_ranks(ValueError("bad batch"), "calibration")
        Traceback (most recent call last):
        ...
        ValueError: bad batch

    Args:
        error: the exception this rank's local work raised, or None.
        step: what the ranks were doing, for the message (``"calibration"``).
        group: the process group (default: the whole world).

    Raises:
        RankFailedError: some rank passed an error. The message names every failing rank and its original
            ``ExceptionType: message``; on a failing rank it is chained to that rank's own exception.
        BaseException: outside ``torch.distributed`` (or with one process), ``error`` itself.
    """
    rank, world = rank_and_world(group)
    if world == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0.0 if error is None else 1.0], device=_flag_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item() == 0:
        return
    mine = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    failures = {r: msg for r, msg in enumerate(gathered) if msg is not None}
    ranks = ", ".join(map(str, failures))
    detail = "; ".join(msg if len(failures) == 1 else f"rank {r}: {msg}" for r, msg in failures.items())
    message = (
        f"{step} failed on rank{'s' if len(failures) > 1 else ''} {ranks} of {world}: {detail}. Every rank stops "
        f"here instead of waiting in a collective; fix the cause on rank {next(iter(failures))} (its data shard, "
        "transform_fn or batch) and rerun."
    )
    if error is not None:
        raise RankFailedError(message, failures=failures, step=step) from error
    raise RankFailedError(message, failures=failures, step=step)


@contextlib.contextmanager
def all_ranks_succeed(step: str, *, group: Any = None) -> Iterator[None]:
    """Run this rank's local work, then agree with every rank of ``group`` that it succeeded (a collective).

    Put the local work that precedes a collective inside the block, on every rank: an exception on any rank
    then raises :class:`~lightning_quant.errors.RankFailedError` on all of them (see :func:`check_all_ranks`)
    instead of leaving the others blocked in the next collective. Only ``Exception`` subclasses are caught
    (``KeyboardInterrupt`` ends the process). With one process the block behaves as if it were not there.

    Example:
        >>> with all_ranks_succeed("calibration"):
        ...     total = sum(range(4))
        >>> total
        6

    Args:
        step: what the ranks are doing, for the message.
        group: the process group (default: the whole world).

    Raises:
        RankFailedError: the block raised on this rank or on another one.
        Exception: with one process, whatever the block raised, as itself.
    """
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every failure must reach the other ranks
        check_all_ranks(err, step, group=group)
        raise
    check_all_ranks(None, step, group=group)


class _BatchShard(Sampler[list[int]]):
    """Batches ``rank, rank + world, ...`` of the first ``num_batches`` of a batch sampler."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int, num_batches: int | None) -> None:
        self.batches, self.rank, self.world, self.num_batches = batches, rank, world, num_batches

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(self.batches, self.rank, self.num_batches, self.world)

    def __len__(self) -> int:
        total = len(self.batches)  # type: ignore[arg-type]
        if self.num_batches is not None:
            total = min(total, self.num_batches)
        return len(range(self.rank, total, self.world))


def shard_batches(
    data: Iterable[Any], num_batches: int | None = None, *, rank: int | None = None, world_size: int | None = None
) -> Iterable[Any]:
    """This rank's share of the first ``num_batches`` batches of ``data``: batches ``rank, rank + world, ...``.

    Every batch goes to exactly one rank, so the ranks together see exactly what one process would. A
    ``DataLoader`` is rebuilt with a sharded batch sampler, so a rank never loads another rank's batches; any
    other iterable is skipped through. The order of ``data`` must be the same on every rank (no shuffling, or
    a seeded generator; ``seed_everything`` makes Lightning's loaders so). A loader that is already sharded
    (its sampler is a ``DistributedSampler``, as Lightning makes for val/train loaders) is returned as is, cut
    to this rank's part of ``num_batches``.

    Args:
        data: the calibration batches (a DataLoader, list, generator...).
        num_batches: how many batches all ranks together use (all of ``data`` when None).
        rank, world_size: default to the current process group's.

    Raises:
        ValueError: ``num_batches`` < 1, or ``rank`` outside ``[0, world_size)``.
    """
    if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
        raise ValueError(f"num_batches={num_batches!r} must be >= 1 (or None for all of the data).")
    own_rank, own_world = rank_and_world()
    rank = own_rank if rank is None else rank
    world = own_world if world_size is None else world_size
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside [0, world_size={world}).")
    if world == 1:
        return data if num_batches is None else itertools.islice(data, num_batches)
    if isinstance(data, DataLoader) and isinstance(data.sampler, DistributedSampler):
        per_rank = None if num_batches is None else len(range(rank, num_batches, world))
        return data if per_rank is None else itertools.islice(data, per_rank)
    if (
        isinstance(data, DataLoader)
        and data.batch_sampler is not None
        and not isinstance(data.dataset, IterableDataset)
    ):
        return _rebuild(data, _BatchShard(data.batch_sampler, rank, world, num_batches))
    return itertools.islice(data, rank, num_batches, world)


def _rebuild(loader: DataLoader, batch_sampler: Sampler[list[int]]) -> DataLoader:
    """``loader`` with another batch sampler (same dataset, workers, collate and worker settings)."""
    extra: dict[str, Any] = {}
    if loader.num_workers > 0:
        extra = dict(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    return DataLoader(
        loader.dataset,
        batch_sampler=batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        **extra,
    )


_Buckets = dict[tuple[str, torch.dtype, torch.device], list[torch.Tensor]]


def _buckets(pairs: list[tuple[torch.Tensor, str]]) -> _Buckets:
    """Group ``(tensor, op)`` pairs by (op, dtype, device): one collective each (local work, no communication).

    Raises:
        ValueError: an op other than min, max or sum.
    """
    buckets: _Buckets = {}
    for tensor, op in pairs:
        if op not in _OPS:
            raise ValueError(f"unknown reduce op {op!r} from an observer's sync_tensors(); use min, max or sum.")
        buckets.setdefault((op, tensor.dtype, tensor.device), []).append(tensor)
    return buckets


def _all_reduce(buckets: _Buckets, group: Any) -> None:
    """All-reduce many small tensors in place with one collective per (op, dtype, device)."""
    for (op, _, _), tensors in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), str(kv[0][2]))):
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
        start = 0
        for t in tensors:
            t.copy_(flat[start : start + t.numel()].view_as(t))
            start += t.numel()


def sync_quantizers(model: nn.Module, *, group: Any = None, only_observing: bool = False) -> int:
    """Merge every quantizer's observer state across the ranks of ``group`` and refresh its qparams.

    Every rank must call this with the same model structure (collectives run in module order). Afterwards
    ``scale``/``zero_point``/``calibrated`` are identical on every rank. Call it after
    ``calibrate(model, shard_batches(...), shard=True)``, which leaves the range estimates to this merge.

    Args:
        model: a prepared model (any module holding lightning_quant fake-quant modules).
        group: the process group (default: the whole world).
        only_observing: merge only quantizers whose observer is switched on (QAT steps; a learnable or frozen
            scale is left alone). The flag must be the same on every rank.

    Returns:
        The number of quantizers merged (0 outside ``torch.distributed`` or with one process).

    Warns:
        UserWarning: (on the first rank, unless ``only_observing``) a merged activation range has zero width
            (all-zero or constant calibration data); see
            :func:`~lightning_quant.quantizers.prepare.warn_degenerate_ranges`.

    Raises:
        RankFailedError: the local part of the merge (an observer's ``sync_tensors``/``after_sync``, the qparams
            estimate) failed on some rank; raised on every rank (see :func:`check_all_ranks`).
        ValueError: with one process, an observer's ``sync_tensors`` named an unknown reduce op.
    """
    _, world = rank_and_world(group)
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantize)]
    if world == 1:  # nothing to merge; make the estimates calibrate(shard=True) left to this call
        for fq in quantizers:
            if fq._stale:
                fq.refresh_qparams()
        if not only_observing:
            _warn_degenerate(model, group)
        return 0
    if only_observing:
        quantizers = [fq for fq in quantizers if fq.observer_enabled.item()]
    step = "merging quantizer statistics across ranks"
    for phase in (0, 1):
        with all_ranks_succeed(step, group=group):  # the local work since the last collective, agreed on
            if phase:
                for fq in quantizers:
                    fq.observer.after_sync(phase - 1, world)
            buckets = _buckets([pair for fq in quantizers for pair in fq.observer.sync_tensors(phase)])
        _all_reduce(buckets, group)
    with all_ranks_succeed(step, group=group):
        for fq in quantizers:
            fq.observer.after_sync(1, world)
        for fq in quantizers:
            fq.refresh_qparams()
    if not only_observing:
        _warn_degenerate(model, group)
    return len(quantizers)


def _warn_degenerate(model: nn.Module, group: Any) -> None:
    """After a calibration merge: warn (once, on the first rank) about ranges of zero width."""
    if rank_and_world(group)[0] == 0:
        warn_degenerate_ranges(model, stacklevel=4)


def broadcast_state(model: nn.Module, *, src: int = 0, group: Any = None) -> None:
    """Copy every parameter and buffer of ``model`` from rank ``src`` to all ranks (after a per-rank refinement,
    e.g. bias correction, so that all ranks hold exactly the same weights). No-op outside distributed runs.

    Run the refinement inside :func:`all_ranks_succeed` first, so that a rank whose refinement failed does not
    leave the others waiting here."""
    _, world = rank_and_world(group)
    if world == 1:
        return
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor.data, src=src, group=group)
