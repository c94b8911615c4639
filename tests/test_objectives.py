"""Masked LM, prefix LM and span corruption: their statistics, references, and that each trains."""

import numpy as np
import pytest
import torch
import yaml
from transformers import DataCollatorForLanguageModeling
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config import ObjectiveConfig
from lmforge.engine.metrics import read_metrics
from lmforge.models.factory import build_model, preset_config
from lmforge.objectives import get_objective
from lmforge.objectives.prefix_lm import prefix_attention_mask
from lmforge.objectives.span import corrupt_row, input_and_target_lengths, random_spans_noise_mask


def _real_rows(prepared, rows: int, length: int) -> torch.Tensor:
    stream = np.asarray(prepared.split("train")[0].tokens[: rows * length], dtype=np.int64)
    return torch.from_numpy(stream.reshape(rows, length))


# ---------------------------------------------------------------- masked LM
def test_mlm_rates_80_10_10_and_specials_never_selected(prepared, tokenizer):
    objective = get_objective(ObjectiveConfig(name="mlm"), tokenizer)
    rows = _real_rows(prepared, 64, 512)  # real text, plus special tokens sprinkled in
    rows[:, ::50] = tokenizer.eos_token_id
    rows[:, 7::97] = tokenizer.pad_token_id
    rows[:, 11::131] = tokenizer.bos_token_id
    torch.manual_seed(0)
    inputs, labels = objective.corrupt(rows)
    special = torch.isin(rows, objective.special_ids)
    assert special.sum() > 1000
    selected = labels != -100
    assert not (selected & special).any()
    assert (labels[selected] == rows[selected]).all() and (inputs[special] == rows[special]).all()
    rate = selected.sum() / (~special).sum()
    assert abs(rate.item() - 0.15) < 0.005
    masked = (inputs == tokenizer.mask_token_id) & selected
    kept = (inputs == rows) & selected
    random = selected & ~masked & ~kept
    n = selected.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.015
    # a random replacement can draw the original token (1/vocab); that lands in "kept"
    assert abs(random.sum().item() / n - 0.1) < 0.015
    assert abs(kept.sum().item() / n - 0.1) < 0.015
    assert ((inputs != rows) == (masked | random)).all()  # nothing outside the selection changes


def test_mlm_loss_matches_hf_collator_and_model_loss(prepared, tokenizer):
    objective = get_objective(ObjectiveConfig(name="mlm"), tokenizer)
    torch.manual_seed(0)
    model = build_model(preset_config("bert", "tiny", len(tokenizer), 128, num_hidden_layers=2), "masked_lm").eval()
    rows = _real_rows(prepared, 8, 64)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")
    batch = collator([{"input_ids": r.tolist()} for r in rows])
    with torch.no_grad():
        ours, metrics = objective.masked_loss(model, batch["input_ids"], batch["labels"])
        theirs = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert metrics["tokens"] == (batch["labels"] != -100).sum()
    # and our masking selects at the collator's rate, on the same rows
    torch.manual_seed(1)
    _, labels = objective.corrupt(rows.repeat(16, 1))
    hf = collator([{"input_ids": r.tolist()} for r in rows.repeat(16, 1)])["labels"]
    assert abs((labels != -100).float().mean() - (hf != -100).float().mean()) < 0.01


def test_whole_word_masking_masks_whole_words(prepared, tokenizer):
    objective = get_objective(ObjectiveConfig(name="mlm", whole_word_masking=True), tokenizer)
    rows = _real_rows(prepared, 16, 256)
    torch.manual_seed(0)
    _, labels = objective.corrupt(rows)
    starts = objective.word_starts[rows] | torch.isin(rows, objective.special_ids)
    words = starts.long().cumsum(1)
    selected = labels != -100
    multi_piece = 0
    for r in range(rows.shape[0]):
        for w in words[r].unique():
            in_word = (words[r] == w) & ~torch.isin(rows[r], objective.special_ids)
            if in_word.sum() > 1:
                multi_piece += 1
                assert selected[r][in_word].all() or not selected[r][in_word].any()
    assert multi_piece > 50
    assert 0.10 < selected.float().mean() < 0.20


