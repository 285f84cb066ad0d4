"""The boundary wire format between stage k and k+1, and the runtime's error type.

Per message, each piece a gloo/nccl isend/irecv on a process group of just the two ranks: a
header of ``HEADER_LEN`` int64 (kind TRAIN/EVAL/END, step id, codec, activation shape and dtype,
codebook version, label shape, field table) followed by the payload fields and the labels.
After END the receiver answers one int64 ACK, so the sender knows its last messages were
consumed.  Every wait has a deadline; a closed connection or a passed deadline raises
:class:`StageRuntimeError` naming the peer stage.
"""

from __future__ import annotations

import datetime
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .transport import Payload

__all__ = ["StageRuntimeError", "HEADER_LEN", "HEADER_BYTES"]

HEADER_LEN = 32
HEADER_BYTES = HEADER_LEN * 8
KIND_TRAIN, KIND_EVAL, KIND_END = 1, 2, 3
_KIND_NAMES = {KIND_TRAIN: "train", KIND_EVAL: "eval", KIND_END: "end"}
_CODECS = ("none", "int8", "vq")
_FIELDS = ("x", "q", "scales", "codes", "codebook")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
           torch.int32, torch.int64, torch.bool)
_MAX_DIMS, _MAX_LABEL_DIMS, _MAX_FIELDS = 6, 3, 4
# Header slots.
_H_KIND, _H_STEP, _H_CODEC, _H_NDIM, _H_SHAPE, _H_DTYPE, _H_VERSION = 0, 1, 2, 3, 4, 10, 11
_H_LABEL_NDIM, _H_LABEL_SHAPE, _H_LABEL_DTYPE, _H_NFIELDS, _H_FIELDS = 12, 13, 16, 17, 18  # fields: 3 slots each



class StageRuntimeError(RuntimeError):
    """A stage process failed, died or hung; the message names the stage and the step.

    Raised by the launcher, it also carries ``pids`` (the stage processes, all stopped by then)
    and ``stalled_s``: seconds from the last progress of any stage to the raise, i.e. how long
    the failure took to detect and report.
    """

    pids: Tuple[int, ...] = ()
    stalled_s: float = float("nan")



