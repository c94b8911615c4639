"""What each pipeline stage bought and what it cost, measured on the same held-out data before and after it.

Per stage instance, `evaluate_stage` writes STAGE_DIR/eval.json:
- probes: the general corpora (the first pretraining stage's validation split by default) through the
  stage's final model: loss and perplexity, with bootstrap intervals; `before` is the same probe on the
  parent's final model (the stage's starting point; for a first stage that starts from a model folder,
  that folder), and the change gets a paired interval. A model
  whose head is not the probe's (a classifier after masked-LM pretraining) is measured with its body in
  the nearest ancestor's LM head: the question is what fine-tuning did to the body's knowledge.
- tasks: the stage's own held-out task, and every earlier task of its lineage that its head can still
  answer, before and after (classification: accuracy and macro-F1 with intervals, the examples flipped).
- baseline: for a classification stage, a k-shot baseline of the untuned starting model (in context for
  a causal LM, by prototypes for an encoder: eval/fewshot.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.config import ObjectiveConfig
from lmforge.data.formats import DataError, file_fingerprints
from lmforge.data.labeled import labeled_split
from lmforge.data.packing import PackedRows
from lmforge.data.prepare import retokenized
from lmforge.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from lmforge.engine.distributed import say
from lmforge.engine.runtime import pick_device, resolve_precision
from lmforge.eval.classification import one_class_verdict
from lmforge.eval.fewshot import baseline_inputs, recipe_baseline
from lmforge.eval.generation import held_out_answers
from lmforge.eval.intervals import (
    accuracy_change,
    bits_per_byte,
    bits_per_byte_change,
    perplexity_change,
    perplexity_interval,
    separated,
)
from lmforge.eval.leakage import describe, held_out_texts, stage_leakage
from lmforge.eval.perplexity import evaluate_loss
from lmforge.eval.suite import EVAL_FILE, log_evaluation, read_evaluation
from lmforge.models.factory import load_model, saved_config, saved_head
from lmforge.objectives import OBJECTIVES, get_objective, objective_data, objective_head
from lmforge.outputs import content_hash
from lmforge.pipeline_types import Pipeline, StageRun

LM_HEADS = ("causal_lm", "masked_lm")
TASK_DATA = ("labeled", "instructions", "preferences")


def probes(pipeline: Pipeline) -> list[dict]:
    """The general corpora measured at every stage: `general:` folders, else the first pretraining
    stage's main corpus, with that stage's objective and row length."""
    if not pipeline.forgetting_probes:
        return []
    first = next((r for r in pipeline.runs if r.evaluation is None and objective_data(r.recipe.objective) == "packed"
                  and objective_head(r.recipe.objective) in LM_HEADS), None)
    if first is None:
        return []
    r = first.recipe
    folders = pipeline.general or [str(r.data.mixture[0].prepared_dir if r.data.mixture and r.data.mixture[0].prepared_dir
                                       else (Path(r.output_dir) / f"data_{r.data.mixture[0].name}" if r.data.mixture
                                             else r.prepared_dir))]
    return [{"name": "general" if len(folders) == 1 else Path(f).name, "corpus": f,
             "objective": r.objective.model_dump(), "seq_len": r.packing.seq_len,
             "batch_size": r.trainer.batch_size, "batches": pipeline.eval_batches} for f in folders]


def read_eval(run: StageRun | None) -> dict:
    return read_evaluation(run.folder) if run is not None else {}


def _final(run: StageRun) -> Path:
    return run.folder / "final"


def _head(run: StageRun) -> str:
    return objective_head(run.recipe.objective)


def model_for_head(run: StageRun, head: str) -> torch.nn.Module | None:
    """The stage's final model with `head`: itself, or its body grafted into the nearest ancestor that
    has that head (None when no ancestor has it, or the bodies do not match)."""
    if _head(run) == head:
        return load_model(_final(run), head)
    donor = next((a for a in run.ancestors() if _head(a) == head), None)
    if donor is None:
        return None
    target = load_model(_final(donor), head)
    trained = load_model(_final(run), _head(run)).state_dict()
    state = target.state_dict()
    moved = {k: v for k, v in trained.items() if k in state and state[k].shape == v.shape}
    covered = sum(state[k].numel() for k in moved) / sum(v.numel() for v in state.values())
    if covered < 0.5:  # another architecture: nothing meaningful to measure
        return None
    target.load_state_dict(moved, strict=False)
    return target


def _probe(run: StageRun, probe: dict, device: torch.device, precision: str, start: bool = False) -> dict:
    """The probe through the stage's final model, or (`start`) through the model it started from."""
    folder = Path(run.recipe.model.path) if start else _final(run)
    head = objective_head(ObjectiveConfig.model_validate(probe["objective"]))
    if not start and all(_head(r) != head for r in [run, *run.ancestors()]):  # known before any text is read again
        return {"skipped": f"no {head} head in this stage's lineage to measure it with"}
    tokenizer = load_tokenizer(folder)
    try:  # a stage whose tokenizer differs (a vocabulary extension) reads the probe's text in its own tokens
        corpus = retokenized(probe["corpus"], tokenizer, run.folder.absolute() / f"probe_{'start_' if start else ''}{probe['name']}",
                             False, say)
    except DataError as exc:
        return {"skipped": str(exc)}
    objective = get_objective(ObjectiveConfig.model_validate(probe["objective"]), tokenizer)
    if start:
        model = load_model(folder, objective.head) if saved_head(folder) == objective.head else None
    else:
        model = model_for_head(run, objective.head)
    if model is None:
        return {"skipped": f"no {objective.head} head in this stage's lineage to measure it with"}
    model.to(device)
    rows = PackedRows(corpus.split("val"), objective.row_length(probe["seq_len"]))
    parts: list = []
    metrics = evaluate_loss(model, objective, rows, probe["batch_size"], probe["batches"], device, precision, parts=parts)
    metrics["ppl_ci"] = perplexity_interval(parts)
    metrics["parts"] = parts
    size = probe["batch_size"]
    metrics["bytes"] = [sum(len(tokenizer.decode(row).encode("utf-8"))
                            for row in rows.batch(list(range(b * size, min((b + 1) * size, len(rows)))))["input_ids"].tolist())
                        for b in range(len(parts))]
    metrics["bits_per_byte"] = bits_per_byte(parts, metrics["bytes"])
    metrics["tokenizer"] = tokenizer_fingerprint(tokenizer)
    return metrics


