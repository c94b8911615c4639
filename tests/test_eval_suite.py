"""The evaluation suite (`lmforge eval`, eval stages): named corpora on full and adapter folders against
plain transformers/peft, classification task files against scikit-learn, the in-context baseline against
lm-eval's log-likelihoods, generation tasks, reuse, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from typer.testing import CliRunner

from lmforge.cli import app


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def fp32(monkeypatch):
    """References are computed in fp32: the suite's `auto` precision must be fp32 too."""
    monkeypatch.setenv("LMFORGE_AUTO_PRECISION", "fp32")


def _reference_ppl(model, rows, batches: int, batch_size: int) -> float:
    """Token-weighted perplexity of plain transformers' own causal-LM loss over the first rows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in range(min(len(rows), batches * batch_size)):
            ids = torch.tensor(rows.row(r)[0].astype(np.int64))[None]
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return float(np.exp(total / count))


def test_named_corpora_of_a_full_model_and_its_lora_adapter_equal_plain_transformers(tmp_path, fp32, base_model,
                                                                                       small_jsonl, prepared):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmforge.data.packing import PackedRows

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_model)),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    results = {}
    for name, folder in (("base", base_model), ("adapter", tmp_path / "adapter")):
        code, output = _invoke("eval", "-m", folder, "--corpus", f"raw={small_jsonl}", "--corpus", f"held={prepared.directory}",
                               "--seq-len", 64, "--max-batches", 2, "-o", tmp_path / f"out_{name}")
        assert code == 0, output
        assert "eval: held perplexity" in output and "eval: raw perplexity" in output
        results[name] = json.loads((tmp_path / f"out_{name}" / "eval.json").read_text())
    rows = PackedRows(prepared.split("val"), 64)
    merged = peft_model.merge_and_unload().eval()
    base = AutoModelForCausalLM.from_pretrained(str(base_model)).eval()
    for name, model in (("base", base), ("adapter", merged)):
        held = results[name]["probes"]["held"]["after"]
        assert results[name]["head"] == "causal_lm" and held["tokens"] == 2 * 8 * 64
        assert held["ppl"] == pytest.approx(_reference_ppl(model, rows, 2, 8), rel=1e-4)
        assert held["ppl_ci"][0] <= held["ppl"] <= held["ppl_ci"][1]
        assert results[name]["probes"]["raw"]["after"]["tokens"] == 2 * 8 * 64  # every document of the file, packed
    assert results["adapter"]["probes"]["held"]["after"]["ppl"] != pytest.approx(results["base"]["probes"]["held"]["after"]["ppl"])
    records = [json.loads(x) for x in (tmp_path / "out_adapter" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "eval" and records[-1]["held/ppl"] == results["adapter"]["probes"]["held"]["after"]["ppl"]
    # nothing changed: reused; the adapter retrained: measured again
    again = ["eval", "-m", tmp_path / "adapter", "--corpus", f"raw={small_jsonl}", "--corpus", f"held={prepared.directory}",
             "--seq-len", 64, "--max-batches", 2, "-o", tmp_path / "out_adapter"]
    code, output = _invoke(*again)
    assert code == 0 and "up to date" in output
    peft_model.save_pretrained(tmp_path / "adapter")
    code, output = _invoke(*again)
    assert code == 0 and "up to date" not in output and "eval: held perplexity" in output
    code, output = _invoke("report", tmp_path / "out_base", tmp_path / "out_adapter", "-o", tmp_path / "r.html")
    assert code == 0, output  # evaluations alone make a report too
    assert f"{results['base']['probes']['held']['after']['ppl']:.2f}" in (tmp_path / "r.html").read_text()


def _classifier(folder: Path, tokenizer_dir: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    from lmforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(3)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        id2label={0: "fiction", 1: "news"}, label2id={"fiction": 0, "news": 1},
                        pad_token_id=tok.pad_token_id or 0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_classification_task_csv_is_scored_as_scikit_learn_scores_it(tmp_path, fp32, tokenizer_dir, genre_file):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(x) for x in genre_file.read_text().splitlines()]
    with open(tmp_path / "genres.csv", "w", newline="") as handle:  # a CSV of labelled texts, as users have them
        writer = csv.DictWriter(handle, ["text", "genre"])
        writer.writeheader()
        writer.writerows(rows)
    model_dir = _classifier(tmp_path / "clf", tokenizer_dir)
    code, output = _invoke("eval", "-m", model_dir, "--task", f"genres={tmp_path / 'genres.csv'}", "--label-column", "genre",
                           "--corpus", f"g={genre_file}", "--seq-len", 64, "-o", tmp_path / "out")
    assert code == 0, output
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    got = result["tasks"]["genres"]["after"]
    assert "no language-model head" in result["probes"]["g"]["after"]["skipped"]
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    predicted = []
    with torch.no_grad():
        for row in rows:
            ids = tok(row["text"], truncation=True, max_length=64, return_tensors="pt")
            predicted.append(int(model(**ids).logits.argmax(-1)))
    actual = [["fiction", "news"].index(r["genre"]) for r in rows]
    assert got["predicted"] == predicted and got["examples"] == len(rows)
    assert got["accuracy"] == pytest.approx(accuracy_score(actual, predicted))
    assert got["macro_f1"] == pytest.approx(f1_score(actual, predicted, average="macro", zero_division=0))
    p, r, _, _ = precision_recall_fscore_support(actual, predicted, labels=[0, 1], zero_division=0)
    assert [got["precision_fiction"], got["recall_news"]] == pytest.approx([p[0], r[1]])
    assert got["confusion"] == confusion_matrix(actual, predicted, labels=[0, 1]).tolist()
    assert f"task genres accuracy {got['accuracy']:.3f}" in output
    # a label the classifier was not trained on: the file and line named, nothing written
    (tmp_path / "bad.csv").write_text("text,genre\nsome words,news\nother words,poetry\n")
    code, output = _invoke("eval", "-m", model_dir, "--task", tmp_path / "bad.csv", "--label-column", "genre", "-o", tmp_path / "bad")
    assert code == 2 and "bad.csv:3: label 'poetry' is not in the label set" in output
    assert not (tmp_path / "bad" / "eval.json").exists()


def test_in_context_scores_equal_lm_eval_and_pick_the_most_likely_label(tmp_path, fp32, base_model, genre_file):
    """The few-shot baseline of a causal LM: each label's continuation log-likelihood is lm-eval's
    `loglikelihood` of the same (context, continuation), and the prediction is the argmax."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.eval.fewshot import (
        continuation_logprobs,
        in_context_predictions,
        in_context_prompt,
        shot_text,
    )
    from lmforge.models.factory import load_model

    rows = [json.loads(x) for x in genre_file.read_text().splitlines()]
    model, tok = load_model(base_model, "causal_lm").eval(), load_tokenizer(base_model)
    shots = [(shot_text(tok, rows[0]["text"]), rows[0]["genre"]), (shot_text(tok, rows[-1]["text"]), rows[-1]["genre"])]
    texts = [r["text"] for r in rows[5:11]]
    pairs = [(in_context_prompt(shots, t), f" {label}") for t in texts for label in ("fiction", "news")]
    ours = continuation_logprobs(model, tok, pairs, torch.device("cpu"), max_length=1024)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    theirs = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                                               disable_tqdm=True)]
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-3)
    # the shots' keys and values were computed once for all pairs (the path above) ...
    from lmforge.eval.fewshot import _shared_prefix, encode_pair

    encoded = [encode_pair(tok, c, x) for c, x in pairs]
    assert _shared_prefix([(h + c)[:-1] for h, c in encoded], [len(c) for _, c in encoded]) > 100
    # ... and prompts cut from the left to a short context, which then start differently, agree too
    ours = continuation_logprobs(model, tok, pairs, torch.device("cpu"), max_length=96)
    short = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", max_length=96)
    theirs_short = [ll for ll, _ in short.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                                                        disable_tqdm=True)]
    assert ours == pytest.approx(theirs_short, rel=1e-4, abs=1e-3)
    # one-token continuations of one context share a forward pass, and still agree with lm-eval
    words = [" the", " a"]
    assert all(len(encode_pair(tok, in_context_prompt(shots, texts[0]), w)[1]) == 1 for w in words)
    one_token = [(in_context_prompt(shots, t), w) for t in texts for w in words]
    theirs_one = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(one_token)],
                                                   disable_tqdm=True)]
    assert continuation_logprobs(model, tok, one_token, torch.device("cpu"), max_length=1024) == pytest.approx(
        theirs_one, rel=1e-4, abs=1e-3)
    predicted = in_context_predictions(model, tok, shots, texts, ["fiction", "news"], torch.device("cpu"), 1024)
    assert predicted == np.array(theirs).reshape(len(texts), 2).argmax(-1).tolist()
    # through the CLI: a causal LM on a labelled file is scored in context, its shots not among the scored rows
    small = tmp_path / "g.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows[:8] + rows[-8:]))
    code, output = _invoke("eval", "-m", base_model, "--task", f"g={small}", "--label-column", "genre", "--few-shot", 2,
                           "-o", tmp_path / "out")
    assert code == 0, output
    got = json.loads((tmp_path / "out" / "eval.json").read_text())["tasks"]["g"]["after"]
    assert got["examples"] == 14 and got["shots"] == 2 and got["kind"].startswith("in-context")


