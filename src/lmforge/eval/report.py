"""`lmforge report DIR... -o report.html`: one self-contained page comparing runs and pipeline stages.

It reads what the runs wrote (pipeline.json, each stage's eval.json, summary.json, metrics.jsonl and
recipe.yaml), draws the plots with matplotlib into embedded PNGs (nothing is fetched at view time) and
lays out: stage cards, loss and validation curves on shared axes, the task table with intervals and
the few-shot baseline, the forgetting table, branches compared over seeds, config differences and
sample generations.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmforge.config import flatten
from lmforge.engine.metrics import read_metrics
from lmforge.engine.status import read_status, run_state
from lmforge.eval.intervals import excludes_zero, paired_branch_difference, separated, two_level_interval
from lmforge.outputs import STAMP, run_recipe_file
from lmforge.run_keys import naming_keys


class ReportError(ValueError):
    """A folder that holds no run lmforge wrote."""


@dataclass
class RunView:
    label: str
    folder: Path
    stage: str
    seed: int | None = None
    parent: str | None = None
    evaluation: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    objective: str = ""
    method: str = ""
    kind: str = "train"  # or "eval": an eval stage / `lmforge eval -o` folder (eval.json only)
    point: dict = field(default_factory=dict)  # a pipeline matrix's values for this instance (recipe key -> value)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_view(folder: Path, label: str, stage: str, seed: int | None = None, parent: str | None = None) -> RunView:
    recipe_file = run_recipe_file(folder)
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file else {}
    metrics = folder / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    summary = _json(folder / "summary.json")
    return RunView(label, folder, stage, seed, parent, _json(folder / "eval.json"), summary,
                   [r for r in records if r.get("split") == "train"], [r for r in records if r.get("split") == "val"],
                   flatten(recipe), (recipe.get("objective") or {}).get("name", ""), (recipe.get("method") or {}).get("name", ""))


def collect(folders: list[Path]) -> tuple[str, list[RunView]]:
    """Every run under the given folders: a pipeline's stage instances, or single run folders."""
    runs: list[RunView] = []
    names = []
    for folder in folders:
        layout = _json(folder / "pipeline.json")
        if layout.get("writer") == "lmforge":
            names.append(layout.get("name", folder.name))
            prefix = f"{layout.get('name', folder.name)}:" if len(folders) > 1 else ""
            for s in layout["stages"]:
                parent = prefix + s["parent"] if s["parent"] else None
                if s.get("kind") == "eval" and (folder / s["folder"] / "eval.json").is_file():
                    runs.append(RunView(prefix + s["label"], folder / s["folder"], prefix + s["stage"], s["seed"], parent,
                                        _json(folder / s["folder"] / "eval.json"), kind="eval"))
                elif (folder / s["folder"] / "summary.json").is_file():
                    runs.append(run_view(folder / s["folder"], prefix + s["label"], prefix + s["stage"], s["seed"], parent))
                    runs[-1].point = s.get("point") or {}
        elif run_recipe_file(folder) or (folder / "summary.json").is_file():
            names.append(folder.name)
            runs.append(run_view(folder, folder.name, folder.name))
        elif _json(folder / "eval.json").get("writer") == "lmforge":
            names.append(folder.name)
            runs.append(RunView(folder.name, folder, folder.name, evaluation=_json(folder / "eval.json"), kind="eval"))
        else:
            raise ReportError(f"{folder}: neither a pipeline folder (pipeline.json), a run folder (recipe.yaml) nor an "
                              "evaluation (eval.json of `lmforge eval -o`)")
    if not runs:
        raise ReportError(f"{', '.join(map(str, folders))}: no finished run to report on")
    return " vs ".join(names), runs