def _start_measured(run: StageRun) -> bool:
    """A first stage that starts from a model folder: its start is measured too (nothing before it was)."""
    start = Path(run.recipe.model.path) if run.recipe.model.path else None
    return run.parent is None and start is not None and (start / "config.json").is_file()


def _task_metrics(task: StageRun, run: StageRun, device: torch.device, precision: str) -> dict | None:
    """`task`'s held-out metrics of `run`'s final model (None when its head cannot answer that task)."""
    from lmforge.sources import training_source

    if _head(run) != _head(task) or objective_data(task.recipe.objective) == "preferences" and task is not run:
        return None  # another head; DPO's metric is relative to its own reference model
    if saved_config(_final(run)).id2label != saved_config(_final(task)).id2label:
        return None  # a classifier of other labels
    model = load_model(_final(run), _head(run))
    tokenizer = load_tokenizer(_final(run))
    objective = get_objective(task.recipe.objective, tokenizer)
    model.to(device)
    reference = None
    if getattr(objective, "needs_reference", False):
        if not task.recipe.model.path:
            return None  # no start model to compare against
        # DPO after training: the final model (adapters merged) against the stage's start, as in training;
        # taking the final model as its own reference would make every pair a tie
        reference = load_model(Path(task.recipe.model.path), "causal_lm").to(device)
    source = training_source(task.recipe, objective, tokenizer, {}, device, model, reference, held_out_only=True)
    if source["evaluate"] is None:
        return None
    if objective_data(task.recipe.objective) != "labeled":
        return source["evaluate"](model, precision)
    metrics = source["evaluate"](model, precision, detail=True)
    metrics["rows"] = content_hash(held_out_texts(task.recipe))  # which rows: only runs on the same are compared
    return metrics