def test_a_generation_task_and_sample_prompts(tmp_path, fp32, base_model):
    from lmforge.eval.generation import generation_metrics

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"Name the colour {w}.", "response": w}) + "\n" for w in ("red", "blue", "green")))
    suite = {"tasks": {"colours": {"files": str(qa)}}, "prompts": ["The"], "max_new_tokens": 6}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    code, output = _invoke("eval", "-m", base_model, "--config", tmp_path / "suite.yaml", "-o", tmp_path / "out")
    assert code == 0, output
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    got = result["tasks"]["colours"]
    assert got["kind"] == "generation" and got["after"]["examples"] == 3
    answers = [s["answer"] for s in got["after"]["samples"]]
    again = generation_metrics(answers, ["red", "blue", "green"])
    assert got["after"]["rouge_l"] == pytest.approx(again["rouge_l"]) and got["after"]["chrf"] == pytest.approx(again["chrf"])
    assert result["samples"][0]["prompt"] == "The" and "-> " in output


def test_bad_suites_fail_with_the_key_or_file_named(tmp_path, base_model, small_jsonl):
    code, output = _invoke("eval", "-m", base_model, "--corpus", "nope")
    assert code == 2 and "--corpus nope: expected NAME=PATH" in output
    code, output = _invoke("eval", "-m", base_model)
    assert code == 2 and "nothing to evaluate" in output
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"tasks": {"t": {"files": str(small_jsonl), "colum": "x"}}}))
    code, output = _invoke("eval", "-m", base_model, "--config", tmp_path / "s.yaml")
    assert code == 2 and "unknown key 'tasks.t.colum'; did you mean 'tasks.t.column'?" in output
    code, output = _invoke("eval", "-m", base_model, "--task", small_jsonl)  # neither labels nor conversations
    assert code == 2 and "small.jsonl:1: tasks.small: no label column 'label'" in output
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "eval.json").write_text("{}")
    code, output = _invoke("eval", "-m", base_model, "--corpus", f"g={small_jsonl}", "-o", tmp_path / "foreign")
    assert code == 2 and "lmforge did not write it" in output
    assert (tmp_path / "foreign" / "eval.json").read_text() == "{}"


