"""Stages of a recipe, wired together: tokenizer -> prepare -> train -> eval -> generate.

Each stage skips itself when its output exists for the same inputs (a content hash), so running a
recipe twice redoes nothing, and an interrupted run picks up at the stage it was in.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.config import ADAPTER_METHODS, ObjectiveConfig, Recipe
from lmforge.data.packing import PackedRows, iterate_batches
from lmforge.data.prepare import PreparedCorpus, load_prepared
from lmforge.data.tokenizer import (
    save_portable,
)
from lmforge.engine.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
from lmforge.engine.distributed import init_strategy, say
from lmforge.engine.loop import TrainResult, train
from lmforge.engine.runtime import (
    configure_threads,
    matmul_peak_gflops,
    pick_device,
    resolve_precision,
    seed_everything,
)
from lmforge.engine.status import STATUS, evaluating, write_status
from lmforge.eval.generate import generate_texts
from lmforge.eval.perplexity import evaluate_loss, pseudo_perplexity
from lmforge.generation.limits import LimitError, Limits
from lmforge.generation.prompt import prompt_ids
from lmforge.methods import apply_method
from lmforge.methods.adapters import is_adapted, save_adapted
from lmforge.methods.peft import link_labelled_base
from lmforge.models import qat
from lmforge.models.factory import (
    describe,
    ensure_fits_length,
    flops_per_token,
    load_model,
    saved_head,
)
from lmforge.objectives import get_objective, objective_data, objective_head
from lmforge.objectives.regularize import Regularized, diagonal_fisher, ewc_penalty, l2sp_penalty
from lmforge.outputs import (
    OutputError,
    RunLock,
    as_disk_full,
    ensure_replaceable,
    has_stamp,
    move_run_aside,
    remove_stale_temporaries,
    replace_dir,
    stamp_matches,
    temporaries_of,
    temporary_sibling,
    write_stamp,
)
from lmforge.recipe_files import dump_recipe
from lmforge.run_keys import checkpoint_acceptor, flat_settings, run_identity, train_key
from lmforge.sources import training_source
from lmforge.stage_inputs import inputs_stage, model_stage, model_tokenizer


# ---------------------------------------------------------------- train
@dataclass
class TrainOutcome:
    result: TrainResult | None
    model_dir: Path
    skipped: bool = False


def save_final(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, weights: dict | None = None,
               alongside=None, **stamp) -> None:
    """`save_pretrained` into a temporary folder, then rename: `out` is either complete or absent, and
    only a model folder lmforge wrote is ever replaced.
    `weights`: the whole state gathered from a sharded (FSDP) model, in place of its own; `alongside(folder)`
    writes what the objective adds to the folder (a sentence-transformers description of an encoder)."""
    given, out = out, out.absolute()
    ensure_replaceable(out, has_stamp, "a model folder lmforge saved")
    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if is_adapted(model):  # bottleneck adapters: their own file beside the base's (linked) weights
            save_adapted(model, tmp, weights)
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        if hasattr(model, "peft_config"):
            link_labelled_base(model, tmp, given)
        save_portable(tokenizer, tmp)
        if alongside is not None:
            alongside(tmp)
        write_stamp(tmp, **stamp)
        replace_dir(tmp, out)
    except Exception as exc:
        as_disk_full(exc, out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def trained_data_settings(recipe: Recipe) -> dict:
    """How the model read its data: stamped in its folder, the defaults of `eval` and `predict` on it
    (so they score the inputs its own held-out evaluation did)."""
    d = recipe.data
    return {"column": d.column, "label_column": d.label_column, "labels": d.labels, "seq_len": recipe.packing.seq_len,
            "objective": recipe.objective.name}


def _save_merged_start(recipe: Recipe, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """An adapter trained on a model that is itself an adapter merged into its base (LoRA SFT, then a LoRA
    reward model or PPO) records its base by path, and no folder holds those merged weights: without one
    it would be loaded onto the unmerged base, the parent's training lost. So the merged start model is
    written to OUTPUT_DIR/start (replaced on each training run of the stage) and the adapter points there."""
    path = recipe.model.path
    if recipe.method.name not in ADAPTER_METHODS or not path or not (Path(path) / "adapter_config.json").is_file():
        return
    if (Path(path) / "config.json").is_file() or hasattr(model, "peft_config"):  # not a merged peft adapter
        return
    start = Path(recipe.output_dir) / "start"
    strategy = init_strategy()
    if strategy.is_main:  # under torchrun one process writes it, the others wait
        say(f"model: {path} is an adapter; its merged weights go to {start}, the base this stage's adapter records")
        save_final(model, tokenizer, start, key=None, merged_from=str(path))
    strategy.barrier()
    model.name_or_path = model.config._name_or_path = str(start)


def _regularized(recipe: Recipe, objective, model, groups: list[dict], tokenizer):
    """The objective with the recipe's L2-SP / EWC terms, anchored at the weights training starts from
    (a resumed run rebuilds them from model.path, as the first run did)."""
    cfg = recipe.regularize
    trained = [p for group in groups for p in group["params"]]
    if cfg.l2sp:
        objective = Regularized(objective, l2sp_penalty(trained, cfg.l2sp))
    if cfg.ewc:
        if objective.head != "causal_lm":
            raise ValueError(f"regularize.ewc: its Fisher is of language modelling; objective '{objective.name}' "
                             "trains another head")
        rows = PackedRows(load_prepared(cfg.fisher_data, tokenizer).split("train"), recipe.packing.seq_len)
        say(f"regularize: EWC's Fisher information from {cfg.fisher_rows} rows of {cfg.fisher_data}")
        batches = itertools.islice(iterate_batches(rows, 1, recipe.seed), cfg.fisher_rows)
        fisher = diagonal_fisher(model, trained, batches, pick_device())
        objective = Regularized(objective, ewc_penalty(trained, cfg.ewc, fisher))
    return objective


def _claim_checkpoints(recipe: Recipe, key: str, force: bool) -> None:
    """A run folder belongs to one run: a fresh run refuses a folder holding checkpoints (another run's,
    or an earlier attempt of this one), or with --force moves them aside (never deletes them)."""
    found = list_checkpoints(recipe.checkpoint_dir)
    if not found or force:  # --force moves the whole earlier run aside once this one starts (see _train)
        return
    try:
        saved = verify_checkpoint(found[-1])
    except CheckpointError:
        saved = {}
    same = saved.get("run_key") == key
    whose = "an interrupted attempt at this same recipe" if same else "another run (its recipe or data differ)"
    raise OutputError(f"{recipe.checkpoint_dir}: holds checkpoints of {whose} (newest {found[-1].name}); "
                      + ("--resume continues it, " if same else "")
                      + "--force starts over and moves them aside, or choose another output_dir")


def train_stage(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, corpora: dict[str, PreparedCorpus],
                resume: bool = False, force: bool = False) -> TrainOutcome:
    out_dir = Path(recipe.output_dir)
    strategy = init_strategy()
    # rank 0's: on several nodes each may hold its own copy of a cached model (other file times, one identity)
    identity = strategy.same_on_all(run_identity(recipe, tokenizer, corpora))
    key = train_key(identity)
    if strategy.same_on_all(not force and stamp_matches(recipe.final_model_dir, key)):
        say(f"train: {recipe.final_model_dir} is up to date for this recipe and data; skipping (--force retrains)")
        return TrainOutcome(None, recipe.final_model_dir, skipped=True)
    ensure_replaceable(recipe.final_model_dir.absolute(), has_stamp, "a model folder lmforge saved")
    lock = RunLock(out_dir, say) if strategy.is_main else None
    with lock or contextlib.nullcontext():
        if strategy.is_main:
            remove_stale_temporaries(out_dir, temporaries_of(recipe.final_model_dir), say)
            remove_stale_temporaries(recipe.checkpoint_dir, [".tmp-step_"], say)
            if not resume:
                _claim_checkpoints(recipe, key, force)
        strategy.barrier()
        return _train(recipe, tokenizer, corpora, identity, key, resume, lock, force)


def _train(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, corpora: dict[str, PreparedCorpus], identity: dict,
           key: str, resume: bool, lock: RunLock | None, force: bool = False) -> TrainOutcome:
    out_dir = Path(recipe.output_dir)
    configure_threads(recipe.trainer.num_threads)
    seed_everything(recipe.seed, recipe.trainer.deterministic)
    objective = get_objective(recipe.objective, tokenizer)
    model = model_stage(recipe, tokenizer, objective.head)
    _save_merged_start(recipe, model, tokenizer)
    model, groups = apply_method(model, recipe.method, recipe.trainer.weight_decay)
    if recipe.qat is not None:
        count = qat.prepare(model, recipe.qat.weights, recipe.qat.group_size)
        say(f"qat: {count} linear layers train fake-quantized ({recipe.qat.weights} weights, int8 dynamic activations)")
    say(describe(model, recipe.packing.seq_len))  # after the method: the trainable count is the adapter's
    objective = _regularized(recipe, objective, model, groups, tokenizer)

    device = pick_device()
    source = training_source(recipe, objective, tokenizer, corpora, device, model)
    extra = objective.extra_parameters() if hasattr(objective, "extra_parameters") else []
    if extra:  # objective-owned parameters (a learned temperature) train too, undecayed
        groups.append({"params": extra, "weight_decay": 0.0, "lr_scale": 1.0})

    # the run's files are written when it has really started (its first metrics record), so a run
    # that fails before that leaves the previous run's recipe.yaml and metrics.jsonl as they were
    def started() -> None:
        if lock is not None:
            lock.keep = True  # the folder is this run's now: the lock file stays as its mark
        if force and not resume and (aside := move_run_aside(out_dir)) is not None:
            say(f"train: --force: the earlier run's files (recipe, metrics, checkpoints, final model) moved to {aside}")
        dump_recipe(recipe, out_dir)
        from lmforge.check import PRELAUNCH_REPORTS

        report = PRELAUNCH_REPORTS.get(str(out_dir.absolute()))
        if report is not None:  # what the pre-launch check said, for the board's run page
            (out_dir / "check.txt").write_text(report)

    tracker = _tracker(recipe, resume) if init_strategy().is_main else None
    try:
        result = train(model, objective, groups, cfg=recipe.trainer, out_dir=out_dir, resume=resume,
                       run_info={"run_key": key, "run": identity}, accept_checkpoint=checkpoint_acceptor(identity),
                       on_start=started, tracker=tracker, **source)
        if result.interrupted:
            write_status(out_dir, status="interrupted", message=f"stopped at step {result.state.step}; --resume continues")
            if tracker is not None:
                tracker.finish("KILLED")
            return TrainOutcome(result, recipe.checkpoint_dir)
        if not result.is_main:  # under torchrun, rank 0 writes the model
            return TrainOutcome(result, recipe.final_model_dir)
        result.flops_per_token = flops_per_token(model, recipe.packing.seq_len)
        alongside = getattr(objective, "save_alongside", None)
        save_final(model, tokenizer, recipe.final_model_dir, result.full_weights, key=key, steps=result.state.step,
                   data=trained_data_settings(recipe),
                   alongside=alongside and (lambda folder: alongside(folder, model, recipe.packing.seq_len)))
        if recipe.qat is not None:
            _write_quantized(recipe, model, tokenizer)
    except BaseException as exc:
        if (out_dir / STATUS).is_file():  # the run had started: the board shows why it ended
            write_status(out_dir, status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                         message=f"{type(exc).__name__}: {exc}")
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    write_status(out_dir, status="finished", step=result.state.step, eta_seconds=0, message=None)
    say(f"train: {result.state.step} steps in {result.seconds:.0f}s, {result.tokens_per_second:,.0f} tokens/s; "
          f"model saved to {recipe.final_model_dir}")
    if tracker is not None:
        tracker.log(result.state.step, {"train_loss": result.train_loss, "tokens_per_second": result.tokens_per_second,
                                        "seconds": result.seconds}, prefix="summary")
        tracker.log_model(recipe.final_model_dir)
        tracker.finish()
        say(f"train: tracked in MLflow at {tracker.uri} (run {tracker.run_id})")
    return TrainOutcome(result, recipe.final_model_dir)


def _write_quantized(recipe: Recipe, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """QAT's end: final/'s float weights converted to the real quantized model (torchao's conversion
    is post-training quantization with the scheme training used), checked against what the
    fake-quantized model computed in training."""
    from lmforge.export import export_model
    from lmforge.export.verify import compare, reference_outputs

    trained = reference_outputs(model, tokenizer)  # the fake-quantized model, as it trained
    cfg = recipe.qat
    export_model(recipe.final_model_dir, recipe.quantized_model_dir, "torchao", cfg.weights, say, cfg.group_size)
    quantized = load_model(recipe.quantized_model_dir, saved_head(recipe.final_model_dir))
    seen = compare(trained, quantized, None, cfg.weights)
    say(f"qat: {recipe.quantized_model_dir} computes what training saw: RMS difference {seen.relative_diff:.3%} "
        f"of the outputs' spread from the fake-quantized model")


def _tracker(recipe: Recipe, resume: bool):
    """The recipe's experiment tracker (trainer.tracking), or None."""
    if recipe.trainer.tracking != "mlflow":
        return None
    from lmforge.engine.tracking import MlflowTracker

    return MlflowTracker(Path(recipe.output_dir), recipe.trainer.tracking_uri, recipe.trainer.tracking_experiment or recipe.name,
                         Path(recipe.output_dir).name, flat_settings(recipe), resume)


