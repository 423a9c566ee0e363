"""Exceptions raised by lightning_quant; each message names the cause and the fix."""

from __future__ import annotations

__all__ = ["CheckpointMismatchError", "NotCalibratedError", "NothingToQuantizeError", "RankFailedError"]


class NotCalibratedError(RuntimeError):
    """A quantized model was converted or exported before its quantizers saw any data."""


class NothingToQuantizeError(ValueError):
    """The model holds no layer this library can quantize."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint or quantization state does not belong to this model or configuration."""


class RankFailedError(RuntimeError):
    """A distributed step failed on one or more ranks; raised on every rank so that none waits in a collective.

    Attributes:
        failures: ``{rank: "ExceptionType: message"}`` of every rank that failed.
        step: what the ranks were doing (``"calibration"``, ``"QAT range sync"``...).
    """

    def __init__(self, message: str, *, failures: dict[int, str], step: str) -> None:
        super().__init__(message)
        self.failures = failures
        self.step = step

    def __reduce__(self):  # picklable with its keyword-only fields (spawned processes send exceptions back)
        return _rebuild_rank_failed, (str(self), self.failures, self.step)


def _rebuild_rank_failed(message: str, failures: dict[int, str], step: str) -> RankFailedError:
    return RankFailedError(message, failures=failures, step=step)