# ---------------------------------------------------------------- prefix LM
def test_prefix_positions_see_each_other_and_carry_no_loss():
    mask = prefix_attention_mask(torch.tensor([3]), 6)[0, 0]
    assert mask[0, 2] and mask[1, 2]  # prefix queries see later prefix keys
    assert not mask[2, 3] and not mask[3, 4]  # nothing sees past the prefix except causally
    assert mask[5].all()
    torch.manual_seed(0)
    model = build_model(preset_config("llama", "tiny", 64, 128, num_hidden_layers=2), "causal_lm").eval()
    objective = get_objective(ObjectiveConfig(name="prefix_lm", prefix_min_fraction=0.5, prefix_max_fraction=0.5), None)
    x = torch.randint(5, 64, (1, 12))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    _, metrics = objective.loss(model, batch)
    assert metrics["tokens"] == 11 - 4  # prefix of 5: targets 1..4 fall inside it and carry no loss
    full = prefix_attention_mask(torch.tensor([5]), 11)
    with torch.no_grad():
        base = model(input_ids=batch["input_ids"], attention_mask=full, use_cache=False).logits
        later_prefix = batch["input_ids"].clone()
        later_prefix[0, 4] = (later_prefix[0, 4] + 1) % 64
        changed = model(input_ids=later_prefix, attention_mask=full, use_cache=False).logits
        suffix = batch["input_ids"].clone()
        suffix[0, 8] = (suffix[0, 8] + 1) % 64
        unchanged = model(input_ids=suffix, attention_mask=full, use_cache=False).logits
    assert not torch.allclose(base[0, 0], changed[0, 0])  # position 0 sees position 4
    torch.testing.assert_close(base[0, :8], unchanged[0, :8])  # nobody before 8 sees position 8


# ---------------------------------------------------------------- span corruption
def test_span_lengths_fill_the_model_exactly():
    tokens_length, target_length = input_and_target_lengths(128, 0.15, 3.0)
    rng = np.random.default_rng(0)
    sentinels = np.arange(1000, 1100)
    for _ in range(20):
        row = rng.integers(10, 900, tokens_length)
        inputs, targets = corrupt_row(row, random_spans_noise_mask(tokens_length, 0.15, 3.0, rng), sentinels, 2)
        assert len(inputs) == 128 and len(targets) == target_length


def test_span_inputs_and_targets_reconstruct_the_original():
    rng = np.random.default_rng(1)
    sentinels = np.arange(1000, 1100)
    for length in (50, 200, 571):
        row = rng.integers(10, 900, length)
        noise = random_spans_noise_mask(length, 0.15, 3.0, rng)
        inputs, targets = corrupt_row(row, noise, sentinels, eos_id=2)
        spans, current = {}, None
        for token in targets[:-1]:
            if token >= 1000:
                current = token
                spans[current] = []
            else:
                spans[current].append(token)
        rebuilt = []
        for token in inputs[:-1]:
            rebuilt.extend(spans[token] if token >= 1000 else [token])
        assert rebuilt == row.tolist()
        assert inputs[-1] == 2 and targets[-1] == 2


def test_span_noise_density_and_mean_span_length():
    rng = np.random.default_rng(2)
    noise_tokens = total = spans = 0
    for _ in range(300):
        mask = random_spans_noise_mask(568, 0.15, 3.0, rng)
        noise_tokens += mask.sum()
        total += len(mask)
        spans += (mask & ~np.concatenate([[False], mask[:-1]])).sum()
        assert not mask[0]  # T5 starts with a non-noise span
    assert abs(noise_tokens / total - 0.15) < 0.005
    assert abs(noise_tokens / spans - 3.0) < 0.1
    heavy = random_spans_noise_mask(1000, 0.3, 8.0, rng)
    assert abs(heavy.mean() - 0.3) < 0.01


