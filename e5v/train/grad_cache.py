"""GradCache: the gradients of a large contrastive batch at the memory cost of one chunk.

1. encode every chunk WITHOUT grad (remembering the RNG state before each),
2. take the loss on the whole batch of embeddings and its gradient w.r.t. those embeddings,
3. re-encode each chunk WITH grad from the same RNG state (same dropout masks) and back-propagate
   ``sum(embedding * cached_gradient)``, whose parameter gradient is the chunk's share of the
   full-batch gradient.

Engine-agnostic: ``backward`` is ``loss.backward`` or DeepSpeed's ``engine.backward`` (plus
``engine.step`` for its micro-step bookkeeping), so it works under ZeRO and with LoRA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from e5v.train.checkpoint import rng_state, set_rng_state


def grad_cache_step(
    encode: Callable[[Any], torch.Tensor],
    chunks: Sequence[Any],
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    backward: Callable[[torch.Tensor, bool], None],
    check: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run one GradCache step.

    Args:
        encode: chunk -> embeddings (k, b, d) (k = anchor/positive/negative groups).
        chunks: the local batch split into chunks.
        loss_fn: embeddings of the whole local batch (k, n, d) -> (loss, accuracy).
        backward: (surrogate, is_last_chunk) -> None; back-propagates a chunk's surrogate.
        check: called on the loss before any backward (e.g. stop on NaN).

    Returns:
        (loss, accuracy, replay_error): replay_error is the largest |embedding| difference between the
        no-grad pass and the re-run; 0 when the replay is exact.
    """
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(rng_state())
            cached.append(encode(chunk))
    reps = torch.cat(cached, dim=1).detach().requires_grad_(True)  # (k, n, d)
    loss, acc = loss_fn(reps)
    if check is not None:
        check(loss)
    loss.backward()
    grads = reps.grad  # (k, n, d)
    replay_error, start = 0.0, 0
    for i, chunk in enumerate(chunks):
        set_rng_state(states[i])  # the replay sees the same dropout masks as the no-grad pass
        r = encode(chunk)
        b = r.shape[1]
        replay_error = max(replay_error, (r.detach() - cached[i]).abs().max().item())
        backward((r * grads[:, start : start + b]).sum(), i == len(chunks) - 1)
        start += b
    return loss.detach(), acc, replay_error