# ------------------------------------------------------------------------------ wire messages
def _classify(error: BaseException, timeout_s: float) -> str:
    text = str(error)
    if "Timed out" in text or "timed out" in text or isinstance(error, TimeoutError):
        return f"timed out after {timeout_s:g} s (peer hung or too slow)"
    if "closed" in text or "reset" in text or "Broken pipe" in text or "refused" in text:
        return "connection closed (peer process died)"
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class _Link:
    """One boundary seen from one of its two ranks: framed messages with deadlines."""

    def __init__(self, me: str, peer: str, peer_rank: int, group: Any, timeout_s: float, device: torch.device) -> None:
        # me / peer: how messages name the two ranks ("stage 1", or "stage 1 replica 0" with replicas).
        self.me, self.peer, self.peer_rank, self.group = me, peer, peer_rank, group
        self.timeout_s, self.device = timeout_s, device
        self.timeout = datetime.timedelta(seconds=timeout_s)

    def _fail(self, action: str, step: int, error: BaseException) -> StageRuntimeError:
        return StageRuntimeError(f"{self.me}: {action} {self.peer} at step {step} failed: "
                                 f"{_classify(error, self.timeout_s)} [{self.peer} is the suspect]")

    def _send(self, tensors: Sequence[torch.Tensor], action: str, step: int) -> None:
        try:
            works = [dist.isend(t, self.peer_rank, group=self.group) for t in tensors]
            for work in works:
                work.wait(self.timeout)
        except RuntimeError as error:
            raise self._fail(action, step, error) from error

    def _recv(self, tensor: torch.Tensor, action: str, step: int) -> torch.Tensor:
        try:
            dist.irecv(tensor, self.peer_rank, group=self.group).wait(self.timeout)
        except RuntimeError as error:
            raise self._fail(action, step, error) from error
        return tensor

    def send(self, kind: int, step: int, payload: Optional[Payload], labels: Optional[torch.Tensor]) -> int:
        """Send one message; returns the bytes put on the wire (header included)."""
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[_H_KIND], header[_H_STEP] = kind, step
        tensors: List[torch.Tensor] = []
        if payload is not None:
            _check_fits(len(payload.shape) <= _MAX_DIMS, f"activation of {len(payload.shape)} dims")
            header[_H_CODEC] = _CODECS.index(payload.codec)
            header[_H_NDIM] = len(payload.shape)
            header[_H_SHAPE:_H_SHAPE + len(payload.shape)] = torch.tensor(payload.shape)
            header[_H_DTYPE] = _DTYPES.index(payload.dtype)
            header[_H_VERSION] = payload.codebook_version
            fields = [(name, t) for name, t in payload.fields.items()]
            _check_fits(len(fields) <= _MAX_FIELDS, f"{len(fields)} payload fields")
            header[_H_NFIELDS] = len(fields)
            for i, (name, t) in enumerate(fields):
                header[_H_FIELDS + 3 * i: _H_FIELDS + 3 * i + 3] = torch.tensor(
                    [_FIELDS.index(name), _DTYPES.index(t.dtype), t.numel()])
                tensors.append(t.contiguous().reshape(-1))
            _check_fits(labels.dim() <= _MAX_LABEL_DIMS, f"labels of {labels.dim()} dims")
            header[_H_LABEL_NDIM] = labels.dim()
            header[_H_LABEL_SHAPE:_H_LABEL_SHAPE + labels.dim()] = torch.tensor(labels.shape, dtype=torch.int64)
            header[_H_LABEL_DTYPE] = _DTYPES.index(labels.dtype)
            tensors.append(labels.contiguous().reshape(-1))
        tensors = [header.to(self.device)] + [t.to(self.device) for t in tensors]
        self._send(tensors, f"sending {_KIND_NAMES[kind]} message to", step)
        return sum(t.numel() * t.element_size() for t in tensors)

    def recv(self, expected_step: int, codebook_groups: int) -> Tuple[int, int, Optional[Payload], Optional[torch.Tensor], int]:
        """Receive one message: (kind, step id, payload, labels, wire bytes)."""
        header = self._recv(torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device),
                            "waiting for a message from", expected_step).cpu()
        kind, step = int(header[_H_KIND]), int(header[_H_STEP])
        if kind == KIND_END:
            return kind, step, None, None, HEADER_BYTES
        if kind not in (KIND_TRAIN, KIND_EVAL):
            raise StageRuntimeError(f"{self.me}: malformed message (kind {kind}) from {self.peer} "
                                    f"at step {expected_step}")
        shape = tuple(int(s) for s in header[_H_SHAPE:_H_SHAPE + int(header[_H_NDIM])])
        fields: Dict[str, torch.Tensor] = {}
        total = HEADER_BYTES
        for i in range(int(header[_H_NFIELDS])):
            name_index, dtype_index, numel = (int(v) for v in header[_H_FIELDS + 3 * i: _H_FIELDS + 3 * i + 3])
            name = _FIELDS[name_index]
            buffer = torch.empty(numel, dtype=_DTYPES[dtype_index], device=self.device)
            fields[name] = buffer
        label_shape = tuple(int(s) for s in header[_H_LABEL_SHAPE:_H_LABEL_SHAPE + int(header[_H_LABEL_NDIM])])
        labels = torch.empty(label_shape, dtype=_DTYPES[int(header[_H_LABEL_DTYPE])], device=self.device)
        for name, buffer in list(fields.items()) + [("labels", labels)]:
            flat = buffer.reshape(-1)
            self._recv(flat, f"receiving {_KIND_NAMES[kind]} payload from", step)
            total += flat.numel() * flat.element_size()
        for name in ("x", "q"):
            if name in fields:
                fields[name] = fields[name].reshape(shape)
        if "codebook" in fields:
            fields["codebook"] = fields["codebook"].reshape(-1, codebook_groups)
        payload = Payload(_CODECS[int(header[_H_CODEC])], fields, shape, _DTYPES[int(header[_H_DTYPE])],
                          int(header[_H_VERSION]))
        return kind, step, payload, labels, total

    def send_ack(self, step: int) -> None:
        self._send([torch.ones(1, dtype=torch.int64, device=self.device)], "acknowledging the end to", step)

    def recv_ack(self, step: int) -> None:
        self._recv(torch.zeros(1, dtype=torch.int64, device=self.device),
                   "waiting for the end-of-stream acknowledgement of", step)


def _check_fits(condition: bool, what: str) -> None:
    if not condition:
        raise StageRuntimeError(f"the stage runtime's message header cannot describe {what} "
                                f"(at most {_MAX_DIMS} activation dims, {_MAX_LABEL_DIMS} label dims, {_MAX_FIELDS} fields)")


