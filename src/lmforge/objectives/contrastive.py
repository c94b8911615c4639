"""Contrastive sentence embeddings (InfoNCE) with in-batch negatives.

Each batch holds B pairs (a_i, b_i); every b_j with j != i is a negative for a_i. The loss is the
cross-entropy of the scaled cosine-similarity matrix against its diagonal. Two data modes: paired
text (query / positive columns), or one text twice, where the two dropout masks make the two
views (SimCSE; the model needs dropout > 0). The temperature is fixed or learned (as log-scale).

Under data parallelism (torchrun) each rank embeds its slice of the pairs, then gathers every
rank's embeddings, so its rows meet the whole global batch's negatives (gradients flow back to the
rank that owns each row), and the learned temperature's gradient is averaged over ranks: the same
loss and gradients as one process on the whole batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import ObjectiveConfig
from lmforge.engine.distributed import mean_over_ranks
from lmforge.objectives.base import ObjectiveBase


class Contrastive(ObjectiveBase):
    name = "contrastive"
    head = "encoder"
    data_kind = "pairs"

    def __init__(self, cfg: ObjectiveConfig, tokenizer=None):
        self.cfg = cfg
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)),
                                        requires_grad=cfg.learn_temperature)
        if cfg.learn_temperature:  # not the model's, so DDP/FSDP do not average it
            self.logit_scale.register_hook(mean_over_ranks)

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.logit_scale] if self.cfg.learn_temperature else []

    def state_dict(self) -> dict:
        return {"logit_scale": float(self.logit_scale.detach())}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.logit_scale.fill_(state["logit_scale"])

    def save_alongside(self, directory: Path, model: nn.Module, seq_len: int) -> None:
        """Make the saved encoder a sentence-transformers folder: the pooling it was trained with (and
        the normalisation) are recorded, so `SentenceTransformer(folder)` embeds exactly as training did."""
        directory = Path(directory)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
        (directory / "modules.json").write_text(json.dumps(modules, indent=2))
        (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": seq_len, "do_lower_case": False}))
        (directory / "1_Pooling").mkdir(exist_ok=True)
        pooling = {"word_embedding_dimension": model.config.hidden_size,
                   "pooling_mode_cls_token": self.cfg.pooling == "cls", "pooling_mode_mean_tokens": self.cfg.pooling == "mean",
                   "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
                   "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True}
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
        (directory / "2_Normalize").mkdir(exist_ok=True)
        (directory / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine"}))

    def embed(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pooled_embedding(model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
                                attention_mask, self.cfg.pooling)

    def _embed_both(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sides' embeddings from one forward pass over their rows stacked (padded to one width):
        one bigger batch, and the single forward DDP expects per backward. SimCSE's two views of a text
        still get different dropout masks: they are different rows."""
        width = max(batch["input_ids"].shape[1], batch["input_ids_b"].shape[1])

        def padded(x: torch.Tensor) -> torch.Tensor:
            return nn.functional.pad(x, (0, width - x.shape[1]))  # pad id 0 under a zero mask: never attended

        ids = torch.cat([padded(batch["input_ids"]), padded(batch["input_ids_b"])])
        mask = torch.cat([padded(batch["attention_mask"]), padded(batch["attention_mask_b"])])
        both = self.embed(model, ids, mask)
        return both[: len(both) // 2], both[len(both) // 2 :]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a, b = self._embed_both(model, batch)
        scale = self.logit_scale.to(a.device).exp().clamp(max=100.0)  # CLIP's cap keeps it stable
        (all_a, all_b), first = _all_ranks(a, b)
        logits = scale * a @ all_b.T  # this rank's rows against every rank's positives
        labels = torch.arange(first, first + len(a), device=a.device)
        loss = nn.functional.cross_entropy(logits, labels)
        if self.cfg.symmetric:  # and this rank's positives against every rank's rows
            loss = (loss + nn.functional.cross_entropy(scale * b @ all_a.T, labels)) / 2
        correct = (logits.argmax(1) == labels).sum()
        return loss, {"tokens": torch.tensor(len(a)), "correct": correct}


def _data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_ranks(*local: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Each tensor's rows from every rank, in rank order (an autograd all-gather: gradients go back to
    the owner), and where this rank's rows start. Only while training: evaluation (no gradients)
    runs on one rank alone and must not wait for the others."""
    if not (_data_parallel() and torch.is_grad_enabled()):
        return list(local), 0
    from torch.distributed.nn.functional import all_gather

    return [torch.cat(all_gather(x)) for x in local], dist.get_rank() * len(local[0])  # equal slices per rank


def pooled_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Unit-length text embeddings from an encoder's last hidden states: the first token's (`cls`) or
    the mean over real tokens (`mean`)."""
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return nn.functional.normalize(pooled.float(), dim=-1)
