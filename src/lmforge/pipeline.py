"""Stages of a recipe, wired together: tokenizer -> prepare -> train -> eval -> generate.

Each stage skips itself when its output exists for the same inputs (a content hash), so running a
recipe twice redoes nothing, and an interrupted run picks up at the stage it was in.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.config import ADAPTER_METHODS, ObjectiveConfig, Recipe, dump_recipe, flatten
from lmforge.data.formats import expand_inputs, file_fingerprints, iter_corpus
from lmforge.data.labeled import iter_labeled
from lmforge.data.packing import PackedRows, iterate_batches
from lmforge.data.prepare import PreparedCorpus, load_prepared, prepare_corpus, retokenized
from lmforge.data.tagged import iter_tagged
from lmforge.data.tokenizer import (
    domain_tokens,
    extend_tokenizer,
    load_tokenizer,
    save_portable,
    save_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
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
from lmforge.engine.status import STATUS, write_status
from lmforge.eval.generate import generate_texts, prompt_ids
from lmforge.eval.perplexity import evaluate_loss, pseudo_perplexity
from lmforge.generation.limits import LimitError, Limits
from lmforge.methods import apply_method
from lmforge.methods.adapters import is_adapted, save_adapted
from lmforge.methods.peft import link_labelled_base
from lmforge.models import qat
from lmforge.models.factory import (
    build_model,
    describe,
    ensure_family_fits,
    ensure_fits_length,
    flops_per_token,
    init_new_embeddings,
    load_model,
    preset_config,
    saved_head,
)
from lmforge.objectives import OBJECTIVES, get_objective, objective_data, objective_head
from lmforge.objectives.regularize import Regularized, diagonal_fisher, ewc_penalty, l2sp_penalty
from lmforge.outputs import (
    OutputError,
    RunLock,
    as_disk_full,
    content_hash,
    ensure_replaceable,
    ensure_run_folder,
    has_stamp,
    move_run_aside,
    read_stamp,
    remove_stale_temporaries,
    replace_dir,
    stamp_matches,
    temporaries_of,
    temporary_sibling,
    write_stamp,
)
from lmforge.sources import training_source

# Recipe keys that cannot change the trained weights (evaluation runs on a forked RNG): left out of
# the train key, so changing them never retrains. Every other key is in it, and so is a fingerprint of
# every file and folder the recipe names.
NOT_IN_TRAIN_KEY = frozenset({
    "name", "output_dir", "generate", "trainer.progress", "trainer.log_every", "trainer.save_every",
    "trainer.keep_last", "trainer.eval_every", "trainer.eval_batches", "trainer.eval_at_start",
    "trainer.tracking", "trainer.tracking_uri", "trainer.tracking_experiment",
})
# What `--resume` accepts as changed: the above, a new training length (the schedule is then stretched
# or shortened from the checkpoint on), and the strategy (checkpoints are keyed by parameter name and
# resume under any strategy, tested). Any other change would make the run neither the old nor the new recipe.
SAFE_ON_RESUME = NOT_IN_TRAIN_KEY | {"trainer.max_steps", "trainer.max_tokens", "trainer.epochs", "trainer.strategy"}


def flat_settings(recipe: Recipe) -> dict:
    """The recipe as `section.key -> value` (lists and free-form mappings stay whole values)."""
    return flatten(recipe.model_dump(mode="json"), whole=("overrides",))


# Settings outside the key that decide the weights all the same under another setting: with early
# stopping, when and on how much the run evaluates chooses the step whose weights become the final model.
DECIDE_WEIGHTS_WHEN = {"trainer.eval_every": "trainer.early_stopping", "trainer.eval_batches": "trainer.early_stopping",
                       "trainer.eval_at_start": "trainer.early_stopping"}


def train_settings(recipe: Recipe) -> dict:
    """The settings that decide the trained weights: all but NOT_IN_TRAIN_KEY (less those that
    DECIDE_WEIGHTS_WHEN their condition is set). Unset ones (None, empty) are left out: a key that lmforge
    adds later, unset by default, then leaves every earlier output's train key as it was (an unset key and
    an absent one train the same weights), while any value set still changes it."""
    flat = flat_settings(recipe)

    def decides(key: str) -> bool:
        condition = DECIDE_WEIGHTS_WHEN.get(key)
        if condition is not None and any(k == condition or k.startswith(condition + ".") for k, v in flat.items()
                                         if v is not None):
            return True
        return not _excluded(key, NOT_IN_TRAIN_KEY)

    return {k: v for k, v in flat.items() if decides(k) and v is not None and v != [] and v != {}}


def _excluded(key: str, excluded: frozenset[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in excluded)


def _path_fingerprint(value: str, outputs: Path) -> list | None:
    """Size and mtime of every file at a path the recipe names (a file, a folder, a glob); None when
    the string names nothing on disk. The run's own outputs are left out (they are what it writes)."""
    matches = sorted(glob.glob(value, recursive=True)) if any(c in value for c in "*?[") else [value]
    found = []
    for match in matches:
        path = Path(match)
        if not path.exists() or path.absolute().is_relative_to(outputs):
            continue
        found += file_fingerprints([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()))
    return found or None