def _flips(task: StageRun, before: dict, after: dict, limit: int = 5) -> dict:
    """Held-out examples right before the stage and wrong after it (and the reverse), with a few texts."""
    if "predicted" not in before or "predicted" not in after or len(before["actual"]) != len(after["actual"]):
        return {}
    right_b = [int(p == a) for p, a in zip(before["predicted"], before["actual"], strict=True)]
    right_a = [int(p == a) for p, a in zip(after["predicted"], after["actual"], strict=True)]
    lost = [i for i, (b, a) in enumerate(zip(right_b, right_a, strict=True)) if b and not a]
    gained = [i for i, (b, a) in enumerate(zip(right_b, right_a, strict=True)) if a and not b]
    cfg = task.recipe.data
    _, held_out, _ = labeled_split(cfg.train_files, cfg.column, cfg.label_column, cfg.labels, cfg.val_fraction,
                                   cfg.val_files, cfg.max_docs)
    texts = {i: held_out[i][0][:300] for i in lost[:limit] if i < len(held_out)}
    return {"lost": len(lost), "gained": len(gained), "accuracy_change": accuracy_change(right_b, right_a),
            "lost_examples": [{"index": i, "text": texts.get(i, ""), "label": after["actual"][i],
                               "predicted_after": after["predicted"][i]} for i in lost[:limit]]}


def _baseline(pipeline: Pipeline, run: StageRun, device: torch.device) -> dict:
    """The stage's few-shot baseline, or the same one another instance already scored: the same start model,
    shots and held-out rows give the same numbers, and the seeds of a branch (and the budgets of a curve,
    see baseline_inputs) share them (scoring 1,000 rows in context took minutes per instance)."""
    start = Path(run.recipe.model.path)
    inputs = baseline_inputs(run.recipe, start)
    key = content_hash({"model": file_fingerprints(sorted(p for p in start.iterdir() if p.is_file())), **inputs})
    for other in pipeline.runs:
        found = read_eval(other).get("baseline") or {} if other is not run else {}
        if found.get("key") == key:
            say(f"eval [{run.label}]: the few-shot baseline of {start} is {other.label}'s (the same model, shots and rows)")
            return found
    found = recipe_baseline(run.recipe, start, device, inputs=inputs)
    return {**found, "key": key} if found else found


