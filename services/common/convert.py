"""Between the worker protos and the model runtime's outputs (sampling parameters convert in kvrelay/sampling.py)."""

from __future__ import annotations

from kvrelay.v1 import common_pb2
from services.model.sampler import SampleOutput

FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop_string": common_pb2.FINISH_REASON_STOP_STRING,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
    "error": common_pb2.FINISH_REASON_ERROR,
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
}


def logprob_to_proto(out: SampleOutput, row: int) -> common_pb2.TokenLogprob | None:
    if out.logprobs[row] is None:
        return None
    top = [common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in (out.top_logprobs[row] or [])]
    return common_pb2.TokenLogprob(token_id=out.token_ids[row], logprob=out.logprobs[row], top=top)
