"""Between the protos and the runtime's dataclasses (one place, so every service reads a message the same way)."""

from __future__ import annotations

from kvrelay.sampling import SamplingParams
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


def params_to_proto(p: SamplingParams) -> common_pb2.WorkerRequestSampling:
    msg = common_pb2.WorkerRequestSampling(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        max_tokens=p.max_tokens,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def params_from_proto(msg: common_pb2.WorkerRequestSampling) -> SamplingParams:
    """Raises ValueError (-> INVALID_ARGUMENT) naming the bad field."""
    return SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )


def logprob_to_proto(out: SampleOutput, row: int) -> common_pb2.TokenLogprob | None:
    if out.logprobs[row] is None:
        return None
    top = [common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in (out.top_logprobs[row] or [])]
    return common_pb2.TokenLogprob(token_id=out.token_ids[row], logprob=out.logprobs[row], top=top)