@pytest.mark.slow  # five stages, one of them LoRA, and an in-context baseline
def test_eval_stages_measure_their_parent_and_a_decoder_classifier_is_compared_with_prompting(tmp_path, fp32, small_jsonl,
                                                                                              tokenizer_dir, genre_file):
    rows = genre_file.read_text().splitlines()
    task = tmp_path / "genres.jsonl"
    task.write_text("\n".join(rows[:50] + rows[-50:]) + "\n")  # both classes, few enough to prompt each quickly
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n" for w in ["red", "blue", "green"] * 8))
    spec = {
        "name": "evals", "output_dir": str(tmp_path / "runs"), "generation_examples": 2,
        "defaults": {"packing": {"seq_len": 64},
                     "trainer": {"batch_size": 8, "max_steps": 20, "lr": 2e-3, "progress": False, "precision": "fp32"}},
        "stages": {
            "pretrain": {"tokenizer": {"path": str(tokenizer_dir)}, "model": {"family": "llama", "preset": "tiny"},
                         "objective": {"name": "clm"}, "data": {"train_files": [str(small_jsonl)], "val_fraction": 0.1}},
            "lm_suite": {"after": "pretrain", "eval": {"corpora": {"general": str(small_jsonl), "held": "${stages.pretrain}/data"},
                                                      "prompts": ["The"], "max_new_tokens": 4, "seq_len": 64, "max_batches": 2}},
            "clf": {"after": "pretrain", "objective": {"name": "classify"},
                    "data": {"train_files": [str(task)], "label_column": "genre", "val_fraction": 0.3}},
            "clf_suite": {"after": "clf", "eval": {"tasks": {"genres": {"files": str(task), "label_column": "genre",
                                                                        "limit": 20}}}},
            "chat": {"after": "pretrain", "objective": {"name": "sft"}, "method": {"name": "lora"},  # an adapter folder
                     "data": {"train_files": [str(qa)], "val_fraction": 0.25}, "trainer": {"max_steps": 3}},
        },
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    code, output = _invoke("run", path, "--dry-run")
    assert code == 0, output
    assert "eval  lm_suite (after pretrain): its parent pretrain will change" in output
    code, output = _invoke("run", path)
    assert code == 0, output
    runs = tmp_path / "runs"
    lm = json.loads((runs / "lm_suite" / "eval.json").read_text())
    assert set(lm["probes"]) == {"general", "held"} and lm["samples"][0]["prompt"] == "The"
    pretrain = json.loads((runs / "pretrain" / "eval.json").read_text())["probes"]["general"]["after"]
    assert lm["probes"]["held"]["after"]["ppl"] < 0.8 * 512 > pretrain["ppl"]  # a trained model (a random one: ~ the 512 ids)
    clf = json.loads((runs / "clf_suite" / "eval.json").read_text())["tasks"]["genres"]["after"]
    assert clf["examples"] == 20 and "accuracy_ci" in clf
    # the classifier stage of a causal LM: its baseline is the untuned LM prompted with labelled examples
    baseline = json.loads((runs / "clf" / "eval.json").read_text())["baseline"]
    assert baseline["kind"].startswith("in-context") and baseline["shots"] == 8
    assert "shot baseline of the untuned model" in output or "baseline of the untuned model" in output
    chat = json.loads((runs / "chat" / "eval.json").read_text())["generation"]
    assert chat["before"]["examples"] == chat["after"]["examples"] == 2
    layout = {s["label"]: s["kind"] for s in json.loads((runs / "pipeline.json").read_text())["stages"]}
    assert layout == {"pretrain": "train", "lm_suite": "eval", "clf": "train", "clf_suite": "eval", "chat": "train"}
    code, output = _invoke("run", path)
    assert code == 0 and output.split("plan:")[1].split("==")[0].count("skip ") == 5, output
    code, output = _invoke("run", path, "--dry-run", "stages.clf_suite.eval.tasks.genres.limit=10")
    assert code == 0 and "eval  clf_suite (after clf): its model or settings changed" in output
    code, output = _invoke("report", runs, "-o", tmp_path / "r.html")
    assert code == 0, output
    page = (tmp_path / "r.html").read_text().split("<h2>Evaluations</h2>")[1]
    assert f"{clf['accuracy']:.3f}" in page and f"{lm['probes']['held']['after']['ppl']:.2f}" in page


def test_eval_stage_mistakes_are_named_before_anything_runs(tmp_path, small_jsonl, tokenizer_dir):
    from lmforge.config import ConfigError
    from lmforge.pipeline_recipe import load_pipeline

    base = {"output_dir": str(tmp_path / "runs"), "stages": {
        "pretrain": {"tokenizer": {"path": str(tokenizer_dir)}, "model": {"family": "llama", "preset": "tiny"},
                     "objective": {"name": "clm"}, "data": {"train_files": [str(small_jsonl)]}, "trainer": {"max_steps": 2}},
        "suite": {"after": "pretrain", "eval": {"tasks": {"t": {"files": str(tmp_path / "missing.jsonl")}}}}}}
    for change, message in (
            ({"suite": {"after": "pretrain", "eval": {}, "trainer": {"lr": 1}}}, "an eval stage has `after:`"),
            ({"suite": {"eval": {}}}, "an eval stage has `after:`"),
            ({"more": {"after": "suite", "objective": {"name": "clm"}}}, "'suite' is an eval stage"),
            ({"suite": {"after": "pretrain", "eval": {"corpora": {"g": 3}}}}, "stages.suite.eval: key 'corpora.g' = 3")):
        spec = {**base, "stages": {**base["stages"], **change}}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("`", ".")):
            load_pipeline(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(base))
    code, output = _invoke("check", tmp_path / "p.yaml", "--no-measure")
    assert code == 1 and "stages.suite.eval: tasks.t: " in output and "missing.jsonl: no such file" in output
    code, output = _invoke("run", tmp_path / "p.yaml")
    assert code == 2 and "pre-launch check failed for stage(s) suite" in output
    assert not (tmp_path / "runs" / "pretrain").exists()


