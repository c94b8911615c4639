"""`lmforge predict -m MODEL --data FILE -o OUT`: what a model says about each row of the user's own file.

- a classifier: the label and each label's probability;
- a reward model (a one-output score head): the score of each row's text (or of its prompt + answer);
- a causal LM: the greedy answer to each row's prompt (a conversation, or the prompt column), rendered
  with the model's chat template when it has one.

Each output row is the input row plus the prediction's fields (and `lmforge_model`), as JSONL or CSV
(by OUT's extension). An existing OUT is replaced only when lmforge wrote it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from lmforge.data.formats import DataError, detect_format, parse_rows, read_all, text_field
from lmforge.data.labeled import encode_texts
from lmforge.data.tokenizer import load_tokenizer
from lmforge.engine.runtime import autocast, pick_device, resolve_precision
from lmforge.eval.generate import generate_texts
from lmforge.models.factory import load_model, saved_head
from lmforge.objectives.classify import label_prompt
from lmforge.outputs import OutputError

MARK = "lmforge_model"


def _rows(files: list[str]) -> list[dict]:
    rows = read_all(parse_rows(files, lambda path, lineno, row: row))
    if not rows:
        raise DataError(f"{', '.join(files)}: no rows")
    return rows


def _refuse_foreign(out: Path) -> None:
    if not out.exists():
        return
    try:
        first = next(iter(parse_rows([str(out)], lambda path, lineno, row: row, max_rows=None)), None)
    except DataError:
        first = None
    if not isinstance(first, dict) or MARK not in first:
        raise OutputError(f"{out}: exists and lmforge did not write it; choose another -o")


@torch.no_grad()
def predict(model_dir: Path, files: list[str], out: Path, column: str = "text", batch_size: int = 16,
            max_len: int = 512, max_new_tokens: int = 64) -> dict:
    """Write one prediction per row of `files` to `out`; returns {"rows": n, "kind": ...}."""
    out = Path(out)
    _refuse_foreign(out)
    rows = _rows(files)
    head = saved_head(model_dir)
    device = pick_device()
    precision = resolve_precision("auto", device)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, head if head in ("classifier", "causal_lm") else "causal_lm").to(device).eval()
    where = ", ".join(files)
    if head == "classifier":
        texts = [text_field(where, i + 1, r, column) for i, r in enumerate(rows)]
        single = model.config.num_labels == 1
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        encoded = encode_texts(tokenizer, texts, [0] * len(texts), max_len, label_prompt(model))  # its training prompt
        for start in range(0, len(rows), batch_size):
            enc = encoded.batch(list(range(start, min(start + batch_size, len(rows)))))
            enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            with autocast(device, precision):
                logits = model(**enc).logits.float()
            for r, row in enumerate(rows[start:start + batch_size]):
                if single:  # a reward model's score
                    row["score"] = float(logits[r, 0])
                else:
                    probs = logits[r].softmax(-1)
                    # its own column: a labelled test file keeps its true label beside the prediction
                    row["predicted_label"] = names[int(probs.argmax())]
                    row.update({f"p_{n}": round(float(p), 6) for n, p in zip(names, probs, strict=True)})
        kind = "reward score" if single else "label with probabilities"
    else:
        chat = bool(tokenizer.chat_template)
        prompts = []
        for i, row in enumerate(rows):
            messages = row.get("messages") if isinstance(row.get("messages"), list) else None
            if messages is not None:
                turns = messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages
                prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True) if chat \
                    else "\n".join(str(m.get("content", "")) for m in turns)
            else:
                text = text_field(where, i + 1, row, column)
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                       add_generation_prompt=True) if chat else text
            prompts.append(prompt)
        with autocast(device, precision):
            answers = generate_texts(model, tokenizer, prompts, max_new_tokens, desc="answers")
        for row, answer in zip(rows, answers, strict=True):
            row["generated"] = answer
        kind = "greedy answer" + (" (chat template)" if chat else "")
    for row in rows:
        row[MARK] = str(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if detect_format(str(out)) == "csv":
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fields)
            writer.writeheader()
            writer.writerows({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()} for row in rows)
    else:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(out)
    return {"rows": len(rows), "kind": kind}