def input_fingerprints(recipe: Recipe) -> dict:
    """For every recipe string that names a file, folder or glob on disk: its files' sizes and mtimes."""
    outputs = Path(recipe.output_dir).absolute()
    prints = {}
    for key, value in flat_settings(recipe).items():
        if _excluded(key, NOT_IN_TRAIN_KEY):
            continue
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, str) and item and not item.startswith("hf:"):
                found = _path_fingerprint(item, outputs)
                if found:
                    prints[f"{key}[{i}]"] = found
    return prints


# ---------------------------------------------------------------- tokenizer
def tokenizer_stage(recipe: Recipe) -> PreTrainedTokenizerBase:
    cfg = recipe.tokenizer
    out = recipe.tokenizer_dir
    if cfg.extend_count:
        return _extended_tokenizer(recipe)
    if not cfg.train_files:
        source = cfg.path or recipe.model.path
        if source is None:
            raise ValueError("tokenizer: set tokenizer.train_files to train one, or tokenizer.path / model.path to load one")
        return load_tokenizer(source, recipe.model.trust_remote_code)
    files = expand_inputs(cfg.train_files)
    key = content_hash({"cfg": cfg.model_dump(), "inputs": file_fingerprints(files)})
    if stamp_matches(out, key):
        return load_tokenizer(out)
    say(f"tokenizer: training {cfg.kind} (vocab {cfg.vocab_size}) on {len(files)} file(s)")
    tokenizer = train_tokenizer(iter_corpus(files, cfg.column, max_docs=cfg.max_docs), out, cfg.kind,
                                cfg.vocab_size, cfg.min_frequency, cfg.num_sentinels)
    write_stamp(out, key, fingerprint=tokenizer_fingerprint(tokenizer))
    return tokenizer


def _extended_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    cfg = recipe.tokenizer
    base_dir = cfg.path or recipe.model.path
    if base_dir is None or not cfg.extend_files:
        raise ValueError("tokenizer.extend_count: extending needs tokenizer.path (or model.path) and tokenizer.extend_files")
    out = recipe.tokenizer_dir
    files = expand_inputs(cfg.extend_files)
    key = content_hash({"cfg": cfg.model_dump(), "inputs": file_fingerprints(files)})
    if stamp_matches(out, key):
        return load_tokenizer(out)
    ensure_replaceable(out.absolute(), has_stamp, "a tokenizer lmforge wrote")
    tokenizer = load_tokenizer(base_dir, recipe.model.trust_remote_code)
    new_tokens = domain_tokens(tokenizer, iter_corpus(files, cfg.column), cfg.extend_count, cfg.extend_min_frequency)
    new_ids = extend_tokenizer(tokenizer, new_tokens)
    save_tokenizer(tokenizer, out, key, base=str(base_dir), new_tokens=new_tokens, new_ids=new_ids)
    say(f"tokenizer: added {len(new_tokens)} domain tokens to {base_dir} (e.g. {new_tokens[:5]}); saved to {out}")
    return load_tokenizer(out)


