"""Continuous batching for a causal LM: many prompts decoded together with one KV cache.

The reference is the continuous batching of vLLM and TGI, on plain `transformers` models: rows of a
batch are left-padded to one length, a finished row leaves the batch at once (its cache rows are
dropped), and a waiting prompt joins as soon as a slot is free (its prompt is run through the model,
the prefill, and its cache is padded and stacked onto the running batch's). So a long answer never
holds back the short ones behind it, and the weights are read once per step for every row: on a CPU,
where decoding one row is bound by reading the weights, eight rows cost little more than one.

Each row keeps what makes it reproducible on its own: its seed (a generator per row, so a sampled
answer does not depend on what else was in the batch), its sampling settings, its stop strings and its
token budget. One row alone gives exactly what `transformers`' `generate` gives for the same seed
(greedy and sampling: the same logits warpers, the same multinomial draw); rows in a batch differ from
it only by the floating-point noise that padding brings to attention.

One thread owns a `BatchedGenerator` (the server's worker, or the caller of `run`); other threads may
only set `Request.cancelled`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lmforge.generation.cache import GrowingCache


@dataclass(eq=False)
class Request:
    """One prompt to continue. `on_text(piece)` receives the answer's text as it grows (text that could
    be the start of a stop string is held back until it is known not to be one); the fields below the
    line are the result, final once `done` is set."""

    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's option: the answer runs to max_new_tokens (fixed-length benchmarks)
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[], None] | None = None  # called once the result is final (from the engine's thread)
    cancelled: bool = False  # set by any thread: the row leaves the batch at the next step
    # ---- results
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _sent: int = 0
    _generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def supports(model: PreTrainedModel) -> bool:
    """Whether the engine can run `model`: a decoder whose forward takes a cache. peft's prefix tuning
    builds a cache of its own and is left to `generate`."""
    peft_type = getattr(getattr(model, "active_peft_config", None), "peft_type", None)
    return not getattr(model.config, "is_encoder_decoder", False) and str(peft_type) not in (
        "PREFIX_TUNING", "PeftType.PREFIX_TUNING", "P_TUNING", "PeftType.P_TUNING", "PROMPT_TUNING",
        "PeftType.PROMPT_TUNING")


class BatchedGenerator:
    """Decodes up to `max_batch` requests at once; `prefill_tokens` bounds the padded prompt tokens that
    join in one step (a long prompt still joins alone)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch: int = 16,
                 prefill_tokens: int = 4096):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_tokens = max(1, max_batch), max(1, prefill_tokens)
        self.device = next(model.parameters()).device
        self.eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.pad = pad if pad is not None else 0
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cached length): 1 where a row has a real token
        self._keep_arg: bool | None = None  # whether the model's forward takes logits_to_keep
        self._cache_arg = _cache_argument(model)
        self.steps = 0

    # ------------------------------------------------------------------ queue
    def submit(self, request: Request) -> None:
        if request.max_new_tokens < 1 or not request.ids:
            self._finish(request, "length")
            return
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def run(self, requests: Iterable[Request], progress: Callable[[int], None] | None = None) -> list[Request]:
        """Every request to its end; shorter prompts are admitted together (length-aware batching).
        `progress(n)` is told how many finished in each step."""
        requests = list(requests)
        for request in sorted(requests, key=lambda r: len(r.ids)):
            self.submit(request)
        while self.busy:
            finished = self.step()
            if progress is not None and finished:
                progress(len(finished))
        return requests

    def cancel_all(self, reason: str, error: str | None = None) -> None:
        for request in [*self.active, *self.waiting]:
            self._finish(request, reason, error)
        self.active, self.waiting, self.cache, self.mask = [], deque(), None, None

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Admit waiting prompts if a slot is free (their prefill gives each its first token), else one
        decoding step for every active row. Returns the requests that finished."""
        finished = self._drop([r for r in self.active if r.cancelled], "cancelled")
        while self.waiting and self.waiting[0].cancelled:
            request = self.waiting.popleft()
            self._finish(request, "cancelled")
            finished.append(request)
        group = self._admissible()
        if group:
            logits = self._prefill(group)
            rows = group
        elif self.active:
            logits = self._decode()
            rows = self.active
        else:
            return finished
        self.steps += 1
        tokens = self._sample(logits, rows)
        done = [r for r, token in zip(rows, tokens, strict=True) if self._advance(r, token)]
        return finished + self._drop(done, None)

    def _admissible(self) -> list[Request]:
        """The waiting prompts that join now: as many as slots allow, while padding them to one length wastes
        little (a prefill is bound by compute, so padded tokens cost as much as real ones)."""
        group: list[Request] = []
        longest = real = 0
        while self.waiting and len(self.active) + len(group) < self.max_batch:
            size = len(self.waiting[0].ids)
            padded = max(longest, size) * (len(group) + 1)
            if group and (padded > self.prefill_tokens or padded > 1.25 * (real + size) + 16):
                break
            group.append(self.waiting.popleft())
            longest, real = max(longest, size), real + size
        return group

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, self._cache_arg: cache,
                  "use_cache": True}
        if self._keep_arg is not False:
            try:
                out = self.model(**kwargs, logits_to_keep=1)
                self._keep_arg = True
                return out.logits[:, -1, :].float()
            except TypeError:
                self._keep_arg = False
        return self.model(**kwargs).logits[:, -1, :].float()

    def _prefill(self, group: list[Request]) -> torch.Tensor:
        length = max(len(r.ids) for r in group)
        ids = torch.full((len(group), length), self.pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(group), length), dtype=torch.long, device=self.device)
        for row, request in enumerate(group):
            ids[row, length - len(request.ids):] = torch.tensor(request.ids, device=self.device)
            mask[row, length - len(request.ids):] = 1
            request._generator = None if request.greedy else torch.Generator(self.device).manual_seed(request.seed)
        cache = GrowingCache()
        logits = self._forward(ids, mask, cache)
        self._merge(group, cache, mask)
        return logits

    def _merge(self, group: list[Request], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Stack the new rows' cache under the running batch's, the shorter one padded on the left."""
        if self.cache is None or not self.active:
            self.active, self.cache, self.mask = list(group), cache, mask
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)

        def pad(t: torch.Tensor, have: int) -> torch.Tensor:
            if have == width:
                return t
            shape = list(t.shape)
            shape[-2 if t.dim() == 4 else -1] = width - have
            return torch.cat([t.new_zeros(shape), t], dim=-2 if t.dim() == 4 else -1)

        layers = [(torch.cat([pad(a.keys, old_len), pad(b.keys, new_len)]),
                   torch.cat([pad(a.values, old_len), pad(b.values, new_len)]))
                  for a, b in zip(self.cache.layers, cache.layers, strict=True)]
        self.cache = GrowingCache(layers)
        self.mask = torch.cat([pad(self.mask, old_len), pad(mask, new_len)])
        self.active = self.active + list(group)

    def _decode(self) -> torch.Tensor:
        last = torch.tensor([[r.new_ids[-1]] for r in self.active], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.active), 1))], dim=1)
        return self._forward(last, self.mask, self.cache)

    def _sample(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        """transformers' sampling, row by row: the same warpers in the same order, one multinomial draw
        from the row's own generator; greedy rows take the argmax."""
        tokens = logits.argmax(-1).tolist()
        for i, request in enumerate(rows):
            if request.greedy:
                continue
            scores = logits[i:i + 1]
            if request.temperature != 1.0:
                scores = TemperatureLogitsWarper(request.temperature)(None, scores)
            if request.top_k:
                scores = TopKLogitsWarper(top_k=request.top_k)(None, scores)
            if request.top_p is not None and request.top_p < 1.0:
                scores = TopPLogitsWarper(top_p=request.top_p)(None, scores)
            probs = torch.softmax(scores, dim=-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=request._generator)[0, 0])
        return tokens

    # ------------------------------------------------------------------ a row's progress
    def _advance(self, request: Request, token: int) -> bool:
        """Append `token`; stream what is certain; True when the request is finished."""
        request.new_ids.append(token)
        if token == self.eos and not request.ignore_eos:
            self._finish(request, "stop")
            return True
        if request.stop_strings or request.on_text is not None:
            text = self.tokenizer.decode(request.new_ids, skip_special_tokens=True)
            cut = first_stop(text, request.stop_strings, max(0, len(request.text) - _longest(request.stop_strings)))
            if cut is not None:
                request.text = text[:cut]
                self._finish(request, "stop")
                return True
            request.text = text
            hold = max(_longest(request.stop_strings) - 1, 0)
            if text.endswith("\ufffd"):  # a character whose bytes are not all sampled yet
                hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
            self._emit(request, len(text) - hold)
        if len(request.new_ids) >= request.max_new_tokens:
            self._finish(request, "length")
            return True
        return False

    def _emit(self, request: Request, upto: int) -> None:
        if request.on_text is not None and upto > request._sent:
            request.on_text(request.text[request._sent:upto])
            request._sent = upto

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if request.done.is_set():
            return
        if reason in ("stop", "length") and not request.stop_strings:
            request.text = self.tokenizer.decode(request.new_ids, skip_special_tokens=True)
        if reason in ("stop", "length"):
            self._emit(request, len(request.text))
        request.finish_reason, request.error = reason, error
        request.done.set()
        if request.on_done is not None:
            request.on_done()

    def _drop(self, rows: list[Request], reason: str | None) -> list[Request]:
        """Take finished (or cancelled) rows out of the batch and its cache; the cache's columns no row
        uses any more are cut off."""
        if not rows:
            return []
        for request in rows:
            if reason is not None:
                self._finish(request, reason)
        gone = set(map(id, rows))
        keep = [i for i, r in enumerate(self.active) if id(r) not in gone]
        self.active = [self.active[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return rows
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        first = int(self.mask.any(0).nonzero()[0, 0])
        if first > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]
        return rows


def _cache_argument(model: PreTrainedModel) -> str:
    """`cache`, the name transformers 5.x gives the KV cache argument, or `past_key_values` where the
    model (or the one a peft wrapper holds) does not know it yet."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def _longest(stops: tuple[str, ...]) -> int:
    return max((len(s) for s in stops), default=0)


def first_stop(text: str, stops: Iterable[str], start: int = 0) -> int | None:
    """Where the first stop string begins in `text` (searching from `start`), or None."""
    found = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(found) if found else None


def generate_many(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[Request],
                  max_batch: int = 16, progress: Callable[[int], None] | None = None) -> list[Request]:
    """Every request answered, batched; models the engine cannot run go one by one through `generate`."""
    model.eval()
    if supports(model):
        return BatchedGenerator(model, tokenizer, max_batch).run(requests, progress)
    from lmforge.generation.hf import hf_generate_ids

    for request in requests:  # one by one: batched, peft's prompt learning without a cache ran slower still
        request.new_ids = [] if request.max_new_tokens < 1 else hf_generate_ids(
            model, tokenizer, request.ids, request.max_new_tokens, request.temperature, request.top_k, request.top_p,
            request.seed, None, list(request.stop_strings) or None, request.ignore_eos)
        text = tokenizer.decode(request.new_ids, skip_special_tokens=True)
        cut = first_stop(text, request.stop_strings)
        request.text = text if cut is None else text[:cut]
        ended = bool(request.new_ids) and request.new_ids[-1] == tokenizer.eos_token_id and not request.ignore_eos
        request.finish_reason = "stop" if ended or cut is not None else "length"
        if request.on_text is not None:
            request.on_text(request.text)
        request.done.set()
        if progress is not None:
            progress(1)
    return requests

