"""Preference pairs, and what learns from them: DPO (against TRL's DPOTrainer) and reward models
(against TRL's RewardTrainer); whole runs, resume, bad rows."""

import gzip
import json
import math
import re

import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.formats import DataError
from lmforge.data.instructions import IGNORE, InstructionFormat, ensure_chat_template
from lmforge.data.preferences import load_preferences
from lmforge.engine.metrics import read_metrics

from .conftest import REPO, assert_cli_resume_is_exact, write_recipe


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ensure_chat_template(tok, None)
    return tok


PAIRS = REPO / "assets" / "corpora" / "preferences_excerpt.jsonl.gz"  # bench/make_preferences.py


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """The first 400 bundled pairs: real instructions, the reference answer against its words shuffled."""
    path = tmp_path_factory.mktemp("prefs") / "pairs.jsonl"
    with gzip.open(PAIRS, "rt") as handle:
        path.write_text("".join(line for _, line in zip(range(400), handle, strict=False)))
    return path


def _recipe(tmp_path, base, pairs, **sections) -> str:
    return write_recipe(tmp_path, base, {
        "data": {"train_files": [str(pairs)], "val_fraction": 0.1}, "objective": {"name": "dpo", "beta": 0.1},
        "trainer": {"max_steps": 30, "batch_size": 4, "lr": 1e-3, "warmup_steps": 3, "eval_every": 30, "eval_batches": 10},
    }, sections)


def _tiny_llama(vocab: int, seed: int, head: str = "causal_lm", **config):
    from lmforge.models.factory import build_model, preset_config

    torch.manual_seed(seed)
    return build_model(preset_config("llama", "tiny", vocab, 512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, intermediate_size=128, **config), head)


def test_loss_and_gradients_match_trl(tmp_path, chat_tokenizer, pairs_file):
    """The same pairs through TRL's DPOTrainer (its collator, its loss, its reference forward) and
    through lmforge (its batches, precomputed reference log-probabilities): same loss, same gradients."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lmforge.objectives.dpo import DirectPreference, attach_reference

    pairs = load_preferences([str(pairs_file)], chat_tokenizer, InstructionFormat(), "chosen", "rejected", 256, 0.0,
                             max_rows=6).train
    vocab = (len(chat_tokenizer) + 63) // 64 * 64
    policy, reference = _tiny_llama(vocab, 0), _tiny_llama(vocab, 1)  # a reference unlike the policy
    attach_reference(reference, pairs, 3, torch.device("cpu"), "fp32")
    indices = [0, 1, 2, 3]
    ours = pairs.batch(indices)  # with the reference's log-probabilities

    examples = []
    for i in indices:  # split each row at its first answer token: TRL's prompt_ids / chosen_ids / rejected_ids
        sides = [pairs.rows.ids[2 * i + k] for k in (0, 1)]
        start = int((pairs.rows.targets[2 * i] != IGNORE).argmax())
        assert (pairs.rows.targets[2 * i + 1] != IGNORE).argmax() == start and (sides[0][:start] == sides[1][:start]).all()
        examples.append({"prompt_ids": sides[0][:start].tolist(), "chosen_ids": sides[0][start:].tolist(),
                         "rejected_ids": sides[1][start:].tolist()})
    text = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=4, max_length=None)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=text, processing_class=chat_tokenizer)
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    theirs.backward()
    their_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    model = _tiny_llama(vocab, 0)
    mine, metrics = DirectPreference(None).loss(model, ours)
    mine.backward()
    torch.testing.assert_close(mine, theirs.detach(), atol=1e-5, rtol=1e-5)
    assert abs(float(mine) - math.log(2)) > 1e-3  # the reference differs: not the trivial log 2 of step 0
    grads = dict(model.named_parameters())
    assert their_grads.keys() == {n for n, p in grads.items() if p.grad is not None}
    for name, grad in their_grads.items():
        torch.testing.assert_close(grads[name].grad, grad, atol=1e-6, rtol=1e-4)
    assert int(metrics["tokens"]) == 4


@pytest.mark.parametrize("method, lr", [pytest.param({"name": "full"}, 1e-3, id="full"),
                                        pytest.param({"name": "lora", "lora": {"rank": 8}}, 5e-3, id="lora",
                                                     marks=pytest.mark.slow)])
def test_dpo_run_prefers_the_chosen_answers_on_held_out_pairs(tmp_path, base_model, pairs_file, method, lr):
    """Step 0 is the reference itself (loss log 2, no pair won); after 30 steps the held-out pairs'
    chosen answers are rewarded above the rejected ones. Under LoRA the reference is the base (adapters off)."""
    result = CliRunner().invoke(app, ["run", _recipe(tmp_path, base_model, pairs_file, method=method, trainer={"lr": lr})])
    assert result.exit_code == 0, result.output
    assert "computing the reference model's log-probabilities" in result.output
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["accuracy"] == 0.0
    assert before["ties"] == 1.0 and after["ties"] < 0.2  # at step 0 every pair ties: counted apart, not as lost
    # measured: full 0.135 and 33/33 pairs won; LoRA at lr 5e-3 0.300 and 33/33 on an AMD EPYC (at 1e-2
    # it reached 0.523 on another machine but rose to 0.771 there: too large a step to hold everywhere)
    assert after["loss"] < before["loss"] - 0.1 and after["accuracy"] >= 0.8 and after["tokens"] >= 20
    # the policy's own choice (per-token likelihood) is measurable at step 0 too, and DPO moves it
    assert after["likelihood_accuracy"] > before["likelihood_accuracy"] + 0.2
    final = tmp_path / "run" / "final"
    assert (final / ("adapter_model.safetensors" if method["name"] == "lora" else "model.safetensors")).is_file()


def test_dpo_resume_is_exact(tmp_path, base_model, pairs_file):
    """A resumed run recomputes the reference from model.path (not from the checkpoint's weights)."""
    path = _recipe(tmp_path, base_model, pairs_file,
                   trainer={"max_steps": 8, "save_every": 4, "eval_every": 100, "eval_at_start": False, "log_every": 1})
    assert_cli_resume_is_exact(path, tmp_path / "run", "model.safetensors", last_step=8)


def test_bad_preference_rows_are_named(tmp_path, chat_tokenizer):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "yes", "rejected": "no"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"prefs.jsonl:2: no column 'rejected' for data.chosen_column"):
        load_preferences([str(path)], chat_tokenizer, InstructionFormat(), "chosen", "rejected", 64, 0.0)