def test_span_needs_sentinels(tmp_path, small_jsonl):
    from lmforge.data.formats import iter_corpus
    from lmforge.data.tokenizer import train_tokenizer

    plain = train_tokenizer(iter_corpus([str(small_jsonl)], max_docs=3), tmp_path, "bpe", vocab_size=300)
    with pytest.raises(ValueError, match="num_sentinels"):
        get_objective(ObjectiveConfig(name="span"), plain)


# ---------------------------------------------------------------- each objective trains
TINY = {
    "bert": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128},
    "llama": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 128},
    "t5": {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2, "d_kv": 32},
}


@pytest.mark.parametrize("objective, family", [("mlm", "bert"), ("prefix_lm", "llama"), ("span", "t5")])
def test_objective_loss_falls_through_the_pipeline(tmp_path, tokenizer_dir, prepared, objective, family):
    recipe = {
        "output_dir": str(tmp_path / "out"),
        "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"prepared_dir": str(prepared.directory)},
        "objective": {"name": objective, "noise_density": 0.15},
        "model": {"family": family, "preset": "tiny", "overrides": TINY[family]},
        "packing": {"seq_len": 32},
        "trainer": {"max_steps": 60, "batch_size": 16, "lr": 5e-3, "warmup_steps": 5, "log_every": 10, "eval_every": 60,
                    "eval_batches": 2, "progress": False, "precision": "fp32"},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    losses = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl", "train")]
    assert losses[-1] < losses[0] - 0.5, losses
    if objective == "mlm":
        assert "accuracy on the objective's targets" in result.output and "pseudo-perplexity" in result.output


def test_pseudo_perplexity_matches_one_mask_at_a_time(prepared, tokenizer):
    from lmforge.data.packing import PackedRows
    from lmforge.eval.perplexity import pseudo_perplexity

    torch.manual_seed(0)
    model = build_model(preset_config("bert", "tiny", len(tokenizer), 128, **TINY["bert"]), "masked_lm").eval()
    rows = PackedRows(prepared.split("val"), 12)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    fast = pseudo_perplexity(model, rows, tokenizer.mask_token_id, special, torch.device("cpu"), max_rows=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in range(2):
            tokens = rows.batch([r])["input_ids"][0]
            for i in range(len(tokens)):
                if tokens[i] in special:
                    continue
                masked = tokens.clone()
                masked[i] = tokenizer.mask_token_id
                nll -= model(input_ids=masked[None]).logits[0, i].log_softmax(-1)[tokens[i]].item()
                n += 1
    assert fast["pseudo_tokens"] == n
    assert fast["pseudo_loss"] == pytest.approx(nll / n, rel=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_masked_lm_head_on_selected_positions_equals_the_full_head(family, tokenizer):
    """The vocabulary head runs on the masked positions only; loss, gradients and counts are those of
    the whole model's logits."""
    from lmforge.objectives import mlm as mlm_module

    torch.manual_seed(0)
    config = preset_config(family, "tiny", 576, 128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128)
    model = build_model(config, "masked_lm", tokenizer)
    objective = mlm_module.MaskedLM(ObjectiveConfig(name="mlm"), tokenizer)
    assert mlm_module._body_and_head(model) is not None
    inputs, labels = objective.corrupt(torch.randint(10, 500, (4, 48)))
    fast_loss, fast = objective.masked_loss(model, inputs, labels)
    fast_loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=inputs).logits
    full_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    full_loss.backward()
    torch.testing.assert_close(fast_loss, full_loss)
    assert int(fast["tokens"]) == int((labels != -100).sum())
    assert int(fast["correct"]) == int(((logits.argmax(-1) == labels) & (labels != -100)).sum())
    for name, param in model.named_parameters():
        torch.testing.assert_close(fast_grads[name], param.grad, atol=1e-6, rtol=1e-4)