# ---------------------------------------------------------------- prepare
def _prepare_one(recipe: Recipe, tokenizer, files: list[str], column: str, out: Path, label: str,
                 val_files: list[str] | None = None, name: str = "main") -> PreparedCorpus:
    cfg = recipe.data
    if not files:  # a prepared corpus (another stage's); prepared again if its tokenizer is not the run's
        return retokenized(out, tokenizer, Path(recipe.output_dir).absolute() / f"retokenized_{name}",
                           recipe.trainer.progress, say)
    corpus = prepare_corpus(files, tokenizer, out, column, cfg.format, cfg.val_fraction, cfg.max_docs,
                            cfg.shard_tokens, progress=recipe.trainer.progress,
                            val_files=val_files)
    splits = corpus.manifest["splits"]
    say(f"data{label}: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens "
          f"({splits['train']['docs']:,} / {splits['val']['docs']:,} docs) in {corpus.directory}")
    return corpus


def prepare_stage(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> dict[str, PreparedCorpus]:
    """The run's corpora by name: one ("main") or the sources of `data.mixture`."""
    cfg = recipe.data
    if objective_data(recipe.objective) in ("pairs", "labeled", "tagged", "spans", "instructions", "preferences", "prompts"):  # small sets: tokenized in memory at train time
        return {}
    if not cfg.mixture:
        return {"main": _prepare_one(recipe, tokenizer, cfg.train_files, cfg.column, recipe.prepared_dir, "", cfg.val_files)}
    return {
        m.name: _prepare_one(recipe, tokenizer, m.train_files, m.column,
                             Path(m.prepared_dir or Path(recipe.output_dir) / f"data_{m.name}"), f" [{m.name}]",
                             name=m.name)
        for m in cfg.mixture
    }


# ---------------------------------------------------------------- model
def label_names(recipe: Recipe) -> list[str]:
    """The classification labels: `data.labels`, or the sorted labels found in the data."""
    cfg = recipe.data
    if cfg.labels is not None:
        return list(cfg.labels)
    if recipe.objective.name == "token_classify":  # the tags of every word
        return sorted({t for row in iter_tagged(cfg.train_files, cfg.column, cfg.label_column, None)
                       if not isinstance(row, Exception) for t in row[2]})
    return sorted({row[1] for row in iter_labeled(cfg.train_files, cfg.column, cfg.label_column, None)
                   if not isinstance(row, Exception)})


def _head_config(recipe: Recipe, head: str) -> dict:
    objective = OBJECTIVES[recipe.objective.name]
    if hasattr(objective, "head_config"):  # a fixed head, e.g. the reward model's single score
        return objective.head_config
    if head not in ("classifier", "token_classifier"):
        return {}
    names = label_names(recipe)
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def model_stage(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, head: str) -> PreTrainedModel:
    cfg = recipe.model
    seq_len = recipe.packing.seq_len
    head_config = _head_config(recipe, head)
    if cfg.path:
        say(f"model: loading {cfg.path} with trust_remote_code "
              + ("ON (the recipe asked for it): code from the checkpoint will run" if cfg.trust_remote_code else "off"))
        model = load_model(cfg.path, head, cfg.trust_remote_code, **head_config)
        if model.config.pad_token_id is None:  # sequence classifiers find each row's end by the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        added = read_stamp(recipe.tokenizer_dir) if recipe.tokenizer.extend_count else {}
        if added.get("new_tokens"):
            init_new_embeddings(model, load_tokenizer(added["base"]), added["new_tokens"], added["new_ids"])
        elif len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    else:
        ensure_family_fits(cfg.family, head, recipe.objective.name)
        # Embedding rows rounded up to a multiple of 64 keep the output matmul on fast kernel shapes.
        vocab = (len(tokenizer) + 63) // 64 * 64
        config = preset_config(cfg.family, cfg.preset, vocab, max(1024, seq_len), **{**head_config, **cfg.overrides})
        model = build_model(config, head, tokenizer)
    ensure_fits_length(model.config, seq_len, recipe.method.virtual_positions)
    return model


# ---------------------------------------------------------------- train
@dataclass
class TrainOutcome:
    result: TrainResult | None
    model_dir: Path
    skipped: bool = False


def run_identity(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, corpora: dict[str, PreparedCorpus]) -> dict:
    """Everything that decides the trained weights: the recipe's settings (less NOT_IN_TRAIN_KEY), the
    tokenizer, the prepared corpora and every named input file. Its hash is the train key; checkpoints
    keep it whole, so that a resume can list what changed."""
    identity = {"settings": train_settings(recipe), "tokenizer": tokenizer_fingerprint(tokenizer),
                "corpora": {n: c.manifest["fingerprint"] for n, c in corpora.items()},
                "inputs": input_fingerprints(recipe)}
    return json.loads(json.dumps(identity))  # as a checkpoint's state.json gives it back (lists, not tuples)


def train_key(identity: dict) -> str:
    return content_hash(identity)


def resume_changes(saved: dict | None, current: dict) -> tuple[list[str], list[str]]:
    """(changes `--resume` refuses, changes it accepts) between a checkpoint's run identity and this run's."""
    if not saved:
        return ["the checkpoint records no recipe (written by an older lmforge); start over without --resume"], []
    refused, accepted = [], []
    old, new = saved.get("settings", {}), current["settings"]
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key):
            line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            (accepted if _excluded(key, SAFE_ON_RESUME) else refused).append(line)
    for part, what in (("tokenizer", "the tokenizer"), ("corpora", "the prepared data"), ("inputs", "the input files")):
        if saved.get(part) != current[part]:
            changed = sorted(k for k in saved.get(part, {}).keys() | current[part].keys()
                             if saved.get(part, {}).get(k) != current[part].get(k)) if isinstance(current[part], dict) else []
            refused.append(f"{what} changed" + (f" ({', '.join(changed)})" if changed else ""))
    return refused, accepted


