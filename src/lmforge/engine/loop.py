"""The training loop: one for every objective, method and strategy.

It knows an objective only by `objective.loss(model, batch) -> (loss, metrics)`, a method only by
the parameter groups it produced, and data only as "an iterator of batches starting at batch N".
Everything a run needs to continue exactly (weights, optimizer, scheduler, RNG, data position)
goes into each checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lmforge.config import TrainerConfig
from lmforge.data.prefetch import Prefetcher
from lmforge.engine import checkpoint as ckpt
from lmforge.engine.distributed import init_strategy
from lmforge.engine.metrics import MetricsLogger, NullMetrics
from lmforge.engine.optimizer import build_optimizer, lr_factor, warmup_steps_of
from lmforge.engine.runtime import autocast, checkpoint_activations, compile_for_training, resolve_precision


class TrainingDiverged(RuntimeError):
    pass


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0
    consecutive_bad: int = 0
    # early stopping: the best evaluation so far (its step and metrics) and evaluations since it
    best_step: int | None = None
    best_val: dict = field(default_factory=dict)
    evals_since_best: int = 0
    # wall seconds of training over every part of the run (a resumed run continues the count)
    seconds: float = 0.0


@dataclass
class TrainResult:
    state: TrainState
    total_steps: int
    train_loss: float | None
    val: dict = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    interrupted: bool = False
    checkpoint: Path | None = None
    first_eval: dict = field(default_factory=dict)
    full_weights: dict | None = None  # FSDP: the whole trained model's weights (rank 0), for saving it
    is_main: bool = True  # rank 0 (or the only process): the one that writes outputs
    mix_seen: dict = field(default_factory=dict)  # rows drawn from each source (mixtures only)
    parameters: int = 0  # the model's, and those the method trains (for reports)
    trainable: int = 0
    tokens: int = 0  # trained on
    peak_memory_mb: float = 0.0  # CUDA: peak allocated; CPU: peak resident set of the process
    precision: str = ""
    flops_per_token: float = 0.0  # training FLOPs (6N + attention), set by the caller that knows the row length
    best_step: int | None = None  # early stopping: the evaluation whose weights the model ends with
    stopped_early: bool = False


class EarlyStopping:
    """trainer.early_stopping: is this evaluation the best so far, and has the metric stopped improving?
    Its memory lives in TrainState, so a resumed run continues the count."""

    def __init__(self, cfg, state: TrainState):
        self.cfg, self.state = cfg, state

    def update(self, step: int, values: dict) -> tuple[bool, bool]:
        """(improved, stop now) after the evaluation at `step` (rank 0's values)."""
        metric = self.cfg.metric
        if metric not in values:
            known = ", ".join(k for k, v in values.items() if isinstance(v, (int, float))) or "none"
            raise ValueError(f"trainer.early_stopping.metric: '{metric}' is not among the held-out metrics this "
                             f"objective reports ({known})")
        value, best = float(values[metric]), self.state.best_val.get(metric)
        sign = 1.0 if self.cfg.mode == "min" else -1.0
        improved = best is None or sign * (best - value) > self.cfg.min_delta
        if improved:
            self.state.best_step, self.state.best_val, self.state.evals_since_best = step, dict(values), 0
        else:
            self.state.evals_since_best += 1
        return improved, self.state.evals_since_best >= self.cfg.patience


def resolve_total_steps(cfg: TrainerConfig, batches_per_epoch: int, tokens_per_batch: int) -> int:
    """Optimizer steps for the configured length (steps, tokens or epochs; one epoch by default)."""
    tokens_per_step = tokens_per_batch * cfg.grad_accum
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.max_tokens is not None:
        return max(1, math.ceil(cfg.max_tokens / tokens_per_step))
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    return max(1, math.ceil(epochs * batches_per_epoch / cfg.grad_accum))


class EvaluationStopped(KeyboardInterrupt):
    """A signal during an evaluation inside training: the evaluation is given up at once (a KeyboardInterrupt,
    so that no `except Exception` inside the evaluation swallows it), the step is checkpointed."""


class StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint at the next step boundary and exit. Inside `evaluating()`
    there is nothing to finish first: an evaluation can take minutes and changes no weight, so the signal
    stops it at once (EvaluationStopped) and the loop checkpoints the step it evaluated."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}
        self._evaluating = False

    @contextlib.contextmanager
    def evaluating(self, interruptible: bool = True):
        self._evaluating = interruptible
        try:
            yield
        finally:
            self._evaluating = False

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C means: stop now
            raise KeyboardInterrupt
        self.signal = signum
        name = signal.Signals(signum).name
        if self._evaluating:
            sys.stderr.write(f"\n{name}: stopping the evaluation now; the step is kept as a checkpoint for --resume\n")
            sys.stderr.flush()
            raise EvaluationStopped
        # said at once: a step can take minutes, and a silent Ctrl-C looks ignored
        sys.stderr.write(f"\n{name}: stopping after this step (a checkpoint is kept for --resume); Ctrl-C again to "
                         "stop now\n")
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class LogWindow:
    """What accumulates between two log lines; the loss stays on the device (no sync until logged)."""

    loss: torch.Tensor  # summed over the steps that were not skipped
    steps: torch.Tensor  # how many were not skipped
    mix: torch.Tensor  # rows drawn from each mixture source
    tokens: int = 0
    taken: int = 0  # optimizer steps in the window, skipped ones included
    start: float = field(default_factory=time.perf_counter)
    # the objective's own health measures (objective.train_metrics: an RL run's reward, KL, ...), summed
    # over the micro-batches of the window
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_batches: int = 0

    def add(self, names: tuple[str, ...], values: dict[str, torch.Tensor]) -> None:
        for name in names:
            self.extra[name] = self.extra.get(name, 0.0) + values[name].detach().float()
        self.extra_batches += bool(names)

    def record(self, state: TrainState, lr: float, grad_norm: torch.Tensor, source_names: list[str] | None) -> dict:
        now = time.perf_counter()
        kept = int(self.steps)
        record = {
            # a window whose every step was skipped (non-finite loss or gradient) has no loss: null, not 0.0
            "loss": (self.loss / max(kept, 1)).item() if kept else None,
            "skipped_steps": self.taken - kept,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": self.tokens / max(now - self.start, 1e-9),
            "tokens_seen": state.tokens_seen,
            "bad_steps": state.bad_steps,
        }
        record.update({k: float(v) / max(self.extra_batches, 1) for k, v in self.extra.items()})
        self.extra, self.extra_batches = {}, 0
        total = max(int(self.mix.sum()), 1)
        record.update({f"mix_{n}": c / total for n, c in zip(source_names or [], self.mix.tolist(), strict=True)})
        self.loss.zero_()
        self.steps.zero_()
        self.tokens, self.taken, self.start = 0, 0, now
        return record


def _restore(checkpoints: Path, model, optimizer, scheduler, objective, strategy, log,
             accept: Callable[[Path, dict | None], None] | None) -> tuple[TrainState, str | None]:
    """Load the newest valid checkpoint, once `accept(path, its run info)` has not refused it."""
    found = ckpt.latest_valid_checkpoint(checkpoints, warn=log)
    if found is None:
        raise ckpt.CheckpointError(f"{checkpoints}: no valid checkpoint to resume from; "
                                   "run without --resume to start over")
    path, saved = found
    if accept is not None:
        accept(path, saved.get("run"))
    ckpt.load_checkpoint(path, model, optimizer, strategy.load_full_state if strategy.sharded else None)
    scheduler.load_state_dict(saved["scheduler"])
    if "objective" in saved and hasattr(objective, "load_state_dict"):
        objective.load_state_dict(ckpt.objective_state(path, saved["objective"], strategy.rank))
    log(f"resume: continuing from {path} (step {saved['train_state']['step']})")
    # `auto` precision is measured; a resumed run keeps the choice it started with
    return TrainState(**saved["train_state"]), saved.get("precision")


class StepGuard:
    """Skips every optimizer step whose loss or gradient norm is not finite: a NaN never reaches the weights.

    With a fused optimizer the check stays on the device: the kernel skips the whole update when
    `found_inf` is set (AMP's own mechanism), so a step needs no host sync; the host learns of skipped
    steps when it syncs anyway (log steps, checkpoints, the end), and stops a run whose longest stretch
    of skipped steps reached `max_bad_steps`. Other optimizers check on the host every step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, max_bad_steps: int, state: TrainState):
        self.on_device = bool(optimizer.defaults.get("fused"))
        self.max_bad_steps = max_bad_steps
        self.unreported = torch.zeros((), device=device)  # skipped steps the host has not counted yet
        # skipped steps in a row up to the last step (a resumed run continues the stretch it saved)
        self.stretch = torch.full((), float(state.consecutive_bad), device=device)
        self.longest = self.stretch.clone()  # the longest stretch since the last report
        self.first_unreported_step = state.step + 1

    def step(self, optimizer: torch.optim.Optimizer, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """One optimizer step unless non-finite; the skip flag (1.0 = skipped), on the device."""
        skipped = (~torch.isfinite(step_loss) | ~torch.isfinite(grad_norm)).float()
        if self.on_device:
            optimizer.found_inf = skipped
            optimizer.step()
        elif not skipped.item():
            optimizer.step()
        self.unreported += skipped
        self.stretch = (self.stretch + 1) * skipped
        self.longest = torch.maximum(self.longest, self.stretch)
        return skipped

    def settle(self, state: TrainState, last_saved: Path | None, log: Callable[[str], None], every_step: bool) -> None:
        """Count skipped steps into `state` (a host sync), log them, stop a diverged run.

        Called every step when the check is on the host, else only at steps that sync anyway."""
        if self.on_device and every_step:
            return
        skipped, stretch, longest = (int(v) for v in torch.stack([self.unreported, self.stretch, self.longest]).tolist())
        since, self.first_unreported_step = self.first_unreported_step, state.step + 1
        state.consecutive_bad = stretch
        if skipped == 0:
            return
        state.bad_steps += skipped
        where = f"step {state.step}" if since == state.step else f"steps {since}-{state.step}"
        log(f"{where}: {skipped} step(s) with a non-finite loss or gradient skipped "
            f"({stretch} in a row now, {state.bad_steps} in all)")
        self.unreported.zero_()
        self.longest.copy_(self.stretch)
        if longest >= self.max_bad_steps:
            raise TrainingDiverged(
                f"{longest} consecutive steps with non-finite loss or gradients by step {state.step} "
                f"(trainer.max_bad_steps: {self.max_bad_steps}); last good checkpoint: {last_saved or 'none'}. "
                "Lower trainer.lr or check the data.")


def ensure_finite_weights(params: list[torch.Tensor], strategy, step: int, last_saved: Path | None) -> None:
    """Stop before a checkpoint or the final model holds a non-finite weight (every rank agrees)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    finite = torch.stack([torch.isfinite(p).all() for p in local]).all().float() if local else torch.ones(())
    if float(strategy.mean(finite.to(strategy.device))) < 1.0:
        raise TrainingDiverged(f"step {step}: the weights are no longer finite (a step too large for them: lower "
                               f"trainer.lr); nothing was saved from this step on; last good checkpoint: "
                               f"{last_saved or 'none'}")


def _step_scheduler(scheduler) -> None:
    with warnings.catch_warnings():
        # a skipped first step makes torch warn about the call order; the schedule is a pure
        # function of the step number, so nothing is skipped
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()


def train(
    model: nn.Module,
    objective,
    param_groups: list[dict],
    cfg: TrainerConfig,
    out_dir: Path,
    *,
    batches: Callable[[int], Iterator[dict]],
    batches_per_epoch: int,
    tokens_per_batch: int,
    evaluate: Callable[[nn.Module, str], dict] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    source_names: list[str] | None = None,
    run_info: dict | None = None,
    accept_checkpoint: Callable[[Path, dict | None], None] | None = None,
    on_start: Callable[[], None] | None = None,
    tracker=None,
) -> TrainResult:
    """`run_info` goes into every checkpoint; `accept_checkpoint(path, its run_info)` may refuse one on
    resume; `on_start()` runs once, when the run writes its first metrics record (it has started);
    `tracker` (engine/tracking.py) receives every metrics record too."""
    strategy = init_strategy(cfg.strategy)
    device = strategy.device
    precision = strategy.same_on_all(resolve_precision(cfg.precision, device))
    if not strategy.is_main:
        log = _silent
    model.to(device)
    param_groups = strategy.shard_model(model, param_groups)
    optimizer = build_optimizer(param_groups, cfg.lr, cfg.betas, cfg.eps, cfg.optimizer_impl)
    total_steps = resolve_total_steps(cfg, batches_per_epoch, tokens_per_batch)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.grad_accum))
    eval_every = steps_per_epoch if cfg.eval_every == "epoch" else cfg.eval_every
    warmup, long_warmup = warmup_steps_of(cfg.warmup_steps, cfg.warmup_fraction, total_steps)
    factor = lr_factor(cfg.schedule, warmup, total_steps, cfg.min_lr_ratio, cfg.num_cycles)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    checkpoints = out_dir / "checkpoints"
    state = TrainState()
    if resume:
        state, saved_precision = _restore(checkpoints, model, optimizer, scheduler, objective, strategy, log,
                                          accept_checkpoint)
        precision = saved_precision or precision

    uncheckpoint = checkpoint_activations(model, cfg.activation_checkpointing)
    step_model = strategy.wrap(model)
    compiled = compile_for_training(step_model, cfg.compile)
    step_model = compiled.module
    metrics = (MetricsLogger(out_dir, resume_step=state.step if resume else None, on_first_write=on_start, also=tracker,
                             total_steps=total_steps, start_step=state.step)
               if strategy.is_main else NullMetrics())
    if long_warmup:
        log(f"warning: {long_warmup}")
    if cfg.log_every > total_steps:
        log(f"note: trainer.log_every {cfg.log_every} > the run's {total_steps} steps: the loss is logged at the end only")
    log(f"train: {total_steps} steps{f' ({warmup} of warm-up)' if warmup else ''}, {tokens_per_batch * cfg.grad_accum} tokens/step, precision {precision}, "
        f"device {device}, optimizer {'fused' if optimizer.defaults.get('fused') else 'foreach'} AdamW")

    def save(step: int) -> Path:
        metrics.start()  # a checkpoint before the first metrics record: the run has started all the same
        state.seconds = seconds_before + time.perf_counter() - run_start  # the time trained, as of this checkpoint
        path = checkpoints / f"step_{step:08d}"
        ensure_finite_weights(trainable, strategy, step, last_saved)
        full = strategy.full_state(model, optimizer)  # FSDP: every rank takes part in gathering
        # objective-owned state (a learned temperature; an RL objective's value head and the rollout it is
        # using, which differs by rank)
        objective_states = strategy.gather(objective.state_dict()) if hasattr(objective, "state_dict") else None
        if strategy.is_main:
            extra = {"scheduler": scheduler.state_dict(), "train_state": asdict(state), "precision": precision,
                     **(run_info or {})}
            tensors = None
            if objective_states is not None:
                extra["objective"], tensors = ckpt.split_objective_state(objective_states)
            best = () if state.best_step is None else (checkpoints / f"step_{state.best_step:08d}",)
            path = ckpt.save_checkpoint(checkpoints, step, model, optimizer, extra, cfg.keep_last, full, protect=best,
                                        objective_tensors=tensors)
        strategy.barrier()
        return path

    stop = StopFlag()

    def run_eval(step: int) -> dict:
        values = {}
        # the other ranks wait (evaluation is cheap next to training); sharded, they all take part
        if strategy.is_main or strategy.sharded:
            try:
                # sharded, every rank is inside the evaluation's collectives: it runs to its end
                with compiled.eager(), stop.evaluating(interruptible=not strategy.sharded):
                    values = evaluate(model, precision)  # the run's precision, also after a resume
            except EvaluationStopped:
                log(f"step {step}: evaluation stopped by the signal (not recorded)")
                strategy.barrier()
                model.train()
                return {}
            if cfg.eval_every == "epoch" or cfg.epochs is not None:
                values["epoch"] = round(step / steps_per_epoch, 3)
        if strategy.is_main:
            metrics.log(step, values, prefix="val")
            # through tqdm while a bar is drawn, so the bar is not torn
            # each task's own numbers (task/NAME/...) go to metrics.jsonl only: a line per eval stays readable
            (tqdm.write if cfg.progress else log)(f"step {step}: " + ", ".join(f"val_{k} {v:.4g}" for k, v in values.items()
                                                                    if isinstance(v, (int, float)) and not k.startswith("task/")))
        strategy.barrier()
        model.train()
        return values

    source = Prefetcher(batches(state.step * cfg.grad_accum))
    bar = tqdm(total=total_steps, initial=state.step, desc="train", disable=not (cfg.progress and strategy.is_main),
               dynamic_ncols=True)
    window = LogWindow(torch.zeros((), device=device), torch.zeros((), device=device),
                       torch.zeros(len(source_names or []), dtype=torch.long))
    guard = StepGuard(optimizer, device, cfg.max_bad_steps, state)
    total_mix = window.mix.clone()
    run_start, start_tokens, seconds_before = time.perf_counter(), state.tokens_seen, state.seconds
    result = TrainResult(state, total_steps, None, is_main=strategy.is_main)
    last_saved: Path | None = None
    stopper = None
    if cfg.early_stopping is not None:  # among the evaluations while training (step 0 is the start model)
        if evaluate is None:
            raise ValueError("trainer.early_stopping: needs held-out data to evaluate (data.val_fraction or data.val_files)")
        stopper = EarlyStopping(cfg.early_stopping, state)
    model.train()
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    logged = tuple(getattr(objective, "train_metrics", ()))
    try:
        with stop:
            if evaluate is not None and cfg.eval_at_start and state.step == 0:
                result.first_eval = run_eval(0)
                if stop.signal is not None:  # stopped before the first step: nothing trained, nothing to keep
                    raise KeyboardInterrupt
            while state.step < total_steps:
                loss_sum, tokens = torch.zeros((), device=device), 0
                for _ in range(cfg.grad_accum):
                    host_batch = next(source)
                    if "source" in host_batch:  # mixture rows, counted on the host: no device sync
                        window.mix += torch.bincount(host_batch.pop("source"), minlength=len(window.mix))
                    # real tokens of the global batch, all ranks together (padding not counted)
                    tokens += int(host_batch.pop("num_tokens", host_batch["input_ids"].numel()))
                    batch = {k: v.to(device, non_blocking=True) for k, v in strategy.shard(host_batch).items()}
                    with autocast(device, precision):
                        loss, parts = objective.loss(step_model, batch)
                    window.add(logged, parts)
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach()
                # the mean over ranks: every rank must agree on skipping a non-finite step
                step_loss = strategy.mean(loss_sum / cfg.grad_accum)
                grad_norm = strategy.clip_gradients(trainable, cfg.clip_grad or float("inf"))
                skipped = guard.step(optimizer, step_loss, grad_norm)
                optimizer.zero_grad(set_to_none=True)
                _step_scheduler(scheduler)
                window.loss += torch.where(skipped.bool(), 0.0, step_loss)  # not NaN * 0
                window.steps += 1 - skipped
                window.taken += 1
                state.step += 1
                state.tokens_seen += tokens
                window.tokens += tokens
                bar.update(1)
                metrics.tick(state.step)
                last = state.step == total_steps
                log_now = state.step % cfg.log_every == 0 or last
                save_now = bool(cfg.save_every) and (state.step % cfg.save_every == 0 or last)
                guard.settle(state, last_saved, log, every_step=not (log_now or save_now))

                if log_now:
                    total_mix += window.mix
                    record = window.record(state, scheduler.get_last_lr()[0], grad_norm, source_names)
                    window.mix.zero_()
                    metrics.log(state.step, record)
                    # an RL objective's verdict on its run (rank 0's: every rank stops together)
                    problem = (strategy.same_on_all(objective.unhealthy(record, state.step))
                               if hasattr(objective, "unhealthy") else None)
                    if problem:  # an RL run gone wrong: stop, keep what was saved before
                        raise TrainingDiverged(f"step {state.step}: {problem}; last good checkpoint: {last_saved or 'none'}")
                    bar.set_postfix(loss="skipped" if record["loss"] is None else f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if record["loss"] is not None:
                        result.train_loss = record["loss"]
                stop_early = False
                if evaluate is not None and (state.step % eval_every == 0 or last):
                    result.val = run_eval(state.step)
                    if stopper is not None and stop.signal is None:  # a stopped evaluation has no verdict
                        improved, stop_early = strategy.same_on_all(stopper.update(state.step, result.val)
                                                                    if strategy.is_main else None)
                        save_now = save_now or improved or stop_early  # the best is kept; a stop can resume
                if save_now:
                    last_saved = save(state.step)
                if stop_early:
                    result.stopped_early = True
                    log(f"early stopping at step {state.step}: val_{cfg.early_stopping.metric} has not improved by more "
                        f"than {cfg.early_stopping.min_delta:g} in {cfg.early_stopping.patience} evaluations; the best was "
                        f"step {state.best_step} (val_{cfg.early_stopping.metric} "
                        f"{state.best_val.get(cfg.early_stopping.metric, float('nan')):.4g}), whose weights become the final model")
                    break
                if strategy.stop_requested(stop.signal is not None):
                    guard.settle(state, last_saved, log, every_step=False)
                    last_saved = save(state.step)
                    result.interrupted = True
                    log(f"\nstopped by signal {stop.signal} at step {state.step}; checkpoint {last_saved}. "
                        "Resume with the same command plus --resume.")
                    break
    finally:
        compiled.undo()
        uncheckpoint()
        source.close()
        bar.close()
        metrics.close()
    if stopper is not None and not result.interrupted and state.best_step is not None:
        result.best_step = state.best_step
        if state.best_step != state.step:  # the best evaluation's weights become the final model
            strategy.barrier()
            ckpt.load_checkpoint(checkpoints / f"step_{state.best_step:08d}", model, optimizer)
            log(f"early stopping: the final model is step {state.best_step}'s, the best evaluation "
                f"(val_{cfg.early_stopping.metric} {state.best_val.get(cfg.early_stopping.metric, float('nan')):.4g})")
        if strategy.is_main:
            result.val = dict(state.best_val)
    part = time.perf_counter() - run_start
    state.seconds = seconds_before + part
    result.seconds = state.seconds  # every part of a resumed run
    result.tokens_per_second = (state.tokens_seen - start_tokens) / max(part, 1e-9)  # this part's pace
    result.checkpoint = last_saved
    result.tokens, result.precision = state.tokens_seen, precision
    result.parameters = sum(p.numel() for p in model.parameters())
    result.trainable = sum(p.numel() for p in trainable)
    result.peak_memory_mb = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    if not result.interrupted:  # the final model is saved (FSDP: gathered by every rank, kept by rank 0)
        ensure_finite_weights(trainable, strategy, state.step, last_saved)
        result.full_weights = strategy.full_weights(model)
    if source_names:
        result.mix_seen = dict(zip(source_names, (total_mix + window.mix).tolist(), strict=True))
        log("data mix seen: " + ", ".join(f"{n} {c / max(sum(result.mix_seen.values()), 1):.1%}"
                                          for n, c in result.mix_seen.items()))
    return result