def test_the_readme_pipeline_runs_verbatim(tmp_path, monkeypatch, tokenizer_dir, small_jsonl, genre_file):
    """The README's pipeline block, unchanged, in a folder holding the files it names: planned and checked."""
    from transformers import BertConfig, BertForMaskedLM

    from lmforge.data.tokenizer import load_tokenizer

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Lifecycle")[1].split("```yaml\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    tok = load_tokenizer(tokenizer_dir)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, pad_token_id=tok.pad_token_id or 0)).save_pretrained("my_encoder")
    tok.save_pretrained("my_encoder")
    lines = small_jsonl.read_text().splitlines()
    Path("general.jsonl").write_text("\n".join(lines[:15]) + "\n")
    Path("domain.jsonl").write_text("\n".join(lines[15:]) + "\n")
    Path("data").mkdir()
    rows = [json.loads(x) for x in genre_file.read_text().splitlines()]
    labelled = "".join(json.dumps({"text": r["text"], "label": r["genre"]}) + "\n" for r in rows)
    Path("data/task.jsonl").write_text(labelled)
    Path("data/test.jsonl").write_text(labelled)
    Path("pipeline.yaml").write_text(block)
    code, output = _invoke("run", "pipeline.yaml", "--dry-run")
    assert code == 0, output
    plan = output.split("plan:")[1]
    for label in ("general", "continual", "direct/seed_2", "adapted/seed_0", "measure/seed_1"):
        assert f" {label}" in plan
    assert "eval  measure/seed_0 (after adapted/seed_0)" in plan


def test_predict_writes_labels_with_probabilities_and_answers(tmp_path, fp32, tokenizer_dir, base_model, genre_file):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = _classifier(tmp_path / "clf", tokenizer_dir)
    rows = [json.loads(x) for x in genre_file.read_text().splitlines()][:6]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"], "id": i, "label": r["genre"]}) + "\n" for i, r in enumerate(rows)))
    code, output = _invoke("predict", "-m", model_dir, "-d", data, "-o", tmp_path / "p.csv", "--max-len", 64)
    assert code == 0 and "6 rows (label with probabilities)" in output, output
    with open(tmp_path / "p.csv") as handle:
        got = list(csv.DictReader(handle))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    with torch.no_grad():
        probs = model(**tok(rows[0]["text"], truncation=True, max_length=64, return_tensors="pt")).logits.softmax(-1)[0]
    assert float(got[0]["p_news"]) == pytest.approx(float(probs[1]), abs=1e-5)
    assert got[0]["predicted_label"] == ["fiction", "news"][int(probs.argmax())] and got[3]["id"] == "3"
    assert [g["label"] for g in got] == [r["genre"] for r in rows]  # the file's own labels are kept
    code, output = _invoke("predict", "-m", base_model, "-d", data, "-o", tmp_path / "g.jsonl", "--max-new-tokens", 3)
    assert code == 0, output
    answers = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and all("generated" in a and a["lmforge_model"] == str(base_model) for a in answers)
    code, output = _invoke("predict", "-m", model_dir, "-d", data, "-o", data)  # the input is not ours to replace
    assert code == 2 and "lmforge did not write it" in output


def test_commands_that_run_a_model_take_threads(tmp_path, base_model):
    """generate, chat, eval and predict take --threads (training has trainer.num_threads): torch runs the
    model with that many."""
    before = torch.get_num_threads()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a short text"}\n')
    try:
        for args, code in ((["generate", "-m", str(base_model), "-p", "Hi", "--max-new-tokens", "2"], 0),
                           (["chat", str(base_model)], 2),  # this base has no chat template: refused, after
                           (["eval", "-m", str(base_model), "-p", "Hi"], 0),
                           (["predict", "-m", str(base_model), "-d", str(rows), "-o", str(tmp_path / "p.jsonl")], 0)):
            torch.set_num_threads(2)  # not 1 before the command, wherever this runs
            result = CliRunner().invoke(app, [*args, "--threads", "1"], input="")
            assert result.exit_code == code and torch.get_num_threads() == 1, (args[0], result.output)
        result = CliRunner().invoke(app, ["generate", "-m", str(base_model), "-p", "Hi", "--threads", "0"])
        assert result.exit_code == 2 and "--threads" in result.output
    finally:
        torch.set_num_threads(before)


def test_report_pairs_standalone_evaluations_of_two_models(tmp_path, base_model, genre_file, tokenizer_dir):
    """`lmforge eval -o` of a base and of another model on the same task file and corpus, then `lmforge
    report` of both folders: a before → after table, the accuracy difference paired on the shared rows
    (paired_branch_difference of the two folders' per-row results), perplexity's change."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.eval.intervals import paired_branch_difference
    from lmforge.models.factory import build_model, preset_config

    tok = load_tokenizer(tokenizer_dir)
    other = tmp_path / "other"
    torch.manual_seed(7)
    build_model(preset_config("llama", "tiny", (len(tok) + 63) // 64 * 64, 1024), "causal_lm", tok).save_pretrained(other)
    tok.save_pretrained(other)
    rows = [json.loads(x) for x in genre_file.read_text().splitlines()]
    task, held = tmp_path / "g.jsonl", tmp_path / "held.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows[:20] + rows[-20:]))
    held.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[20:40]))
    for name, model in (("base", base_model), ("tuned", other)):
        code, output = _invoke("eval", "-m", model, "--task", f"g={task}", "--label-column", "genre",
                               "--few-shot", 2, "-c", f"held={held}", "-o", tmp_path / name)
        assert code == 0, output
    a, b = (json.loads((tmp_path / n / "eval.json").read_text()) for n in ("base", "tuned"))
    ga, gb = a["tasks"]["g"]["after"], b["tasks"]["g"]["after"]
    assert ga["actual"] == gb["actual"]  # the same rows (the shots drawn alike for both)
    d = paired_branch_difference([[int(p == t) for p, t in zip(ga["predicted"], ga["actual"], strict=True)]],
                                 [[int(p == t) for p, t in zip(gb["predicted"], gb["actual"], strict=True)]])
    code, output = _invoke("report", tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "r.html")
    assert code == 0, output
    table = (tmp_path / "r.html").read_text().split("<h2>Models compared on the same rows</h2>")[1].split("<h2>")[0]
    assert "base → tuned" in table and f"{ga['accuracy']:.3f} → {gb['accuracy']:.3f}" in table
    assert f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" in table
    pa, pb = a["probes"]["held"]["after"]["ppl"], b["probes"]["held"]["after"]["ppl"]
    assert f"{(pb / pa - 1) * 100:+.1f}%" in table