# ---------------------------------------------------------------- plots
def _pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed), imported when a report is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _curves(runs: list[RunView], split: str) -> str | None:
    """One panel per objective, every run of it on the same axes."""
    plt = _pyplot()

    groups: dict[str, list[RunView]] = {}
    for r in runs:
        records = r.train if split == "train" else r.val
        if any(_loss(rec) is not None for rec in records):
            groups.setdefault(r.objective or "run", []).append(r)
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.6), squeeze=False)
    for ax, (objective, members) in zip(axes[0], groups.items(), strict=True):
        for r in members:
            records = r.train if split == "train" else r.val
            points = [(rec["step"], _loss(rec)) for rec in records if _loss(rec) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 12 else None,
                    markersize=3, label=r.label)
        ax.set_title(f"{objective}: {'training' if split == 'train' else 'validation'} loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def _loss(record: dict) -> float | None:
    if "loss" in record:
        return record["loss"]
    losses = [v for k, v in record.items() if k.endswith("_loss") and isinstance(v, (int, float))]
    return statistics.fmean(losses) if losses else None


def _branch_plot(groups: list[dict]) -> str | None:
    plt = _pyplot()

    rows = [g for g in groups if g["accuracy"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(rows), 3.4))
    x = range(len(rows))
    means = [statistics.fmean(g["accuracy"]) for g in rows]
    spread = [statistics.stdev(g["accuracy"]) if len(g["accuracy"]) > 1 else 0 for g in rows]
    ax.bar(x, means, yerr=spread, capsize=4, color="#4c78a8", label="fine-tuned (mean ± sd over seeds)")
    base = [statistics.fmean(g["baseline"]) if g["baseline"] else None for g in rows]
    ax.scatter([i for i, b in zip(x, base, strict=True) if b is not None], [b for b in base if b is not None],
               color="#e45756", marker="_", s=600, linewidths=3, label="few-shot baseline", zorder=3)
    ax.set_xticks(list(x), [g["stage"] for g in rows])
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _learning_curves(groups: list[dict]) -> str | None:
    """Each branch's held-out accuracy against the value its matrix varied (a label budget, a learning rate),
    with a 95% band (examples and seeds resampled) and the few-shot baseline of its start model dashed."""
    plt = _pyplot()

    curves: dict[tuple[str, str], list[dict]] = {}
    for g in groups:
        if len(g["point"]) == 1 and g["accuracy"] and isinstance(next(iter(g["point"].values())), (int, float)):
            curves.setdefault((g["branch"], next(iter(g["point"]))), []).append(g)
    curves = {k: v for k, v in curves.items() if len(v) >= 2}
    if not curves:
        return None
    keys = sorted({key for _, key in curves})
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for (branch, k), members in curves.items():
            if k != key:
                continue
            members = sorted(members, key=lambda g: g["point"][key])
            x = [g["point"][key] for g in members]
            y = [statistics.fmean(g["accuracy"]) for g in members]
            line = ax.plot(x, y, marker="o", label=branch)[0]
            bands = [two_level_interval(g["correct"]) if g["correct"] and len({len(c) for c in g["correct"]}) == 1
                     else None for g in members]
            if all(bands):
                ax.fill_between(x, [b[0] for b in bands], [b[1] for b in bands], color=line.get_color(), alpha=0.15)
            base = [statistics.fmean(g["baseline"]) if g["baseline"] else None for g in members]
            if all(b is not None for b in base):
                ax.plot(x, base, linestyle="--", color=line.get_color(), alpha=0.7, label=f"{branch}: few-shot baseline")
        values = [g["point"][key] for (_, k), members in curves.items() if k == key for g in members]
        if min(values) > 0 and max(values) >= 8 * min(values):  # budgets of 64 ... 4,096: even steps apart
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("held-out accuracy (mean over seeds, 95% band)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


# ---------------------------------------------------------------- tables
def _bits_per_byte(runs: list[RunView]) -> str | None:
    """Each general corpus in bits per byte (comparable across tokenizers): the start model of the first
    stages, then each stage's mean over its instances; a vocabulary extension cannot hide what it costs."""
    plt = _pyplot()

    measured: dict[str, dict[str, list[float]]] = {}  # probe -> stage (or "start") -> bits/byte
    for r in runs:
        for name, probe in r.evaluation.get("probes", {}).items():
            after, before = probe.get("after") or {}, probe.get("before") or {}
            if "bits_per_byte" in after:
                measured.setdefault(name, {}).setdefault(r.stage, []).append(after["bits_per_byte"])
            if r.parent is None and "bits_per_byte" in before:  # a first stage's start model
                measured.setdefault(name, {}).setdefault("start", []).append(before["bits_per_byte"])
    if not measured:
        return None
    stages = list(dict.fromkeys(s for by_stage in measured.values() for s in sorted(by_stage, key=lambda k: k != "start")))
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(stages) * len(measured) / 2, 3.4))
    width = 0.8 / len(stages)
    for i, stage in enumerate(stages):
        xs = [j + i * width for j, by_stage in enumerate(measured.values()) if stage in by_stage]
        ys = [statistics.fmean(by_stage[stage]) for by_stage in measured.values() if stage in by_stage]
        ax.bar(xs, ys, width, label=stage)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(measured))], list(measured))
    ax.set_ylabel("bits per byte (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _vocabulary(runs: list[RunView]) -> str:
    """Each vocabulary extension: what it added and the tokens per character of held-out domain text."""
    rows = []
    for r in runs:
        stamp = _json(r.folder / "tokenizer" / STAMP)  # the extended tokenizer a stage wrote
        per_char = stamp.get("tokens_per_char") or {}
        if not stamp.get("new_tokens"):
            continue
        before, after = per_char.get("before"), per_char.get("after")
        rows.append([html.escape(r.label), html.escape(str(stamp.get("base", "–"))), f"{len(stamp['new_tokens']):,}",
                     "merged BPE pieces" if stamp.get("new_pieces") is not None else "added words",
                     _fmt(before), _fmt(after), f"{before / after:.2f}×" if before and after else "–",
                     _fmt(per_char.get("held_out_docs"))])
    if not rows:
        return "<p>No stage extended its tokenizer.</p>"
    return _table(["run", "base tokenizer", "new tokens", "kind", "tokens/char before", "tokens/char after", "fewer by",
                   "held-out documents"], rows, "vocabulary")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _ci(ci) -> str:
    return f" <span class=ci>[{_fmt(ci[0])}, {_fmt(ci[1])}]</span>" if ci else ""


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


TASK_OBJECTIVES = ("classify", "reward", "dpo", "simpo", "orpo", "kto")  # example-level tasks with an accuracy


def _task(r: RunView) -> dict:
    """The run's own held-out task metrics (none for pretraining: its accuracy is of masked tokens)."""
    if r.objective not in TASK_OBJECTIVES:
        return {}
    own = r.evaluation.get("tasks", {}).get(r.stage.split(":")[-1], {}).get("after")
    return own or r.summary.get("eval") or {}


def _state(run: RunView) -> str:
    """How far a run without a summary has got: its status, and its step where it is training."""
    status = read_status(run.folder)
    state = run_state(run.folder)
    if state in ("running", "interrupted") and status.get("total_steps"):
        return f"{state}, step {status.get('step', 0)} of {status['total_steps']}"
    return state if state != "unknown" else "not started"


def _cards(runs: list[RunView]) -> str:
    rows = []
    for r in runs:
        t = r.summary.get("train", {})
        params, trainable = t.get("parameters"), t.get("trainable")
        best = _task(r) or r.summary.get("eval") or {}
        shown = ", ".join(f"{k} {_fmt(best[k])}" for k in ("accuracy", "macro_f1", "ppl", "loss") if k in best)
        if r.objective in ("grpo", "ppo"):  # the verdicts the run was held to (objectives/policy.py)
            rules = [f"{k} {r.settings.get(f'objective.{k}')}" for k in ("max_kl", "max_flat_steps")
                     if r.objective == "grpo" or k == "max_kl"]
            shown += ("; " if shown else "") + "run health: " + ", ".join(
                rule.replace(" None", " off") for rule in rules)
        for verdict in r.evaluation.get("health") or []:  # e.g. a classifier that predicts one class for every row
            shown += ("; " if shown else "") + f"<strong class=warning>run health: {html.escape(verdict)}</strong>"
        rows.append([html.escape(r.label), html.escape(r.parent or "–"), html.escape(r.objective), html.escape(r.method),
                     _fmt(params), f"{trainable / params:.1%}" if params and trainable else "–", _fmt(t.get("tokens")),
                     _fmt(t.get("seconds"), 1) if t and run_state(r.folder) != "running" else _state(r),
                     _fmt(t.get("tokens_per_second")),
                     f"{t['mfu']:.1%}" if t.get("mfu") is not None else "–", _fmt(t.get("peak_memory_mb")),
                     html.escape(str(t.get("precision") or "–")), shown])
    return _table(["run", "after", "objective", "method", "parameters", "trainable", "tokens", "wall s", "tokens/s",
                   "MFU (vs measured matmul peak)", "peak MB (process)", "precision", "final held-out"], rows, "cards")


def _task_table(runs: list[RunView]) -> str:
    rows = []
    for r in runs:
        t = _task(r)
        if "accuracy" not in t and "macro_f1" not in t:
            continue
        b = r.evaluation.get("baseline") or {}
        beat = ""
        if t.get("accuracy_ci") and b.get("accuracy_ci"):
            beat = {1: "yes", -1: "no (worse)", 0: "not beyond the intervals"}[separated(t["accuracy_ci"], b["accuracy_ci"])]
        rows.append([html.escape(r.label), _fmt(t.get("accuracy")) + _ci(t.get("accuracy_ci")),
                     _fmt(t.get("macro_f1")) + _ci(t.get("macro_f1_ci")), _fmt(t.get("tokens")),
                     _fmt(b.get("accuracy")) + _ci(b.get("accuracy_ci")) if b else "–",
                     _fmt(b.get("macro_f1")) if b else "–", beat or "–", _leakage(r.evaluation.get("leakage"))])
    if not rows:
        return "<p>No stage with a held-out task metric.</p>"
    return _table(["run", "accuracy [95% CI]", "macro-F1 [95% CI]", "held-out examples", "few-shot baseline accuracy",
                   "baseline macro-F1", "beat the baseline?", "held-out rows seen in training"], rows, "tasks")


def _leakage(note: dict | None) -> str:
    """Where held-out rows were found in training text (eval/leakage.py): the share, per source."""
    if not note:
        return "–"
    found = [(name, s) for name, s in note.get("sources", {}).items() if s["rows"]]
    if not found:
        return f"none (of {note['held_out']:,}, checked against {len(note.get('sources', {}))} source(s))"
    return "<br>".join(f"<strong class=warning>{s['share']:.0%}</strong> ({s['rows']:,}) in {html.escape(name)}"
                       for name, s in found)


def _forgetting_table(runs: list[RunView]) -> str:
    rows = []
    for r in runs:
        for name, probe in r.evaluation.get("probes", {}).items():
            change = probe.get("change") or {}
            before, after = probe.get("before", {}), probe.get("after", {})
            if "skipped" in after:
                rows.append([html.escape(r.label), html.escape(f"{name} perplexity"), "–", "–", "–",
                             html.escape(after["skipped"])])
                continue
            rel = change.get("relative_change")
            per_byte = "bits per byte" in change.get("measure", "")  # the tokenizers differ: per byte, not token
            unit, key, digits = ("bits/byte", "bits_per_byte", 3) if per_byte else ("perplexity", "ppl", 1)
            rows.append([html.escape(r.label), html.escape(f"{name} {unit}"), _fmt(before.get(key), digits),
                         _fmt(after.get(key), digits),
                         (f"{rel:+.1%}" if rel is not None else "–")
                         + (f" <span class=ci>[{change['ci'][0]:+.1%}, {change['ci'][1]:+.1%}]</span>" if change.get("ci") else ""),
                         "beyond the interval" if excludes_zero(change.get("ci")) else ("within the interval" if change else "")])
        for task, entry in r.evaluation.get("tasks", {}).items():
            flips = entry.get("flips") or {}
            if not flips:
                continue
            change = flips.get("accuracy_change", {})
            rows.append([html.escape(r.label), html.escape(f"task {task} accuracy"), _fmt(entry["before"].get("accuracy")),
                         _fmt(entry["after"].get("accuracy")),
                         f"{change.get('change', 0):+.3f}" + _ci(change.get("ci")),
                         f"{flips['lost']} right before and wrong after, {flips['gained']} the reverse"])
    if not rows:
        return "<p>No stage measured before and after (a single run, or a pipeline without a general corpus).</p>"
    return _table(["run", "measured on", "before", "after", "change [95% CI]", "verdict"], rows, "forgetting")


def _generation_table(runs: list[RunView]) -> str:
    rows = []
    for r in runs:
        g = r.evaluation.get("generation") or {}
        after, before = g.get("after") or {}, g.get("before") or {}
        if not after:
            continue
        def cell(m: dict, key: str) -> str:
            return _fmt(m.get(key)) + _ci(m.get(f"{key}_ci")) if m else "–"
        rows.append([html.escape(r.label), cell(before, "rouge_l"), cell(after, "rouge_l"), cell(before, "exact_match"),
                     cell(after, "exact_match"), _fmt(before.get("chrf"), 1) if before else "–", _fmt(after.get("chrf"), 1),
                     _fmt(after.get("examples"))])
    # an instruction-tuning stage still training or being evaluated: said so, not "none"
    rows += [[html.escape(r.label), *["–"] * 6, f"not evaluated yet ({_state(r)})"] for r in runs
             if r.objective == "sft" and not (r.evaluation.get("generation") or {}).get("after")]
    if not rows:
        return "<p>No instruction-tuning stage.</p>"
    return _table(["run", "ROUGE-L before", "ROUGE-L after", "exact match before", "exact match after", "chrF before",
                   "chrF after", "held-out prompts"], rows, "generation")


def branch_groups(runs: list[RunView]) -> list[dict]:
    """Per stage (and matrix point): the task metrics and the general-perplexity change of each of its seeds."""
    groups: dict[str, dict] = {}
    for r in runs:
        name = r.stage + "".join(f" {key.rsplit('.', 1)[-1]}={value}" for key, value in r.point.items())
        g = groups.setdefault(name, {"stage": name, "branch": r.stage, "point": r.point, "accuracy": [], "macro_f1": [],
                                     "baseline": [], "ppl_change": [], "seconds": [], "seeds": [], "correct": [],
                                     "rows": set()})
        t = _task(r)
        if "accuracy" in t:
            g["accuracy"].append(t["accuracy"])
            g["macro_f1"].append(t.get("macro_f1", float("nan")))
            if t.get("predicted") is not None and t.get("actual") is not None:  # each example right or wrong
                g["correct"].append([int(p == a) for p, a in zip(t["predicted"], t["actual"], strict=True)])
            g["rows"].add(t.get("rows"))
        if (r.evaluation.get("baseline") or {}).get("accuracy") is not None:
            g["baseline"].append(r.evaluation["baseline"]["accuracy"])
        for probe in r.evaluation.get("probes", {}).values():
            if (probe.get("change") or {}).get("relative_change") is not None:
                g["ppl_change"].append(probe["change"]["relative_change"])
        g["seconds"].append(r.summary.get("train", {}).get("seconds") or 0.0)
        g["seeds"].append(r.seed)
    return list(groups.values())


def _mean_sd(values: list[float], pct: bool = False) -> str:
    values = [v for v in values if v == v]  # a metric a run did not report is NaN, not a number
    if not values:
        return "–"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.1%} ± {sd:.1%}" if pct else f"{mean:.3f} ± {sd:.3f}"


