"""What an RL objective (grpo) optimises: the reward of each completion, a weighted sum of parts.

Built-in verifiable parts need no model: `exact_match` and `numeric_match` compare the completion with
the row's reference answer, `regex` checks a format. `function` calls the user's own Python
(`package.module:function`, TRL's calling convention, so a TRL reward function works unchanged) and
`model` scores with a reward-model folder trained by `objective.name: reward`. Every part is checked
when the run is built (the module imports, the function takes prompts and completions, the folder is a
one-score classifier), not at the first rollout, minutes into training.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.config import RewardConfig, RewardTermConfig

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".")


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators allowed), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def exact_match(completions: list[str], references: list[str]) -> list[float]:
    return [float(_normalise(c) == _normalise(r)) for c, r in zip(completions, references, strict=True)]


def numeric_match(completions: list[str], references: list[str]) -> list[float]:
    out = []
    for completion, reference in zip(completions, references, strict=True):
        got, want = last_number(completion), last_number(reference)
        out.append(float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)))
    return out


def regex_match(completions: list[str], pattern: re.Pattern) -> list[float]:
    return [float(pattern.fullmatch(c.strip()) is not None) for c in completions]


def _load_function(where: str, spec: str) -> Callable:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{where}: '{spec}' is not package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{where}: cannot import module '{module_name}' ({error})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{where}: module '{module_name}' has no function '{attribute}'")
    parameters = inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    missing = [n for n in ("prompts", "completions") if n not in parameters and not takes_any]
    if missing:
        raise ValueError(f"{where}: {spec} must take keyword arguments prompts and completions (and **kwargs for "
                         f"the rows' other columns); it has no {', '.join(missing)}")
    return function


class _RewardModelScore:
    """Scores prompt + completion with a reward-model folder (a one-output sequence classifier, or its
    LoRA adapter), the conversation rendered with the reward model's own chat template."""

    def __init__(self, where: str, path: str):
        from transformers import AutoTokenizer

        from lmforge.models.factory import load_model

        folder = Path(path)
        if not ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
            raise ValueError(f"{where}: {path} is not a model folder (no config.json); train one with objective.name: reward")
        # lmforge's loader: a LoRA reward model's folder (adapter + base/) comes merged, as a plain one
        self.model = load_model(folder, "classifier", report_missing=False).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{where}: {path} has {self.model.config.num_labels} outputs, not a reward model's one score")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    @torch.no_grad()
    def __call__(self, messages: list[list[dict]], completions: list[str]) -> list[float]:
        scores = []
        for conversation, completion in zip(messages, completions, strict=True):
            text = self.tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": completion}],
                                                      tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            scores.append(float(self.model(input_ids=ids).logits[0, 0]))
        return scores


class Reward:
    """The recipe's reward: `score(...)` gives each completion's total and each part's values."""

    def __init__(self, cfg: RewardConfig, reference_column: str):
        self.terms: list[tuple[str, RewardTermConfig, Callable]] = []
        for i, term in enumerate(cfg.terms):
            where = f"reward.terms[{i}]"
            self.terms.append((self._name(term, i), term, self._build(where, term, reference_column)))

    def _name(self, term: RewardTermConfig, i: int) -> str:
        taken = {name for name, _, _ in self.terms}
        name = term.function.rpartition(":")[2] if term.kind == "function" else term.kind
        return name if name not in taken else f"{name}_{i}"

    @staticmethod
    def _build(where: str, term: RewardTermConfig, reference_column: str) -> Callable:
        column = term.column or reference_column
        if term.kind in ("exact_match", "numeric_match"):
            compare = exact_match if term.kind == "exact_match" else numeric_match

            def match(prompts, completions, rows, messages):
                missing = [r.get("_where", "?") for r in rows if column not in r]
                if missing:
                    raise ValueError(f"{where}: {missing[0]} has no reference column '{column}' for {term.kind}")
                return compare(completions, [str(r[column]) for r in rows])
            return match
        if term.kind == "regex":
            try:
                pattern = re.compile(term.pattern, re.DOTALL)
            except re.error as error:
                raise ValueError(f"{where}.pattern: {error}") from None
            return lambda prompts, completions, rows, messages: regex_match(completions, pattern)
        if term.kind == "function":
            function = _load_function(f"{where}.function", term.function)

            def call(prompts, completions, rows, messages):
                columns = {k: [r.get(k) for r in rows] for k in rows[0] if not k.startswith("_")} if rows else {}
                columns.pop("prompts", None)
                columns.pop("completions", None)
                values = function(prompts=prompts, completions=completions, **columns)
                if values is None or len(values) != len(completions):
                    raise ValueError(f"{where}: {term.function} returned {type(values).__name__}"
                                     f"{'' if values is None else f' of {len(values)}'}, not one float per completion "
                                     f"({len(completions)})")
                return [float("nan") if v is None else float(v) for v in values]
            return call
        score = _RewardModelScore(f"{where}.path", term.path)
        return lambda prompts, completions, rows, messages: score(messages, completions)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.terms]

    def score(self, prompts: list[str], completions: list[str], rows: list[dict],
              messages: list[list[dict]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each completion's weighted total (a part that returns None counts 0 in it) and each part."""
        parts = {name: torch.tensor(fn(prompts, completions, rows, messages), dtype=torch.float32)
                 for name, _, fn in self.terms}
        total = torch.zeros(len(completions))
        for name, term, _ in self.terms:
            total += term.weight * parts[name].nan_to_num(0.0)
        return total, parts