# ---------------------------------------------------------------- eval / generate
def eval_stage(model_dir: Path, corpus: PreparedCorpus, objective_cfg: ObjectiveConfig | str, seq_len: int, batch_size: int,
               max_batches: int | None = None, document_mask: bool = False, tokenizer_dir: Path | None = None) -> dict:
    tokenizer = model_tokenizer(model_dir, tokenizer_dir)
    objective = get_objective(objective_cfg, tokenizer)
    load_prepared(corpus.directory, tokenizer)  # refuse a corpus of another tokenizer
    model = load_model(model_dir, objective.head)
    ensure_fits_length(model.config, seq_len)
    device = pick_device()
    model.to(device)
    rows = PackedRows(corpus.split("val"), objective.row_length(seq_len), document_mask)
    metrics = evaluate_loss(model, objective, rows, batch_size, max_batches, device, resolve_precision("auto", device),
                            desc="final evaluation")
    if objective.head == "masked_lm":
        metrics.update(pseudo_perplexity(model, rows, tokenizer.mask_token_id, objective.special_ids, device))
    metrics["unigram_entropy"] = corpus.manifest["unigram_entropy_nats"]
    return metrics


def generate_stage(model_dir: Path, prompts: list[str], max_new_tokens: int, temperature: float,
                   top_k: int | None, top_p: float | None, seed: int = 0, tokenizer_dir: Path | None = None,
                   chat: bool = False) -> list[str]:
    """Continuations of each prompt; with `chat`, the reply to each prompt as a user turn."""
    tokenizer = model_tokenizer(model_dir, tokenizer_dir)
    model = load_model(model_dir, "causal_lm")
    if chat:
        if not tokenizer.chat_template:
            raise ValueError(f"{model_dir}: the tokenizer has no chat template (was the model instruction-tuned?)")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    limits = Limits.of(model, max_new_tokens)  # the bounds serve and chat apply
    for prompt in prompts:
        try:
            limits.budget(len(prompt_ids(tokenizer, prompt)), max_new_tokens)
        except LimitError as exc:
            raise ValueError(f"--max-new-tokens / --prompt: {exc.message.split(': ', 1)[1]}") from None
    return generate_texts(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed, desc="samples")