def _branches(groups: list[dict]) -> str:
    rows = [[html.escape(g["stage"]), str(len(g["seeds"])), _mean_sd(g["accuracy"]), _mean_sd(g["macro_f1"]),
             _mean_sd(g["baseline"]), _mean_sd(g["ppl_change"], pct=True), f"{sum(g['seconds']):.0f}"] for g in groups]
    table = _table(["stage", "runs", "accuracy (mean ± sd)", "macro-F1 (mean ± sd)", "few-shot baseline",
                    "general perplexity change", "wall s (all seeds)"], rows, "branches")
    tasks = [g for g in groups if g["correct"] and len(g["correct"]) == len(g["accuracy"])]
    verdicts = []
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            verdicts.append(f"<li>{html.escape(b['stage'])} − {html.escape(a['stage'])}: {_compared(a, b)}</li>")
    return table + (f"<ul class=verdicts>{''.join(verdicts)}</ul>" if verdicts else "")


def _compared(a: dict, b: dict) -> str:
    """Branch b against branch a, only where both were scored on the same held-out rows: their difference
    with a paired two-level bootstrap interval (rows shared, seeds within each branch) and a paired
    t-interval over seeds."""
    same = len(a["rows"] | b["rows"]) == 1 and None not in a["rows"] and len(a["correct"][0]) == len(b["correct"][0])
    if not same:
        return "not compared: scored on different held-out rows (or rows not recorded)"
    d = paired_branch_difference(a["correct"], b["correct"])
    ci, t_ci = d["ci"], d.get("t_ci")
    text = (f"accuracy {d['difference']:+.3f}, paired two-level bootstrap 95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}] over "
            f"{d['examples']:,} shared held-out rows and {d['seeds'][0]} + {d['seeds'][1]} seeds: "
            + ("larger than the interval" if excludes_zero(ci) else "not larger than the interval"))
    if t_ci:
        text += f"; paired t over seeds [{t_ci[0]:+.3f}, {t_ci[1]:+.3f}]"
    if min(d["seeds"]) < 5:
        text += f" (with {min(d['seeds'])} seed{'s' if min(d['seeds']) > 1 else ''} the seeds' share of the interval is itself uncertain)"
    return text


