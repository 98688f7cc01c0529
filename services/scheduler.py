"""The scheduling policy: which waiting prompts are admitted, how prefill chunks are packed under a token budget, and
which decode sequences run together.

Pure decisions over plain numbers and the sequences' own fields: no torch, no Redis, no gRPC. The callers do the
work these decisions ask for (allocating blocks, building `SeqChunk`s, running the model, talking to Redis):
- `services/model/engine.py` (the offline engine behind `kvrelay run`) and `services/prefill/server.py` (the prefill
  worker, also inside the colocated worker) pack their prefill passes with `pack_prefill`, so both cut the same
  chunks from the same queue;
- the prefill worker admits prompts with `Admission`, `fits_context`, `queue_full` and `reusable_prefix`;
- `services/decode/step_loop.py` asks `keeps_batch`, `to_retire` and `preemption_victim` who runs in the next step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from kvstore.block_table import blocks_needed

if TYPE_CHECKING:
    from kvrelay.sampling import SamplingParams

# Prompts waiting for KV blocks in one prefill worker; beyond this a request is refused at once (RESOURCE_EXHAUSTED).
MAX_WAITING = 256

# -- admission -------------------------------------------------------------------------------------------------------


def fits_context(num_tokens: int, max_model_len: int) -> bool:
    """A prompt is served when it is not empty and leaves room in the context for at least one generated token."""
    return 0 < num_tokens < max_model_len


def queue_full(num_waiting: int) -> bool:
    """Whether a new prompt is refused because MAX_WAITING prompts already wait for blocks."""
    return num_waiting >= MAX_WAITING


@dataclass(frozen=True)
class Admission:
    """How the prefill worker admits waiting prompts: oldest first, each with every block its whole prompt needs at
    once (so its chunks never stall on the pool half-way through)."""

    block_size: int
    num_blocks: int  # the whole pool
    block_wait_s: float  # how long a prompt may wait for blocks before it is refused

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_needed(num_tokens, self.block_size)

    def never_fits(self, blocks: int) -> bool:
        """More than the whole pool: refuse now, not after waiting block_wait_s for blocks that can never come."""
        return blocks > self.num_blocks

    def keeps_waiting(self, waited_s: float) -> bool:
        """After an allocation found too few free blocks: wait for sequences to return some, or refuse."""
        return waited_s <= self.block_wait_s


def reusable_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """Prompt tokens whose K/V an earlier turn left in the session's blocks: the longest common prefix of the tokens
    those blocks hold and the new prompt, short of the prompt's last token (it is always computed: its logits sample
    the first token)."""
    reuse, limit = 0, min(len(cached), len(prompt) - 1)
    while reuse < limit and cached[reuse] == prompt[reuse]:
        reuse += 1
    return reuse


# -- chunked-prefill packing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptProgress:
    """A queued prompt as the packer sees it."""

    num_tokens: int  # the whole prompt
    progress: int  # prompt tokens whose K/V are in the pool already: a cached prefix, then the chunks computed so far


@dataclass(frozen=True)
class PrefillChunk:
    """One prompt's part of a forward pass: prompt positions [start, end) are computed over the `start` before them."""

    index: int  # the prompt's position in the queue given to pack_prefill
    start: int
    end: int
    last: bool  # it completes the prompt: the logits of its last token sample the first generated token

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def pack_prefill(queue: Sequence[PromptProgress], max_batch_tokens: int) -> list[PrefillChunk]:
    """The chunks of the next prefill forward pass, at most max_batch_tokens new tokens in all.

    Prompts go in queue order, each taking what is left of its prompt or of the budget, whichever is less; the pass
    ends when the budget is spent. So the prompt cut off at the end of one pass opens the next (the caller keeps
    unfinished prompts in their order), and over successive passes the queue's remaining tokens are cut into
    consecutive windows of max_batch_tokens: a prompt longer than the budget is prefilled chunk by chunk over its
    cached prefix, and short prompts share a pass.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
    chunks: list[PrefillChunk] = []
    used = 0
    for index, prompt in enumerate(queue):
        if used >= max_batch_tokens:
            break
        if not 0 <= prompt.progress < prompt.num_tokens:
            raise ValueError(f"queued prompt {index} has no tokens left: {prompt.progress} of {prompt.num_tokens} done")
        take = min(prompt.num_tokens - prompt.progress, max_batch_tokens - used)
        end = prompt.progress + take
        chunks.append(PrefillChunk(index, prompt.progress, end, end == prompt.num_tokens))
        used += take
    return chunks


# -- decode batch membership -----------------------------------------------------------------------------------------


class DecodeSeq(Protocol):
    """What the membership rules read of a running decode sequence (services/decode/step_loop.py's RunningSeq)."""

    params: SamplingParams
    history: list[int]  # prompt + generated; the last token is not in the pool yet
    # tokens whose K/V are in the pool: len(history) - 1, except for a resumed sequence catching up (the tokens its
    # dead worker had streamed but not recorded, written one step each before it samples again)
    num_cached: int
    num_generated: int
    cancelled: bool
    received: float  # when its Decode call arrived (perf_counter)


def catching_up(seq: DecodeSeq) -> bool:
    """Whether the step in flight (or the next) writes a token the host already has instead of sampling one."""
    return seq.num_cached < len(seq.history) - 1


S = TypeVar("S", bound=DecodeSeq)


def ends_by_length(seq: DecodeSeq, max_model_len: int) -> bool:
    """Whether the token the step in flight samples for `seq` ends it by length (max_tokens or the context): known
    before that token is read, so no step is queued for a row that would be computed for nothing."""
    return seq.num_generated + 1 >= seq.params.max_tokens or len(seq.history) + 1 >= max_model_len


def keeps_batch(queued: Sequence[S], running: Sequence[S], max_model_len: int) -> bool:
    """Whether the step after `queued` may run the same sequences in the same order, on `queued`'s sampled ids still
    on the device (the overlap).

    Not when a sequence joined or left, is cancelled, uses the repetition penalty (the sampler reads its whole
    history on the host), is catching up (its next input is a known token, not the one sampled) or ends by length at
    `queued`. The caller must still find each sequence its next block.
    """
    if len(queued) != len(running):
        return False
    for seq, now in zip(queued, running, strict=True):
        if seq is not now or seq.cancelled or seq.params.repetition_penalty != 1.0 or catching_up(seq):
            return False
        if ends_by_length(seq, max_model_len):
            return False
    return True


def to_retire(running: Sequence[S], queued: Sequence[S]) -> list[S]:
    """Cancelled sequences that leave the batch now: those no queued step still writes into (the others leave once
    that step completes)."""
    return [seq for seq in running if seq.cancelled and seq not in queued]


def preemption_victim(paused: Sequence[S]) -> S:
    """No sequence could get the block its next step needs, so none will return any: give up the newest one (its
    blocks let the older, further along, go on)."""
    return max(paused, key=lambda seq: seq.received)