def evaluate_stage(pipeline: Pipeline, run: StageRun, plan_key: str, force: bool = False) -> dict:
    """Measure the stage (see the module's docstring); reuses eval.json when nothing changed."""
    parent_eval = read_eval(run.parent)
    specs = probes(pipeline)
    key = content_hash([plan_key, parent_eval.get("key"), specs])
    existing = read_eval(run)
    if not force and existing.get("key") == key:
        return existing
    device = pick_device()
    precision = resolve_precision("auto", device)
    out: dict = {"stage": run.stage, "seed": run.seed, "label": run.label,
                 "parent": run.parent.label if run.parent else None, "key": key, "probes": {}, "tasks": {}}
    for spec in specs:
        after = _probe(run, spec, device, precision)
        entry = {"after": after}
        before = parent_eval.get("probes", {}).get(spec["name"], {}).get("after")
        if before is None and "parts" in after and _start_measured(run):
            before = _probe(run, spec, device, precision, start=True)
        if "skipped" in after:
            say(f"forgetting [{run.label}]: {spec['name']} not measured: {after['skipped']}")
        if before and "parts" in before and "parts" in after:
            entry["before"] = before
            if before.get("tokenizer") == after.get("tokenizer"):
                entry["change"] = perplexity_change(before["parts"], after["parts"])
                shown = f"perplexity {before['ppl']:.1f} -> {after['ppl']:.1f}"
            else:  # per token means another thing under another tokenizer: per byte of the same text
                entry["change"] = bits_per_byte_change(before["parts"], before.get("bytes") or [], after["parts"],
                                                       after["bytes"]) if before.get("bytes") else {}
                shown = (f"bits/byte {before['bits_per_byte']:.3f} -> {after['bits_per_byte']:.3f} (tokenizers differ)"
                         if "bits_per_byte" in before else "")
            change = entry["change"]
            if change:
                say(f"forgetting [{run.label}]: {spec['name']} {shown} ({change['relative_change']:+.1%}"
                    + (f", 95% CI {change['ci'][0]:+.1%}..{change['ci'][1]:+.1%}" if change.get("ci") else "") + ")")
        out["probes"][spec["name"]] = entry
    lineage = [run, *run.ancestors()]
    for task in lineage:
        if objective_data(task.recipe.objective) not in TASK_DATA:
            continue
        after = _task_metrics(task, run, device, precision)
        if after is None:
            continue
        entry = {"after": after}
        before = parent_eval.get("tasks", {}).get(task.stage, {}).get("after") if task is not run else None
        if before:
            entry["before"] = before
            entry["flips"] = _flips(task, before, after)
            change = entry["flips"].get("accuracy_change", {})
            if change:
                say(f"forgetting [{run.label}]: task {task.stage} accuracy {before['accuracy']:.3f} -> "
                    f"{after['accuracy']:.3f} ({change['change']:+.3f}"
                    + (f", 95% CI {change['ci'][0]:+.3f}..{change['ci'][1]:+.3f}" if change.get("ci") else "") + ")")
        out["tasks"][task.stage] = entry
    mine = out["tasks"].get(run.stage, {}).get("after", {})
    if objective_data(run.recipe.objective) == "labeled" and mine:
        id2label = saved_config(_final(run)).id2label
        verdict = one_class_verdict(mine, [id2label[i] for i in sorted(id2label)])
        if verdict:
            out["health"] = [verdict]
            say(f"warning [{run.label}]: the classifier {verdict}")
    if objective_data(run.recipe.objective) == "labeled":  # held-out rows some stage behind this one trained on
        out["leakage"] = stage_leakage(run.recipe, [(r.stage, r.recipe) for r in reversed([run, *run.ancestors()])])
        for line in describe(out["leakage"]):
            say(f"warning [{run.label}]: leakage: {line}")
    if objective_data(run.recipe.objective) == "labeled" and run.recipe.model.path:
        out["baseline"] = _baseline(pipeline, run, device)
        if mine and out["baseline"]:
            b = out["baseline"]
            say(f"eval [{run.label}]: accuracy {mine['accuracy']:.3f} (macro-F1 {mine['macro_f1']:.3f}) vs "
                f"{b['shots']}-shot baseline of the untuned model {b['accuracy']:.3f} (macro-F1 {b['macro_f1']:.3f})"
                + ("" if not (mine.get("accuracy_ci") and b.get("accuracy_ci")) else
                   "; the difference is " + ("larger" if separated(mine["accuracy_ci"], b["accuracy_ci"]) else "not larger")
                   + " than the intervals"))
    # kto's answers are marked one by one: no rejected answer to hold a generated one against
    unpaired = getattr(OBJECTIVES[run.recipe.objective.name], "unpaired", False)
    if objective_data(run.recipe.objective) == "instructions" or (
            objective_data(run.recipe.objective) == "preferences" and _head(run) == "causal_lm" and not unpaired):
        # answers before and after, against references (a preference stage's: its chosen answers)
        start = Path(run.recipe.model.path) if run.recipe.model.path else None
        out["generation"] = {"after": held_out_answers(run.recipe, _final(run), device, pipeline.generation_examples)}
        if start is not None and (start / "config.json").is_file():
            out["generation"]["before"] = held_out_answers(run.recipe, start, device, pipeline.generation_examples)
        g = out["generation"]
        if g["after"]:
            say(f"eval [{run.label}]: held-out answers ROUGE-L " + (f"{g['before']['rouge_l']:.3f} -> " if g.get("before") else "")
                + f"{g['after']['rouge_l']:.3f}, exact match "
                + (f"{g['before']['exact_match']:.3f} -> " if g.get("before") else "") + f"{g['after']['exact_match']:.3f}"
                + ("" if "closer_to_chosen" not in g["after"] else ", nearer the chosen than the rejected answer "
                   + (f"{g['before']['closer_to_chosen']:.3f} -> " if g.get("before") else "")
                   + f"{g['after']['closer_to_chosen']:.3f}"))
    summary = run.folder / "summary.json"
    out["summary"] = json.loads(summary.read_text()) if summary.is_file() else {}
    (run.folder / EVAL_FILE).write_text(json.dumps(out, indent=1))
    log_evaluation(run.folder, out, {"stage": run.label})
    return out