def _suites(suites: list[RunView]) -> str:
    """Eval stages and `lmforge eval` folders: every corpus and task they measured, with intervals."""
    rows = []
    for r in suites:
        e = r.evaluation
        where = f"{html.escape(r.label)}<br><span class=ci>{html.escape(Path(e.get('model', '')).name)} ({html.escape(e.get('head', ''))})</span>"
        for name, probe in e.get("probes", {}).items():
            m = probe["after"]
            rows.append([where, html.escape(f"{name} perplexity"), html.escape(m["skipped"]) if "skipped" in m
                         else _fmt(m.get("ppl"), 2) + _ci(m.get("ppl_ci")), "–", _fmt(m.get("tokens")) + " tokens" if "tokens" in m else "–"])
        for name, entry in e.get("tasks", {}).items():
            m, b = entry["after"], entry.get("baseline") or {}
            if "skipped" in m:
                rows.append([where, html.escape(f"task {name}"), html.escape(m["skipped"]), "–", "–"])
            elif entry.get("kind") == "preferences":
                rows.append([where, html.escape(f"task {name} preference accuracy (ties)"),
                             _fmt(m["accuracy"]) + _ci(m.get("accuracy_ci")) + f" ({_fmt(m.get('ties'))})", "–",
                             _fmt(m.get("pairs")) + f" pairs, by {html.escape(m.get('scored_by', ''))}"])
            elif "accuracy" in m:
                rows.append([where, html.escape(f"task {name} accuracy / macro-F1"),
                             _fmt(m["accuracy"]) + _ci(m.get("accuracy_ci")) + " / " + _fmt(m.get("macro_f1")),
                             (_fmt(b.get("accuracy")) + _ci(b.get("accuracy_ci")) + f" <span class=ci>{html.escape(b.get('kind', ''))}</span>") if b else "–",
                             _fmt(m.get("examples")) + " examples"])
            else:
                rows.append([where, html.escape(f"task {name} ROUGE-L / exact match / chrF"),
                             f"{_fmt(m.get('rouge_l'))}{_ci(m.get('rouge_l_ci'))} / {_fmt(m.get('exact_match'))} / {_fmt(m.get('chrf'), 1)}",
                             "–", _fmt(m.get("examples")) + " answers"])
    return _table(["evaluation (model)", "measured", "result [95% CI]", "baseline", "on"], rows, "suites")