def checkpoint_acceptor(identity: dict):
    """What the loop asks before resuming from a checkpoint: refuse one whose run differs in what
    breaks exactness (the list of changes), log the accepted changes."""
    def accept(path: Path, saved: dict | None) -> None:
        refused, accepted = resume_changes(saved, identity)
        if refused:
            raise CheckpointError(f"{path}: --resume would continue another run; changed since that checkpoint:\n  "
                                  + "\n  ".join(refused)
                                  + "\nrevert these, or start a new run without --resume (--force moves the checkpoints aside)")
        if accepted:
            say("resume: accepted changes since the checkpoint: " + "; ".join(accepted))
    return accept


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
    identity = run_identity(recipe, tokenizer, corpora)
    key = train_key(identity)
    if not force and stamp_matches(recipe.final_model_dir, key):
        say(f"train: {recipe.final_model_dir} is up to date for this recipe and data; skipping (--force retrains)")
        return TrainOutcome(None, recipe.final_model_dir, skipped=True)
    strategy = init_strategy()
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
def model_tokenizer(model_dir: Path, tokenizer_dir: Path | None) -> PreTrainedTokenizerBase:
    """The tokenizer beside a model, or the one given (training checkpoints hold no tokenizer)."""
    if not Path(model_dir).exists():
        raise FileNotFoundError(f"{model_dir}: no such model folder")
    if tokenizer_dir is None and not (Path(model_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no tokenizer here (a training checkpoint?); pass --tokenizer DIR")
    return load_tokenizer(tokenizer_dir or model_dir)


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
    metrics = evaluate_loss(model, objective, rows, batch_size, max_batches, device, resolve_precision("auto", device))
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
    return generate_texts(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed)


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


def inputs_stage(recipe: Recipe) -> tuple[PreTrainedTokenizerBase, dict[str, PreparedCorpus]]:
    """Tokenizer and corpora; under torchrun rank 0 builds them while the other ranks wait."""
    ensure_run_folder(Path(recipe.output_dir))  # before any stage writes into it

    def build():
        tokenizer = tokenizer_stage(recipe)
        return tokenizer, prepare_stage(recipe, tokenizer)

    return init_strategy().main_first(build)


def run_recipe(recipe: Recipe, resume: bool = False, force: bool = False) -> dict:
    """The whole pipeline; returns a summary that is also written to OUTPUT_DIR/summary.json."""
    tokenizer, corpora = inputs_stage(recipe)
    outcome = train_stage(recipe, tokenizer, corpora, resume=resume, force=force)
    if outcome.result is not None and outcome.result.interrupted:
        return {"interrupted": True, "step": outcome.result.state.step}
    if outcome.result is not None and not outcome.result.is_main:  # torchrun: rank 0 evaluates and reports
        return {}
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
