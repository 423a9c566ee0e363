"""A failure on one rank fails every rank at once, naming the rank and its message; no rank waits in a collective.

Each scenario runs in one 2-process gloo run. A worker records what it raised, then stays alive until every rank
has recorded its result (as a notebook or a framework's teardown keeps a failed process alive), so a rank left
in a collective shows up as a run that does not finish, not as a peer's broken connection.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from lightning_quant import QuantCallback
from lightning_quant.calibration import calibrate
from lightning_quant.config import scheme_for_target
from lightning_quant.distributed import (
    all_ranks_succeed,
    broadcast_state,
    check_all_ranks,
    shard_batches,
    sync_quantizers,
)
from lightning_quant.errors import RankFailedError
from lightning_quant.quantizers import iter_quantizers, prepare
from tests.distributed.test_ddp_trainer import CalibDataModule, ddp_trainer, lit
from tests.distributed.test_sync_observers import WORLD, batches, free_port, net

BOUND_S = 60  # the whole 2-process run; before the fix rank 0 sat in an all-reduce until the 120 s timeout


def _nan_in_rank1_shard() -> list[torch.Tensor]:
    data = batches(6)
    data[3][0, 0, 0, 0] = float("nan")  # batches 1, 3, 5 are rank 1's share
    return data


def _calibration(rank: int) -> None:
    model = prepare(net(), scheme_for_target("x86"))
    calibrate(model, shard_batches(_nan_in_rank1_shard(), 6), progress=False, shard=True)
    sync_quantizers(model)


def _refinement(rank: int) -> None:
    model = prepare(net(), scheme_for_target("x86"))
    calibrate(model, shard_batches(batches(6), 6), progress=False, shard=True)
    sync_quantizers(model)
    with all_ranks_succeed("post-calibration refinement"):
        if rank == 1:
            raise KeyError("bias correction lost its float reference")
    broadcast_state(model)


def _qat_sync(rank: int) -> None:
    model = prepare(net(), scheme_for_target("x86"))
    calibrate(model, shard_batches(batches(6), 6), progress=False, shard=True)
    sync_quantizers(model)
    if rank == 1:  # an observer whose state cannot be merged on this rank only
        observer = next(fq for _, fq in iter_quantizers(model)).observer

        def broken(phase: int):
            raise RuntimeError("observer state is corrupted")

        observer.sync_tensors = broken
    sync_quantizers(model, only_observing=False)


def _both_fail(rank: int) -> None:
    with all_ranks_succeed("post-calibration refinement"):
        raise ValueError(f"rank {rank} broke")


SCENARIOS = {"calibration": _calibration, "refinement": _refinement, "qat_sync": _qat_sync, "both": _both_fail}


def _worker(rank: int, port: int, out: str, scenario: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    record: dict[str, str | None] = {"type": None, "message": None, "cause": None}
    try:
        SCENARIOS[scenario](rank)
    except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
        cause = err.__cause__
        record = {"type": type(err).__name__, "message": str(err), "cause": cause and type(cause).__name__}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    deadline = time.monotonic() + 2 * BOUND_S  # stay alive until every rank has recorded its result
    while time.monotonic() < deadline and not all((Path(out) / f"rank{r}.json").exists() for r in range(WORLD)):
        time.sleep(0.1)
    dist.destroy_process_group()


def _run(scenario: str, out: Path) -> tuple[float, list[dict]]:
    start = time.monotonic()
    ctx = mp.start_processes(
        _worker, args=(free_port(), str(out), scenario), nprocs=WORLD, start_method="spawn", join=False
    )
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() - start > BOUND_S:
                done = sorted(p.name for p in out.iterdir())
                pytest.fail(f"{scenario}: the ranks did not finish within {BOUND_S} s (results written: {done})")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.terminate()
    return time.monotonic() - start, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_nan_in_one_ranks_calibration_shard_fails_every_rank_within_seconds(tmp_path):
    elapsed, (rank0, rank1) = _run("calibration", tmp_path)
    assert elapsed < BOUND_S
    assert rank0["type"] == rank1["type"] == "RankFailedError"
    assert rank0["message"] == rank1["message"]
    assert rank0["message"].startswith("calibration failed on rank 1 of 2: FloatingPointError: ")
    assert "NaN" in rank0["message"] and "at quantizer 'input_1'" in rank0["message"]  # the original message
    assert rank1["cause"] == "FloatingPointError" and rank0["cause"] is None  # chained on the failing rank


@pytest.mark.parametrize(
    ("scenario", "step", "original"),
    [
        ("refinement", "post-calibration refinement", "KeyError: 'bias correction lost its float reference'"),
        ("qat_sync", "merging quantizer statistics across ranks", "RuntimeError: observer state is corrupted"),
    ],
)
def test_refinement_and_range_sync_failures_on_one_rank_fail_every_rank(tmp_path, scenario, step, original):
    elapsed, (rank0, rank1) = _run(scenario, tmp_path)
    assert elapsed < BOUND_S
    for record in (rank0, rank1):
        assert record["type"] == "RankFailedError"
        assert record["message"].startswith(f"{step} failed on rank 1 of 2: {original}")
    assert rank1["cause"] == original.split(":")[0]


def test_failures_on_several_ranks_are_all_named(tmp_path):
    _, records = _run("both", tmp_path)
    for record in records:
        assert record["message"].startswith(
            "post-calibration refinement failed on ranks 0, 1 of 2: rank 0: ValueError: rank 0 broke; "
            "rank 1: ValueError: rank 1 broke."
        )
        assert record["cause"] == "ValueError"  # each rank chains its own error


def test_single_process_raises_the_original_error():
    with pytest.raises(KeyError, match="only this rank"), all_ranks_succeed("calibration"):
        raise KeyError("only this rank")
    with pytest.raises(FloatingPointError, match="NaN"):
        check_all_ranks(FloatingPointError("NaN"), "calibration")
    check_all_ranks(None, "calibration")  # nothing failed: nothing raised


def test_rank_failed_error_keeps_its_fields_through_pickling():
    import pickle

    err = RankFailedError("calibration failed on rank 1 of 2: ...", failures={1: "ValueError: x"}, step="calibration")
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.failures, copy.step) == (str(err), {1: "ValueError: x"}, "calibration")


class NaNShardDataModule(CalibDataModule):
    """Calibration batch 1 (rank 1's share under DDP) holds a NaN image; the other batches are fine."""

    def calibration_dataloader(self) -> DataLoader:
        loader = super().calibration_dataloader()
        loader.dataset.tensors[0][8] = float("nan")
        return loader


def test_quant_callback_under_lightning_ddp_fails_every_rank_on_a_nan_shard(tmp_path):
    # before: rank 1's FloatingPointError alone, with rank 0 left in the merge's all-reduce
    quant = QuantCallback(mode="ptq", calibration_batches=4, progress=False, report=False)
    trainer = ddp_trainer(tmp_path, [quant], enable_checkpointing=False)
    start = time.monotonic()
    with pytest.raises(Exception, match=r"RankFailedError: calibration failed on rank 1 of 2: FloatingPointError: NaN"):
        trainer.validate(lit(), datamodule=NaNShardDataModule(4), verbose=False)
    assert time.monotonic() - start < BOUND_S