def _models_compared(suites: list[RunView]) -> str:
    """Standalone evaluations of several models (`lmforge eval -o` of a base, then of its tuned model), each
    against the first, task by task: accuracy paired on the rows both scored (the same labels in the same
    order), with a bootstrap interval over those rows; perplexity before and after on each corpus both measured."""
    if len(suites) < 2:
        return ""
    first, rows = suites[0], []
    for other in suites[1:]:
        pair = f"{html.escape(first.label)} → {html.escape(other.label)}"
        for name, entry in other.evaluation.get("tasks", {}).items():
            a = (first.evaluation.get("tasks", {}).get(name) or {}).get("after") or {}
            b = entry.get("after") or {}
            if "accuracy" not in a or "accuracy" not in b:
                continue
            if not a.get("actual") or a.get("actual") != b.get("actual"):
                rows.append([pair, html.escape(f"task {name} accuracy"), f"{_fmt(a['accuracy'])} → {_fmt(b['accuracy'])}",
                             "not paired: scored on different rows", "–"])
                continue
            correct = [[int(p == t) for p, t in zip(m["predicted"], m["actual"], strict=True)] for m in (a, b)]
            d = paired_branch_difference(correct[:1], correct[1:])
            verdict = "larger than the interval" if excludes_zero(d["ci"]) else "not larger than the interval"
            rows.append([pair, html.escape(f"task {name} accuracy"), f"{_fmt(a['accuracy'])} → {_fmt(b['accuracy'])}",
                         f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], {verdict}",
                         f"{d['examples']:,} shared rows"])
        for name, probe in other.evaluation.get("probes", {}).items():
            a = (first.evaluation.get("probes", {}).get(name) or {}).get("after") or {}
            b = probe.get("after") or {}
            if a.get("ppl") and b.get("ppl"):
                rows.append([pair, html.escape(f"{name} perplexity"), f"{_fmt(a['ppl'], 2)} → {_fmt(b['ppl'], 2)}",
                             f"{(b['ppl'] / a['ppl'] - 1) * 100:+.1f}%", "–"])
    if not rows:
        return "<p>No task or corpus measured by the first evaluation and a later one.</p>"
    return _table(["models (first → later)", "measured", "before → after", "change [paired 95% CI]", "on"], rows,
                  "models-compared")


