"""Knowledge distillation (Hinton et al., 2015): a student learns a teacher's next-token distributions.

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * next-token cross-entropy, where _T
is the softmax at temperature T over the shared vocabulary (T^2 keeps the term's gradients on the
cross-entropy's scale), averaged over the labelled positions of packed rows. The teacher (a local
checkpoint, `objective.teacher`) is loaded on the first training step, frozen, on the student's
device. Evaluation reports the student's own next-token loss (its perplexity), which needs no teacher.
Both models' full logits are formed (fine for the small vocabularies of distilled students; the
fused path of `causal_lm_loss` covers the plain loss only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.factory import ModelError, load_model
from lmforge.objectives.base import ObjectiveBase, token_cross_entropy, token_logits


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Mean over the `mask`ed positions of KL(softmax(teacher / T) || softmax(student / T)), in fp32."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


class Distillation(ObjectiveBase):
    name = "distill"
    head = "causal_lm"

    def __init__(self, cfg=None, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.teacher_path = cfg.teacher
        self.temperature, self.alpha = cfg.distill_temperature, cfg.distill_alpha
        self._teacher: nn.Module | None = None

    def teacher(self, device: torch.device, vocab_size: int) -> nn.Module:
        if self._teacher is None:
            teacher = load_model(self.teacher_path, "causal_lm")
            if teacher.get_output_embeddings().weight.shape[0] != vocab_size:
                raise ModelError(f"objective.teacher: {self.teacher_path} predicts {teacher.get_output_embeddings().weight.shape[0]} "
                                 f"tokens, the student {vocab_size}: distillation needs one vocabulary")
            self._teacher = teacher.to(device).eval().requires_grad_(False)
        return self._teacher

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        student = token_logits(model, batch)
        ce, count = token_cross_entropy(student, labels)
        if not (model.training and torch.is_grad_enabled()):  # evaluation: the student's own loss
            return ce, {"tokens": count}
        with torch.no_grad():
            teacher = token_logits(self.teacher(labels.device, student.shape[-1]), batch)
        kl = distillation_kl(student, teacher, labels != -100, self.temperature)
        return self.alpha * self.temperature**2 * kl + (1 - self.alpha) * ce, {"tokens": count}
