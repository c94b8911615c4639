"""What the loop needs from an objective: a head to train and a loss."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule


class Objective(Protocol):
    name: str
    head: str  # the model head it trains: "causal_lm", "masked_lm" or "seq2seq"

    def row_length(self, seq_len: int) -> int:
        """Raw tokens per packed row that produce model inputs of `seq_len` (span corruption shrinks rows)."""
        ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss (mean over target tokens) and counts: "tokens" (targets), optionally "correct"."""
        ...


class ObjectiveBase:
    """Defaults most objectives share: built from (cfg, tokenizer), trained on packed rows as long as
    the model's input. Objectives override what differs (span corruption's longer raw rows, ...)."""

    data_kind = "packed"
    # what its data handling does with an input longer than packing.seq_len (as `check` reports it)
    long_inputs = "split across packed rows"

    def __init__(self, cfg=None, tokenizer=None):
        self.cfg = cfg

    def row_length(self, seq_len: int) -> int:
        return seq_len


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the labelled positions, in fp32 whatever the autocast dtype; and their count."""
    flat = labels.reshape(-1)
    loss = nn.functional.cross_entropy(logits.reshape(flat.numel(), -1).float(), flat, ignore_index=ignore_index)
    return loss, (flat != ignore_index).sum()


# Families whose causal-LM head is exactly `lm_head(hidden)` (no logit scaling or soft-capping), so
# the loss can take the decoder's hidden states and the head's weight directly.
PLAIN_HEAD_FAMILIES = {"llama", "gpt2", "mistral", "qwen2", "qwen3"}
LOGITS_PER_CHUNK = 8 * 2**20  # fp32 logits alive at once in linear_cross_entropy (32 MB)


def _plain_decoder(model: nn.Module) -> nn.Module | None:
    """The model itself when its decoder and head can be called apart. Not through a DDP or compile
    wrapper, nor a sharded (FSDP) model: DDP only syncs gradients of what ran through its own
    forward, and FSDP gathers the embeddings and output layer only in the whole model's forward."""
    if isinstance(model, nn.parallel.DistributedDataParallel | FSDPModule) or hasattr(model, "_orig_mod"):
        return None
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return None  # peft puts the virtual tokens in front in its own forward
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_FAMILIES or not hasattr(model, "get_decoder"):
        return None
    if getattr(model.get_output_embeddings(), "bias", None) is not None:  # the fused path has no bias term
        return None
    return model


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` without materialising the (tokens x vocab) logits.

    Rows go through the output layer a chunk at a time; each chunk's gradient (softmax - one-hot) is
    turned into the hidden-state (and, if trained, weight) gradient at once and its logits are freed.
    Same FLOPs as the plain path, but the fp32 logits, their log-softmax and its gradient (three
    tokens x vocab tensors, 300 MB for 512 tokens of a 49k vocabulary) never exist together."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        valid = labels != -100
        count = valid.sum().clamp(min=1)
        row_weight = valid / count  # each labelled row's share of the mean
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        h_all, head = hidden.to(dtype), weight.to(dtype)  # once, not per chunk (copies only when dtypes differ)
        # One fp32 logits buffer for every chunk, worked on in place: fresh chunk-sized temporaries
        # (logsumexp's, the softmax's, the scaled gradient's) cost more in page faults than the
        # exp itself, and this layer is a fifth of a 135M model's step.
        buffer = torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h, y = h_all[start : start + chunk], labels[start : start + chunk].clamp(min=0)
                logits = buffer[: len(h)]
                _mm_into(logits, h, head.t())
                target_logit = logits.gather(1, y[:, None]).squeeze(1)
                row_max = logits.amax(dim=1, keepdim=True)
                sum_exp = logits.sub_(row_max).exp_().sum(dim=1)
                lse = row_max.squeeze(1) + sum_exp.log()
                share = row_weight[start : start + chunk]
                total += ((lse - target_logit) * share).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                grad = logits.mul_((share / sum_exp)[:, None])  # softmax times the row's share of the mean
                grad[torch.arange(len(y), device=y.device), y] -= share  # minus the one-hot
                grad = grad.to(dtype)
                if grad_hidden is not None:
                    _mm_into(grad_hidden[start : start + chunk], grad, head)
                if grad_weight is not None:
                    if dtype == weight.dtype:
                        grad_weight.addmm_(grad.t(), h)
                    else:
                        grad_weight += (grad.t() @ h).to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output if grad_hidden is not None else None,
                grad_weight * grad_output if grad_weight is not None else None, None, None)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, written in place when the dtypes allow (no product-sized temporary)."""
    if out.dtype == a.dtype == b.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`cross_entropy(hidden @ weight.T, labels, ignore_index=-100)` over (N, H) rows, chunked."""
    chunk = max(16, LOGITS_PER_CHUNK // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a decoder reads from a batch of pre-shifted rows: the ids, and position ids when documents are masked."""
    return {k: batch[k] for k in ("input_ids", "position_ids") if k in batch}


def token_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits at the batch's own positions (under prompt learning peft's output also
    covers its virtual tokens, in front of them)."""
    return model(**model_inputs(batch), use_cache=False).logits[:, -batch["labels"].shape[1]:]


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], labelled_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on pre-shifted `labels` (-100 = not learned), and the target count.

    For plain decoders the output layer and the loss are fused (`linear_cross_entropy`: no full
    logits tensor). With `labelled_only` (instruction tuning: prompts are not learned) only labelled
    positions go through the output layer at all: on short answers after long prompts most of the
    vocabulary-sized work disappears. Same loss and gradients as the plain path (tested)."""
    labels = batch["labels"]
    plain = _plain_decoder(model)
    if plain is None:
        return token_cross_entropy(token_logits(model, batch), labels)
    hidden = plain.get_decoder()(**model_inputs(batch), use_cache=False).last_hidden_state
    keep = labels != -100
    if labelled_only:
        hidden, labels = hidden[keep], labels[keep]
    head = plain.get_output_embeddings()
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels.reshape(-1))
    return loss, keep.sum()


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens (`labels` pre-shifted, -100 = not
    scored), in fp32: what preference objectives compare between answers and between models."""
    labels = batch["labels"]
    logits = token_logits(model, batch).float()
    # gather - logsumexp keeps only the logits for the backward pass (log_softmax would keep a second
    # tokens x vocabulary tensor)
    token_logps = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * (labels != -100)).sum(-1)