# method.SECTION.* is read only by the methods named here
METHOD_SECTIONS = {"lora": ("lora",), "adapter": ("adapter",), "ia3": ("ia3",), "llrd": ("llrd",),
                   "prompt": ("prompt_tuning", "prefix_tuning", "p_tuning")}
TOKENIZER_TRAINING = ("kind", "vocab_size", "min_frequency", "num_sentinels", "max_docs", "column")


def unused_settings(settings: dict) -> set[str]:
    """The recipe keys this run's choices leave unread, though the saved recipe lists their defaults: the
    tokenizer-training keys of a run that loads its tokenizer, the architecture keys of a run that loads its
    model, the extension keys without an extension, other methods' sections."""
    def unread(key: str) -> bool:
        section, _, rest = key.partition(".")
        name = rest.partition(".")[0]
        if section == "tokenizer":
            return ((name in TOKENIZER_TRAINING and not settings.get("tokenizer.train_files"))
                    or (name.startswith("extend_") and not settings.get("tokenizer.extend_count")))
        if section == "model":
            return name in ("family", "preset", "overrides") and bool(settings.get("model.path"))
        return section == "method" and name in METHOD_SECTIONS and settings.get("method.name") not in METHOD_SECTIONS[name]

    return {key for key in settings if unread(key)}


