"""Observer state merged across 2 gloo processes equals one process calibrating on the union of their data."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_quant.calibration import calibrate
from lightning_quant.config import QuantSpec, scheme_for_target
from lightning_quant.distributed import broadcast_state, shard_batches, sync_quantizers
from lightning_quant.quantizers import iter_quantizers, prepare
from lightning_quant.quantizers.fake_quant import FakeQuantize

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches(n: int = 7, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # each batch a different scale, so every rank's share has its own range and histogram window
    return [torch.randn(4, 3, 8, 8, generator=g) * (1 + i) + i * 0.3 for i in range(n)]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 5)).eval()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


CASES = [("minmax", "x86", 7), ("percentile", "x86", 7), ("entropy", "x86", 7), ("mse", "x86", 7),
         ("dpu_pot", "dpu", 7), ("minmax", "x86", 1), ("mean_minmax", "x86", 7)]  # fmt: skip


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        for observer, target, n in CASES:
            model = prepare(net(), scheme_for_target(target, activation_observer=observer))
            calibrate(model, shard_batches(batches(n), n), progress=False, shard=True)  # n=1: rank 1 has none
            sync_quantizers(model)
            if rank == 1:  # a refinement that differs per rank, undone by broadcasting rank 0's state
                with torch.no_grad():
                    next(model.parameters()).add_(1.0)
            broadcast_state(model)
            torch.save(state_of(model), Path(out) / f"{observer}-{target}-{n}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One 2-process gloo run that calibrates every case; each rank saves its merged state."""
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return out


def ranks_of(out: Path, observer: str, target: str = "x86", n: int = 7) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / f"{observer}-{target}-{n}-rank{r}.pt") for r in range(WORLD)]


def single_process(observer: str, target: str = "x86", n: int = 7) -> nn.Module:
    model = prepare(net(), scheme_for_target(target, activation_observer=observer))
    # the same batches in the order the ranks saw them: rank 0's share, then rank 1's (min/max do not care)
    order = [b for r in range(WORLD) for b in shard_batches(batches(n), n, rank=r, world_size=WORLD)]
    calibrate(model, order, progress=False)
    return model


@pytest.mark.parametrize("observer", ["minmax", "percentile", "entropy", "mse"])
def test_merged_state_is_identical_on_ranks_and_matches_one_process(two_ranks, observer):
    ranks = ranks_of(two_ranks, observer)
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # bit-identical on every rank
    single = single_process(observer)
    merged = prepare(net(), scheme_for_target("x86", activation_observer=observer))
    merged.load_state_dict(ranks[0])
    for (name, fq), (_, ref) in zip(iter_quantizers(merged), iter_quantizers(single), strict=True):
        # the range is exactly the union's (MIN/MAX all-reduce)
        assert torch.equal(fq.observer.min_val, ref.observer.min_val), name
        assert torch.equal(fq.observer.max_val, ref.observer.max_val), name
        if observer == "minmax":
            assert torch.equal(fq.scale, ref.scale) and torch.equal(fq.zero_point, ref.zero_point), name
        elif not fq.spec.per_channel:
            # histograms: the merged counts are exactly the single-process counts on the merged (coarser or
            # equal) power-of-two grid; the estimate is then within a bin or two of the single-process one
            width = fq.observer.bin_width.item()
            ratio = width / ref.observer.bin_width.item()
            assert ratio >= 1 and ratio == 2 ** round(torch.log2(torch.tensor(ratio)).item()), name
            ref.observer._regrid(width, int(fq.observer.bin_offset.item()))
            assert torch.equal(fq.observer.histogram, ref.observer.histogram), name
            assert fq.scale.item() == pytest.approx(ref.scale.item(), rel=0.05, abs=2 * width / 255), name