def test_pairs_share_the_prompt_and_stay_together(chat_tokenizer, pairs_file):
    pairs = load_preferences([str(pairs_file)], chat_tokenizer, InstructionFormat(), "chosen", "rejected", 256, 0.0,
                             max_rows=20).train
    batch = pairs.batch([3, 0])
    assert len(batch["input_ids"]) == 4
    for chosen, rejected in ((0, 1), (2, 3)):  # interleaved: a pair is rows 2k and 2k + 1
        labels = batch["labels"]
        start = int((labels[chosen] != IGNORE).int().argmax())
        assert start == int((labels[rejected] != IGNORE).int().argmax()) > 0
        assert torch.equal(batch["input_ids"][chosen, :start], batch["input_ids"][rejected, :start])
        assert not torch.equal(labels[chosen], labels[rejected])
    # grouped by the longer row of each pair; every batch holds whole pairs
    for indices in pairs.epoch_batches(4, 0, 0):
        assert len(indices) == 4


def test_reward_loss_and_gradients_match_trl(tmp_path, chat_tokenizer, pairs_file):
    """The same pairs through TRL's RewardTrainer (its collator: chosen rows then rejected rows, with an
    attention mask) and through lmforge (interleaved rows, no mask): same loss, same gradients."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from lmforge.objectives.reward import RewardModel

    pairs = load_preferences([str(pairs_file)], chat_tokenizer, InstructionFormat(), "chosen", "rejected", 256, 0.0,
                             max_rows=6, whole_rows=True).train
    vocab = (len(chat_tokenizer) + 63) // 64 * 64
    head = {"num_labels": 1, "pad_token_id": chat_tokenizer.pad_token_id}
    indices = [0, 1, 2, 3]
    examples = [{"chosen_ids": pairs.rows.ids[2 * i].tolist(), "rejected_ids": pairs.rows.ids[2 * i + 1].tolist()}
                for i in indices]
    text = Dataset.from_list([{"chosen": "a b", "rejected": "b a"}] * 2)
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=4)
    trainer = RewardTrainer(model=_tiny_llama(vocab, 0, "classifier", **head), args=args, train_dataset=text,
                            processing_class=chat_tokenizer)
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    theirs.backward()
    their_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    model = _tiny_llama(vocab, 0, "classifier", **head)
    ours = pairs.batch(indices)
    ours.pop("labels")  # a reward model scores whole rows
    mine, metrics = RewardModel(None).loss(model, ours)
    mine.backward()
    torch.testing.assert_close(mine, theirs.detach(), atol=1e-5, rtol=1e-5)
    grads = dict(model.named_parameters())
    assert their_grads and their_grads.keys() == {n for n, p in grads.items() if p.grad is not None}
    for name, grad in their_grads.items():
        torch.testing.assert_close(grads[name].grad, grad, atol=1e-6, rtol=1e-4)
    assert int(metrics["tokens"]) == 4


def test_reward_model_run_ranks_held_out_pairs_and_loads_with_transformers(tmp_path, base_model, pairs_file):
    """From a causal-LM checkpoint (a new one-output score head): the held-out pairs' chosen answers
    end up scored above the rejected ones, and the folder scores them the same in plain transformers."""
    from transformers import AutoModelForSequenceClassification

    path = _recipe(tmp_path, base_model, pairs_file, objective={"name": "reward"}, trainer={"lr": 1e-3})
    result = CliRunner().invoke(app, ["run", path])
    assert result.exit_code == 0, result.output
    assert "reference model" not in result.output and "sample:" not in result.output  # no reference pass, no sampling
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    # measured on an AMD EPYC with native bf16 (auto = bf16): 14 -> 27 of 33, no ties (the head in fp32; in bf16,
    # 14 of 33 pairs tied and it ended at 15); in fp32: 14 -> 28 of 33 held-out pairs ranked right, loss 0.693 -> 0.535
    assert after["accuracy"] >= 0.7 and after["accuracy"] > before["accuracy"] + 0.2 and after["loss"] < before["loss"] - 0.1
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final")
    assert scorer.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    row = json.loads(pairs_file.read_text().splitlines()[0])
    texts = [tok.apply_chat_template([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[k]}],
                                     tokenize=False) for k in ("chosen", "rejected")]
    with torch.no_grad():
        chosen, rejected = (scorer(**tok(t, return_tensors="pt", add_special_tokens=False)).logits.item() for t in texts)
    assert chosen > rejected


def test_score_heads_run_in_fp32_under_bf16_autocast(base_model):
    """bf16 rounds a reward head's scores to 8 mantissa bits (similar answers tie); the head runs in fp32,
    also inside a peft adapter (which copies the head)."""
    from peft import LoraConfig, get_peft_model

    from lmforge.models.factory import load_model

    model = load_model(base_model, "classifier", num_labels=1)
    ids = torch.randint(10, 200, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids).last_hidden_state
        scores = model(input_ids=ids).logits
        rounded = torch.nn.functional.linear(hidden, model.score.weight)  # what an autocast head computes
    assert scores.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    expected = hidden.float() @ model.score.weight.T
    torch.testing.assert_close(scores, expected[:, -1], rtol=1e-5, atol=1e-5)  # the last token: unrounded
    assert (rounded.float()[:, -1] - scores).abs().max() > 1e-4  # what bf16 would have rounded away
    adapted = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert adapted(input_ids=ids).logits.dtype == torch.float32


def _own_margin(model, tok, row: dict, reward: bool) -> float:
    """chosen - rejected, computed by hand with plain transformers: the reward score, or the mean
    log-probability per answer token (the answer's tokens and its end-of-turn token)."""
    values = []
    for key in ("chosen", "rejected"):
        prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[key]}],
                                       tokenize=False)
        ids = tok(full, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model(input_ids=ids).logits.float()
        if reward:
            values.append(out[0, -1].item())
            continue
        start = len(tok(prompt, add_special_tokens=False).input_ids)
        answer = full[len(prompt):]
        end = start + len(tok(answer.split(tok.eos_token)[0] + tok.eos_token, add_special_tokens=False).input_ids) \
            if tok.eos_token in answer else ids.shape[1]
        logps = out[0, start - 1:end - 1].log_softmax(-1).gather(-1, ids[0, start:end, None]).squeeze(-1)
        values.append(logps.mean().item())
    return values[0] - values[1]


def test_eval_scores_preference_pairs_by_likelihood_or_reward(tmp_path, base_model, chat_tokenizer, pairs_file, monkeypatch):
    """`lmforge eval --task FILE` on preference pairs: a causal LM ranks answers by its per-token
    likelihood, a reward model by its score; each equals the hand computation with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    monkeypatch.setenv("LMFORGE_AUTO_PRECISION", "fp32")  # the hand computation is in fp32
    rows = [r for r in map(json.loads, pairs_file.read_text().splitlines()) if len(r["prompt"]) < 400][:24]
    task = tmp_path / "held_out.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward_dir = tmp_path / "run"
    path = _recipe(tmp_path, base_model, pairs_file, objective={"name": "reward"},
                   trainer={"max_steps": 4, "eval_every": 100, "eval_at_start": False})
    assert CliRunner().invoke(app, ["run", path]).exit_code == 0
    tok = chat_tokenizer  # the base's tokenizer with the chat template lmforge gives a model that has none
    for model_dir, loader, reward in [(base_model, AutoModelForCausalLM, False),
                                      (reward_dir / "final", AutoModelForSequenceClassification, True)]:
        out = tmp_path / ("eval_reward" if reward else "eval_lm")
        # a named task, or the user's file as --data: the metric follows from its columns either way
        args, name = (["--task", f"prefs={task}"], "prefs") if reward else (["--data", str(task)], "held_out")
        result = CliRunner().invoke(app, ["eval", "-m", str(model_dir), *args, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "preference accuracy" in result.output
        entry = json.loads((out / "eval.json").read_text())["tasks"][name]
        assert entry["kind"] == "preferences" and entry["after"]["pairs"] == len(rows) and entry["after"]["dropped"] == 0
        model = loader.from_pretrained(model_dir).eval()
        margins = [_own_margin(model, tok, r, reward) for r in rows]
        assert entry["after"]["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(rows))
        assert entry["after"]["mean_margin"] == pytest.approx(sum(margins) / len(rows), abs=1e-4)


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_check_measures_preference_steps(tmp_path, base_model, pairs_file, objective):
    """The pre-launch check runs real steps on pair batches (both answers of each pair, and for DPO the
    reference's log-probabilities): it used to fail every DPO recipe with 'no reference log-probabilities'."""
    result = CliRunner().invoke(app, ["check", _recipe(tmp_path, base_model, pairs_file, objective={"name": objective})])
    assert result.exit_code == 0, result.output
    assert re.search(r"measured: [\d.]+ s/step, [\d,]+ tokens/s", result.output), result.output


def test_a_dpo_stage_is_scored_after_training_against_its_start_model(tmp_path, base_model, pairs_file):
    """eval.json's DPO entry: the final (merged) model against the stage's start, as in training. It once took
    the final model as its own reference (every pair a tie) after recomputing it on every training pair."""
    import yaml

    pipeline = {"name": "prefs", "output_dir": str(tmp_path / "pipe"),
                "defaults": {"tokenizer": {"path": str(base_model)}, "model": {"path": str(base_model)},
                             "data": {"train_files": [str(pairs_file)], "val_fraction": 0.1}, "packing": {"seq_len": 256},
                             "method": {"name": "lora", "lora": {"rank": 8}},
                             "trainer": {"max_steps": 20, "batch_size": 4, "lr": 5e-3, "eval_every": 20, "progress": False}},
                "stages": {"dpo": {"objective": {"name": "dpo", "beta": 0.1}}}}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    trained = read_metrics(tmp_path / "pipe" / "dpo" / "metrics.jsonl", "val")[-1]
    after = json.loads((tmp_path / "pipe" / "dpo" / "eval.json").read_text())["tasks"]["dpo"]["after"]
    assert after["ties"] < 0.2 and after["accuracy"] > 0.5
    assert after["accuracy"] == pytest.approx(trained["accuracy"], abs=1 / 33 + 1e-9)  # one pair may flip in merging
    assert after["loss"] == pytest.approx(trained["loss"], abs=0.02)


def _pairs_batch(chat_tokenizer, pairs_file, rows: int = 4):
    pairs = load_preferences([str(pairs_file)], chat_tokenizer, InstructionFormat(), "chosen", "rejected", 256, 0.0,
                             max_rows=6).train
    return pairs, pairs.batch(list(range(rows)))


def _trl_logps(model, batch, average: bool):
    """TRL's own log-probabilities (CPOTrainer.get_batch_logps: it shifts labels itself) of the same rows,
    chosen rows first, then rejected, as TRL concatenates them; and the logits it used."""
    from trl.experimental.cpo import CPOTrainer

    # one more position at the end (a causal model's earlier logits do not see it), so TRL's shift
    # (logits[:, :-1] against labels[:, 1:]) scores exactly lmforge's pre-shifted labels
    ids = torch.cat([batch["input_ids"], batch["input_ids"][:, -1:]], dim=1)
    logits = model(input_ids=ids).logits
    unshifted = torch.cat([torch.full_like(batch["labels"][:, :1], IGNORE), batch["labels"]], dim=1)
    logps = CPOTrainer.get_batch_logps(logits, unshifted, average_log_prob=average)
    return logps[0::2], logps[1::2], logits, unshifted


def _same_gradients(ours_model, theirs_model):
    theirs = {n: p.grad for n, p in theirs_model.named_parameters() if p.grad is not None}
    ours = {n: p.grad for n, p in ours_model.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() and ours
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-6, rtol=1e-4)


def test_simpo_loss_and_gradients_match_trl_cpo_simpo(chat_tokenizer, pairs_file):
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer

    from lmforge.config import ObjectiveConfig
    from lmforge.objectives.simpo import SimplePreference

    _, batch = _pairs_batch(chat_tokenizer, pairs_file)
    vocab = (len(chat_tokenizer) + 63) // 64 * 64
    ours_model, theirs_model = _tiny_llama(vocab, 0), _tiny_llama(vocab, 0)
    cfg = ObjectiveConfig(name="simpo", beta=2.0, simpo_gamma=0.5)
    mine, metrics = SimplePreference(cfg).loss(ours_model, batch)
    mine.backward()
    chosen, rejected, _, _ = _trl_logps(theirs_model, batch, average=True)
    trainer = SimpleNamespace(alpha=0.0, beta=2.0, simpo_gamma=0.5, loss_type="simpo", label_smoothing=0.0,
                              accelerator=SimpleNamespace(device="cpu"))
    losses, _, _ = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    losses.mean().backward()
    torch.testing.assert_close(mine, losses.mean().detach(), atol=1e-5, rtol=1e-5)
    _same_gradients(ours_model, theirs_model)
    assert int(metrics["tokens"]) == 4  # pairs


def test_orpo_loss_and_gradients_match_trl(chat_tokenizer, pairs_file):
    from types import SimpleNamespace

    import torch.nn.functional as F
    from trl.experimental.orpo import ORPOTrainer

    from lmforge.config import ObjectiveConfig
    from lmforge.objectives.orpo import OddsRatioPreference

    _, batch = _pairs_batch(chat_tokenizer, pairs_file)
    vocab = (len(chat_tokenizer) + 63) // 64 * 64
    ours_model, theirs_model = _tiny_llama(vocab, 0), _tiny_llama(vocab, 0)
    mine, _ = OddsRatioPreference(ObjectiveConfig(name="orpo", beta=0.25)).loss(ours_model, batch)
    mine.backward()
    chosen, rejected, logits, unshifted = _trl_logps(theirs_model, batch, average=True)
    trainer = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)[0]
    # ORPOTrainer's NLL: cross-entropy over the chosen rows' answer tokens (concatenated_forward)
    nll = F.cross_entropy(logits[0::2, :-1].flatten(0, 1), unshifted[0::2, 1:].flatten(), ignore_index=IGNORE)
    theirs = nll - losses.mean()
    theirs.backward()
    torch.testing.assert_close(mine, theirs.detach(), atol=1e-5, rtol=1e-5)
    _same_gradients(ours_model, theirs_model)


def test_ipo_loss_and_gradients_match_trl(tmp_path, chat_tokenizer, pairs_file):
    """IPO through TRL's DPOTrainer with loss_type="ipo" (per-token log-ratios), as the DPO test does."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lmforge.config import ObjectiveConfig
    from lmforge.objectives.dpo import DirectPreference, attach_reference

    pairs, _ = _pairs_batch(chat_tokenizer, pairs_file)
    vocab = (len(chat_tokenizer) + 63) // 64 * 64
    policy, reference = _tiny_llama(vocab, 0), _tiny_llama(vocab, 1)
    attach_reference(reference, pairs, 3, torch.device("cpu"), "fp32")
    indices = [0, 1, 2, 3]
    examples = []
    for i in indices:
        sides = [pairs.rows.ids[2 * i + k] for k in (0, 1)]
        start = int((pairs.rows.targets[2 * i] != IGNORE).argmax())
        examples.append({"prompt_ids": sides[0][:start].tolist(), "chosen_ids": sides[0][start:].tolist(),
                         "rejected_ids": sides[1][start:].tolist()})
    text = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=["ipo"], report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=4, max_length=None)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=text, processing_class=chat_tokenizer)
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    theirs.backward()
    model = _tiny_llama(vocab, 0)
    mine, _ = DirectPreference(ObjectiveConfig(name="dpo", beta=0.3, loss_type="ipo")).loss(model, pairs.batch(indices))
    mine.backward()
    torch.testing.assert_close(mine, theirs.detach(), atol=1e-5, rtol=1e-5)
    _same_gradients(model, trainer.model)


@pytest.mark.parametrize("objective", [  # orpo and ipo slow: the default run keeps one of the family end to end
    pytest.param({"name": "simpo", "beta": 2.0}, id="simpo"),
    pytest.param({"name": "orpo", "beta": 0.1}, id="orpo", marks=pytest.mark.slow),
    pytest.param({"name": "dpo", "loss_type": "ipo", "beta": 0.5}, id="ipo", marks=pytest.mark.slow)])
def test_the_dpo_family_learns_to_prefer_the_chosen_answers(tmp_path, base_model, pairs_file, objective):
    """Each trains from the CLI and moves the held-out pairs toward the chosen answer."""
    result = CliRunner().invoke(app, ["run", _recipe(tmp_path, base_model, pairs_file, objective=objective,
                                                     trainer={"lr": 1e-3})])
    assert result.exit_code == 0, result.output
    assert ("computing the reference model's log-probabilities" in result.output) == (objective["name"] == "dpo")
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    assert after["likelihood_accuracy"] > before["likelihood_accuracy"] + 0.2, (before, after)


def _unpaired_file(tmp_path, pairs_file, rows: int = 40):
    """KTO's unpaired examples from the bundled pairs: each pair's chosen answer marked desirable, its
    rejected one (as a separate example) undesirable."""
    out = tmp_path / "unpaired.jsonl"
    lines = []
    for line in pairs_file.read_text().splitlines()[: rows // 2]:
        row = json.loads(line)
        lines += [json.dumps({"prompt": row["prompt"], "response": row["chosen"], "label": True}),
                  json.dumps({"prompt": row["prompt"], "response": row["rejected"], "label": "false"})]
    out.write_text("\n".join(lines) + "\n")
    return out


def test_kto_loss_and_gradients_match_trl(tmp_path, chat_tokenizer, pairs_file):
    """The same examples, mismatched pairs and reference log-probabilities through TRL's KTOTrainer
    (its collator, its loss) and through lmforge's KTO: same loss, same gradients."""
    from trl import KTOConfig, KTOTrainer

    from lmforge.data.preferences import load_unpaired
    from lmforge.objectives.dpo import attach_reference
    from lmforge.objectives.kto import KahnemanTversky

    examples = load_unpaired([str(_unpaired_file(tmp_path, pairs_file, 16))], chat_tokenizer, InstructionFormat(), "label",
                             256, 0.0).train
    vocab = (len(chat_tokenizer) + 63) // 64 * 64
    policy, reference = _tiny_llama(vocab, 0), _tiny_llama(vocab, 1)
    attach_reference(reference, examples, 3, torch.device("cpu"), "fp32")
    flags = examples.desirable.tolist()
    indices = [i for i, d in enumerate(flags) if d][:2] + [i for i, d in enumerate(flags) if not d][:2]  # of each kind
    ours = examples.batch(indices)
    theirs_examples = []
    for i in indices:
        rows = [examples.rows.ids[2 * i + k] for k in (0, 1)]
        starts = [int((examples.rows.targets[2 * i + k] != IGNORE).argmax()) for k in (0, 1)]
        assert starts[0] == starts[1] and (rows[0][: starts[0]] == rows[1][: starts[0]]).all()  # one prompt, two answers
        theirs_examples.append({"prompt_ids": rows[0][: starts[0]].tolist(), "completion_ids": rows[0][starts[0]:].tolist(),
                                "KL_completion_ids": rows[1][starts[1]:].tolist(), "label": bool(examples.desirable[i]),
                                "ref_logps": float(examples.reference_logps[2 * i]),
                                "ref_KL_logps": float(examples.reference_logps[2 * i + 1])})
    from datasets import Dataset

    policy.save_pretrained(tmp_path / "policy")
    text = Dataset.from_list([{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d", "label": False}])
    args = KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=4, max_length=None, desirable_weight=1.3)
    trainer = KTOTrainer(model=str(tmp_path / "policy"), args=args, train_dataset=text, processing_class=chat_tokenizer)
    trainer.precompute_ref_logps = True  # the batch carries the reference's log-probabilities, as lmforge's does
    theirs = trainer._compute_loss(trainer.model, trainer.data_collator(theirs_examples), False)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    theirs.backward()
    their_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    model = _tiny_llama(vocab, 0)
    objective = KahnemanTversky(type("Cfg", (), {"beta": 0.1, "desirable_weight": 1.3, "undesirable_weight": None})())
    mine, metrics = objective.loss(model, ours)
    mine.backward()
    torch.testing.assert_close(mine, theirs.detach(), atol=1e-6, rtol=1e-5)
    assert float(metrics["kl"]) >= 0 and int(metrics["tokens"]) == 4
    grads = dict(model.named_parameters())
    assert their_grads.keys() == {n for n, p in grads.items() if p.grad is not None}
    for name, grad in their_grads.items():
        torch.testing.assert_close(grads[name].grad, grad, atol=1e-7, rtol=1e-4)


@pytest.mark.slow  # ~33 s with its held-out answers; CI runs it
def test_kto_run_learns_which_answers_are_desirable(tmp_path, base_model, pairs_file):
    """From unpaired examples: step 0 ties everywhere (policy = reference); after 60 steps the held-out
    examples' implicit rewards mostly carry the sign of their labels."""
    data = _unpaired_file(tmp_path, pairs_file, 300)
    path = _recipe(tmp_path, base_model, data, objective={"name": "kto", "beta": 0.1},
                   data={"train_files": [str(data)], "val_fraction": 0.1, "response_column": "response"}, trainer={"lr": 1e-3, "max_steps": 60, "eval_every": 30, "batch_size": 8})
    result = CliRunner().invoke(app, ["run", path])
    assert result.exit_code == 0, result.output
    assert "examples (with a mismatched pair each)" in result.output
    before, *_, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    # measured: 0.45 at step 30, 0.85 at step 60 (20 held-out examples): KTO's per-example signal needs
    # more steps and a larger batch (its KL estimate) than DPO's pairs
    assert before["ties"] == 1.0 and after["ties"] < 0.2
    assert after["accuracy"] >= 0.7 and after["loss"] < before["loss"] - 0.02, after
    assert "kl" in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")[-1]


def test_a_bad_desirable_flag_is_named(tmp_path, chat_tokenizer):
    from lmforge.data.preferences import load_unpaired

    path = tmp_path / "unpaired.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "yes", "label": True}) + "\n"
                    + json.dumps({"prompt": "p", "response": "no", "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"unpaired.jsonl:2: 'label' is 'maybe'; a desirable flag is true / false"):
        load_unpaired([str(path)], chat_tokenizer, InstructionFormat(), "label", 64, 0.0)


def test_held_out_answers_of_a_preference_stage_are_its_own_held_out_pairs(chat_tokenizer, pairs_file):
    """A DPO stage's answers are asked on the pairs its held-out preference metrics used and are scored
    against the chosen answer, and by whether they lie nearer the chosen or the rejected one."""
    from lmforge.eval.generation import held_out_pairs, nearer_the_chosen
    from lmforge.recipe_files import validate_recipe

    recipe = validate_recipe({"objective": {"name": "dpo"}, "packing": {"seq_len": 256},
                              "data": {"train_files": [str(pairs_file)], "max_docs": 40, "val_fraction": 0.25}})
    pairs = held_out_pairs(recipe, chat_tokenizer, 100)
    sets = load_preferences([str(pairs_file)], chat_tokenizer, InstructionFormat(), "chosen", "rejected", 256, 0.25,
                            max_rows=40)
    assert 0 < len(pairs) == len(sets.val) < 40
    chosen = [str(c[-1]["content"]) for c, _ in pairs]
    rejected = [str(r[-1]["content"]) for _, r in pairs]
    assert all(c[:-1] == r[:-1] for c, r in pairs)  # one prompt, two answers
    assert nearer_the_chosen(chosen, chosen, rejected)["closer_to_chosen"] == 1.0
    assert nearer_the_chosen(rejected, chosen, rejected)["closer_to_chosen"] == 0.0