def _config_diff(runs: list[RunView]) -> str:
    keys = sorted({k for r in runs for k in r.settings})
    naming = naming_keys()  # the run's name and folder differ by design
    unread = set.intersection(*(unused_settings(r.settings) for r in runs)) if runs else set()  # unread by every run
    varying = [k for k in keys if len({json.dumps(r.settings.get(k), sort_keys=True, default=str) for r in runs}) > 1
               and k not in naming and k not in unread]
    if not varying:
        return "<p>All runs share one configuration.</p>"
    rows = [[html.escape(k)] + [_fmt(r.settings.get(k)) for r in runs] for k in varying]
    return _table(["setting"] + [r.label for r in runs], rows, "config")


def _samples(runs: list[RunView]) -> str:
    with_samples = [r for r in runs if r.summary.get("samples")]
    if not with_samples:
        return "<p>No sample generations (no causal-LM stage).</p>"
    prompts = list(dict.fromkeys(p for r in with_samples for p in r.summary["samples"]))
    rows = [[html.escape(p)] + [html.escape(r.summary["samples"].get(p, "–")) for r in with_samples] for p in prompts]
    return _table(["prompt"] + [r.label for r in with_samples], rows, "samples")


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f4f4f4} .ci{color:#777;font-size:11px} img{max-width:100%;border:1px solid #eee}
.meta{color:#666;font-size:12px}
"""

# The page marks itself once every plot has decoded, so a headless browser (and a person) can tell.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img.plot'));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-plots', imgs.length);
  document.body.setAttribute('data-plots-rendered', ok);
});
"""


def render(folders: list[Path]) -> str:
    from lmforge.engine.runtime import bf16_matmul_speedup

    title, everything = collect(folders)
    runs = [r for r in everything if r.kind == "train"]
    suites = [r for r in everything if r.kind == "eval"]
    groups = branch_groups(runs)
    plots = [("Training loss", _curves(runs, "train")), ("Validation loss", _curves(runs, "val")),
             ("Task accuracy by stage", _branch_plot(groups)),
             ("Learning curves: accuracy against the varied setting", _learning_curves(groups)),
             ("General corpora in bits per byte: the start model, then each stage", _bits_per_byte(runs))]
    figures = "".join(f"<figure><img class=plot alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
                      f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, data in plots if data)
    machine = f"{platform.processor() or platform.machine()}, {_cpu_name()}; bf16/fp32 GEMM speed {bf16_matmul_speedup():.2f}×"
    return f"""<!doctype html><html><head><meta charset=utf-8><title>lmforge report: {html.escape(title)}</title>
<style>{STYLE}</style><script>{CHECK_SCRIPT}</script></head><body>
<h1>lmforge report: {html.escape(title)}</h1>
<p class=meta>{len(runs)} run(s), {len(suites)} evaluation(s); reported on {html.escape(machine)}</p>
<h2>Stages</h2>{_cards(runs)}
<h2>Branches compared</h2>{_branches(groups)}
<h2>Held-out task metrics</h2>{_task_table(runs)}
<h2>Generated answers (greedy, against held-out references)</h2>{_generation_table(runs)}
<h2>Forgetting</h2>{_forgetting_table(runs)}
<h2>Vocabulary extensions</h2>{_vocabulary(runs)}
{f"<h2>Evaluations</h2>{_suites(suites)}" if suites else ""}
{f"<h2>Models compared on the same rows</h2>{_models_compared(suites)}" if len(suites) > 1 else ""}
<h2>Curves</h2>{figures}
<h2>Configuration differences</h2>{_config_diff(runs)}
<h2>Sample generations</h2>{_samples(runs)}
</body></html>"""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def write_report(folders: list[Path], out: Path) -> Path:
    from lmforge.outputs import OutputError

    if out.exists() and out.is_file() and b"lmforge report" not in out.read_bytes()[:4096]:
        raise OutputError(f"{out}: exists and is not an lmforge report; choose another -o")
    page = render(folders)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