def _final_evals(recipe: Recipe, outcome: TrainOutcome, corpora: dict[str, PreparedCorpus]) -> dict[str, dict]:
    """Each validation corpus through the saved model; for pairs and labelled sets (no packed
    validation split) the last in-training evaluation is the final one."""
    if objective_data(recipe.objective) != "packed":
        last = outcome.result.val if outcome.result is not None else {}
        say("eval: " + ", ".join(f"{k} {v:.3f}" for k, v in last.items() if isinstance(v, float)))
        return {"main": last}
    evals = {}
    for name, corpus in corpora.items():
        metrics = eval_stage(outcome.model_dir, corpus, recipe.objective, recipe.packing.seq_len,
                             recipe.trainer.batch_size, document_mask=recipe.packing.document_mask)
        label = "" if len(corpora) == 1 else f" [{name}]"
        say(f"eval{label}: validation loss {metrics['loss']:.3f} nats/token (perplexity {metrics['ppl']:.1f}) "
              f"vs unigram entropy {metrics['unigram_entropy']:.3f} nats/token over {metrics['tokens']:,} tokens")
        if "accuracy" in metrics:
            say(f"eval{label}: accuracy on the objective's targets {metrics['accuracy']:.3f}")
        if "pseudo_ppl" in metrics:
            say(f"eval{label}: pseudo-perplexity {metrics['pseudo_ppl']:.1f} over {metrics['pseudo_tokens']:,} tokens")
        evals[name] = metrics
    return evals


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def run_recipe(recipe: Recipe, resume: bool = False, force: bool = False) -> dict:
    """The whole pipeline; returns a summary that is also written to OUTPUT_DIR/summary.json."""
    tokenizer, corpora = inputs_stage(recipe)
    outcome = train_stage(recipe, tokenizer, corpora, resume=resume, force=force)
    if outcome.result is not None and outcome.result.interrupted:
        return {"interrupted": True, "step": outcome.result.state.step}
    if outcome.result is not None and not outcome.result.is_main:  # torchrun: rank 0 evaluates and reports
        return {}
    evaluating(Path(recipe.output_dir))  # until the stage's evaluation is done (finished_evaluating)
    evals = _final_evals(recipe, outcome, corpora)
    g = recipe.generate
    samples: list[str] = []
    chat = objective_data(recipe.objective) in ("instructions", "preferences", "prompts")  # chat-tuned: prompts are user turns
    if objective_head(recipe.objective) == "causal_lm":  # only decoders continue a prompt
        samples = generate_stage(outcome.model_dir, g.prompts, g.max_new_tokens, g.temperature, g.top_k, g.top_p,
                                 recipe.seed, chat=chat)
    for prompt, text in zip(g.prompts, samples, strict=False):
        say(f"sample: {prompt!r} -> {text if chat else prompt + text!r}")
    summary = {"model_dir": str(outcome.model_dir), "eval": evals["main"] if list(evals) == ["main"] else evals,
               "samples": dict(zip(g.prompts, samples, strict=False))}
    if outcome.result is not None:
        summary["train"] = {"steps": outcome.result.state.step, "seconds": round(outcome.result.seconds, 1),
                            "tokens_per_second": round(outcome.result.tokens_per_second),
                            "final_train_loss": outcome.result.train_loss, "bad_steps": outcome.result.state.bad_steps,
                            "best_step": outcome.result.best_step, "stopped_early": outcome.result.stopped_early,
                            "tokens": outcome.result.tokens, "parameters": outcome.result.parameters,
                            "trainable": outcome.result.trainable,
                            "peak_memory_mb": round(outcome.result.peak_memory_mb), "precision": outcome.result.precision}
        if outcome.result.flops_per_token and outcome.result.tokens_per_second:  # model FLOPs utilisation
            peak = matmul_peak_gflops(outcome.result.precision, pick_device().type)
            summary["train"].update(flops_per_token=outcome.result.flops_per_token, matmul_peak_gflops=round(peak, 1),
                                    mfu=outcome.result.tokens_per_second * outcome.result.flops_per_token / (peak * 1e9))
        if outcome.result.first_eval:
            summary["eval_before"] = outcome.result.first_eval
    else:  # training was up to date: how it trained (time, tokens, memory) is still the earlier summary's
        earlier = _read_json(Path(recipe.output_dir) / "summary.json")
        summary.update({k: earlier[k] for k in ("train", "eval_before") if k in earlier})
    (Path(recipe.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