def test_mean_minmax_merges_into_the_sample_weighted_mean(two_ranks):
    ranks = ranks_of(two_ranks, "mean_minmax")
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    merged = prepare(net(), scheme_for_target("x86", activation_observer="mean_minmax"))
    merged.load_state_dict(ranks[0])
    single = single_process("mean_minmax")
    pairs = zip(iter_quantizers(merged), iter_quantizers(single), strict=True)
    activations = [(n, fq, ref) for (n, fq), (_, ref) in pairs if not fq.spec.per_channel]
    assert activations
    counts = {name: fq.observer.samples.item() for name, fq, _ in activations}
    # 28 samples in all, 12 of them on rank 1: a mean, not a max; the 5 logits of a sample are too few values
    # for per-sample extremes, so that quantizer counts its 7 calls instead (MIN_SAMPLE_VALUES)
    assert sorted(set(counts.values())) == [7, 28], counts
    for name, fq, ref in activations:
        assert fq.observer.samples.item() == ref.observer.samples.item(), name
        torch.testing.assert_close(fq.observer.min_val, ref.observer.min_val, msg=name)
        torch.testing.assert_close(fq.observer.max_val, ref.observer.max_val, msg=name)


def test_dpu_votes_are_summed(two_ranks):
    ranks = ranks_of(two_ranks, "dpu_pot", target="dpu")
    single = single_process("dpu_pot", target="dpu")
    merged = prepare(net(), scheme_for_target("dpu"))
    merged.load_state_dict(ranks[0])
    for (name, fq), (_, ref) in zip(iter_quantizers(merged), iter_quantizers(single), strict=True):
        if hasattr(ref.observer, "pos_counts"):
            assert torch.equal(fq.observer.pos_counts, ref.observer.pos_counts), name
        assert torch.equal(fq.scale, ref.scale), name


def test_a_rank_without_batches_still_merges(two_ranks):
    ranks = ranks_of(two_ranks, "minmax", n=1)  # one batch: rank 1's share is empty
    single = single_process("minmax", n=1)
    for key, value in state_of(single).items():
        assert torch.equal(ranks[1][key], value), key


def test_moving_average_is_the_mean_of_the_ranks():
    spec = QuantSpec(observer="moving_average")
    fqs = [FakeQuantize(spec) for _ in range(WORLD)]
    fqs[0](torch.tensor([-1.0, 3.0]))
    fqs[1](torch.tensor([-3.0, 5.0]))
    pairs = [fq.observer.sync_tensors(0) for fq in fqs]
    for i in range(len(pairs[0])):  # what a SUM all-reduce does
        total = sum(p[i][0] for p in pairs)
        for p in pairs:
            p[i][0].copy_(total)
    for fq in fqs:
        fq.observer.after_sync(0, WORLD)
        assert fq.observer.min_val.item() == -2.0 and fq.observer.max_val.item() == 4.0


class Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.arange(10.0))


def test_shard_batches_partitions_the_first_num_batches():
    data = list(range(10))
    shares = [list(shard_batches(data, 7, rank=r, world_size=3)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    loader = DataLoader(TensorDataset(torch.arange(20.0)), batch_size=3)
    parts = [shard_batches(loader, 5, rank=r, world_size=2) for r in range(2)]
    assert [len(p) for p in parts] == [3, 2]
    seen = sorted(v for p in parts for (b,) in p for v in b.tolist())
    assert seen == [float(v) for v in range(15)]  # each sample of the first 5 batches exactly once
    assert list(shard_batches(data, 4)) == [0, 1, 2, 3]  # one process: the first num_batches
    stream = DataLoader(Stream(), batch_size=2)  # an IterableDataset loader cannot take a batch sampler
    assert [b.tolist() for b in shard_batches(stream, 3, rank=1, world_size=2)] == [[2.0, 3.0]]
    with pytest.raises(ValueError, match="outside"):
        shard_batches(data, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_batches"):
        shard_batches(data, 0)


def test_single_process_sync_is_a_no_op():
    model = prepare(net(), scheme_for_target("x86"))
    calibrate(model, batches(2), progress=False)
    before = state_of(model)
    assert sync_quantizers(model) == 0
    broadcast_state(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
