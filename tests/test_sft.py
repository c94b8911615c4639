"""Instruction tuning: chat templates, prompt-masked labels, length-grouped and packed batches, the
answer-only output layer, and end-to-end runs that lower the held-out answer loss."""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.formats import DataError
from lmforge.data.instructions import (
    BUILTIN_CHAT_TEMPLATE,
    IGNORE,
    Examples,
    InstructionFormat,
    PackedExamples,
    load_instructions,
)
from lmforge.data.packing import iterate_batches
from lmforge.engine.metrics import read_metrics
from lmforge.objectives.base import causal_lm_loss, token_cross_entropy

from .conftest import REPO, assert_cli_resume_is_exact, write_recipe

INSTRUCTIONS = REPO / "assets" / "corpora" / "instructions_excerpt.jsonl.gz"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture()
def chat_tokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = BUILTIN_CHAT_TEMPLATE
    return tok


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _learned_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_only_answers_and_their_eos_are_learned(tmp_path, chat_tokenizer):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."}]
    fmt = InstructionFormat(prompt_template="{instruction}\n{input}", response_column="output")
    sets = load_instructions([_write(tmp_path / "a.jsonl", rows)], chat_tokenizer, fmt, 128, 0.0)
    ids, labels = sets.train.ids[0], sets.train.targets[0]
    assert _learned_text(chat_tokenizer, ids, labels) == "The sum is 5." + chat_tokenizer.eos_token
    assert "2 and 3" in chat_tokenizer.decode(ids)  # the prompt is in the input, just not learned
    assert (labels[: len(ids) // 2] == IGNORE).all()


def test_multi_turn_conversation_with_the_tokenizers_own_template(tmp_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome."}]
    sets = load_instructions([_write(tmp_path / "c.jsonl", [{"messages": messages}])], tok, InstructionFormat(), 256, 0.0)
    learned = _learned_text(tok, sets.train.ids[0], sets.train.targets[0])
    assert learned.replace(" ", "") == "Paris.<|im_end|>\nRome.<|im_end|>\n".replace(" ", "")
    assert "France" not in learned and "Be brief" not in learned


def test_unstable_template_and_bad_rows_are_named(tmp_path, chat_tokenizer):
    chat_tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    good = _write(tmp_path / "g.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(DataError, match=r"g\.jsonl:1: the chat template .* prefix-stable"):
        load_instructions([good], chat_tokenizer, InstructionFormat(), 64, 0.0)
    bad = _write(tmp_path / "b.jsonl", [{"prompt": "p", "response": "r"}, {"question": "q"}])
    with pytest.raises(DataError, match=r"b\.jsonl:2: no column 'prompt', 'response'"):
        load_instructions([bad], chat_tokenizer, InstructionFormat(), 64, 0.0)
    lonely = _write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: the conversation has no assistant turn"):
        load_instructions([lonely], chat_tokenizer, InstructionFormat(), 64, 0.0)


def test_long_examples_dropped_truncated_or_refused(tmp_path, chat_tokenizer):
    rows = [{"prompt": "short", "response": "ok"}, {"prompt": "long " * 200, "response": "ok"}]
    path = _write(tmp_path / "l.jsonl", rows)
    assert load_instructions([path], chat_tokenizer, InstructionFormat(), 64, 0.0).dropped == 1
    with pytest.raises(DataError, match=r"l\.jsonl:2: the example has .* tokens, more than packing.seq_len=64"):
        load_instructions([path], chat_tokenizer, InstructionFormat(), 64, 0.0, long_examples="error")
    # truncation that cuts the whole answer off leaves nothing to learn: dropped, not trained on
    truncated = load_instructions([path], chat_tokenizer, InstructionFormat(), 64, 0.0, long_examples="truncate")
    assert len(truncated.train) == 1 and truncated.dropped == 1


@pytest.fixture(scope="module")
def excerpt_sets(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = BUILTIN_CHAT_TEMPLATE
    return tok, load_instructions([str(INSTRUCTIONS)], tok, InstructionFormat(), 512, 0.05)


def test_grouped_batches_cover_each_example_once_with_little_padding(excerpt_sets):
    _, sets = excerpt_sets
    train = sets.train
    batches = train.epoch_batches(8, seed=0, epoch=0)
    seen = np.concatenate(batches)
    assert len(seen) == len(set(seen.tolist())) == len(train) // 8 * 8
    assert train.padding_fraction(8, seed=0) < 0.02
    shuffled = Examples(train.ids, train.targets, train.pad_id, group_size=1)  # no grouping: random batches
    assert shuffled.padding_fraction(8, seed=0) > 0.3
    batch = train.batch(batches[0].tolist())
    real = int(batch["num_tokens"])
    assert real == int(train.lengths[batches[0]].sum()) and real <= batch["input_ids"].numel()
    # resuming at batch 5 yields what an uninterrupted stream yields there
    full = iterate_batches(train, 8, seed=3)
    for _ in range(5):
        next(full)
    assert torch.equal(next(full)["input_ids"], next(iterate_batches(train, 8, seed=3, start_batch=5))["input_ids"])


def test_packed_examples_never_learn_across_an_example_boundary(excerpt_sets):
    _, sets = excerpt_sets
    packed = PackedExamples(sets.train, 128, document_mask=True, seed=0)
    assert len(packed) == (int(sum(len(i) for i in sets.train.ids)) - 1) // 128
    batch = packed.batch([0, 1])
    assert batch["input_ids"].shape == (2, 128) and batch["position_ids"][0, 0] == 0
    starts = set(packed.doc_ends[:-1].tolist())
    targets_at_starts = [packed.targets[s] for s in starts]
    assert all(t == IGNORE for t in targets_at_starts)


def _tiny(family: str, vocab: int):
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("labelled_only", [True, False])
def test_fused_output_layer_matches_the_full_logits_path(excerpt_sets, family, labelled_only):
    tok, sets = excerpt_sets
    model = _tiny(family, len(tok))
    batch = sets.train.batch(list(range(6)))
    fast, count = causal_lm_loss(model, batch, labelled_only=labelled_only)
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full, _ = token_cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])  # logits for every position
    full.backward()
    assert int(count) == int((batch["labels"] != IGNORE).sum())
    torch.testing.assert_close(fast, full)
    for p, g in zip(model.parameters(), fast_grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


def test_chunked_linear_cross_entropy_equals_torch(monkeypatch):
    import lmforge.objectives.base as base

    monkeypatch.setattr(base, "LOGITS_PER_CHUNK", 7 * 300)  # 7 rows per chunk: many chunks, a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(45, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.3).requires_grad_()
    labels = torch.randint(0, 300, (45,))
    labels[::4] = IGNORE
    ours = base.linear_cross_entropy(hidden, weight, labels) * 3.0  # an upstream gradient other than 1
    ours.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE) * 3.0
    reference.backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], weight.grad)


def test_chunked_linear_cross_entropy_under_bf16_autocast_matches_torch(monkeypatch):
    """Under autocast the output layer runs in bf16 like the model's own forward would, the softmax in fp32."""
    import lmforge.objectives.base as base

    monkeypatch.setattr(base, "LOGITS_PER_CHUNK", 16 * 300)
    torch.manual_seed(0)
    hidden = torch.randn(45, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.3).requires_grad_()
    labels = torch.randint(0, 300, (45,))
    labels[::5] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = base.linear_cross_entropy(hidden, weight, labels)
        ours.backward()
        got = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        reference = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=IGNORE)
        reference.backward()
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got[0], hidden.grad, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(got[1], weight.grad, atol=2e-3, rtol=2e-2)


def test_loss_equals_transformers_on_the_same_labels(excerpt_sets):
    """Our pre-shifted labels and HF's shift-inside give the same number on the same inputs."""
    tok, sets = excerpt_sets
    model = _tiny("llama", len(tok))
    index = 3
    ids = torch.as_tensor(sets.train.ids[index])[None]
    targets = torch.as_tensor(sets.train.targets[index])[None]
    ours, _ = causal_lm_loss(model, {"input_ids": ids[:, :-1], "labels": targets[:, 1:]}, labelled_only=True)
    theirs = model(input_ids=ids, labels=targets).loss
    torch.testing.assert_close(ours, theirs)


def _recipe(tmp_path, base, **sections) -> str:
    return write_recipe(tmp_path, base, {
        "data": {"train_files": [str(INSTRUCTIONS)], "val_fraction": 0.05}, "objective": {"name": "sft"},
        "trainer": {"max_steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 4, "eval_every": 40, "eval_batches": 4},
    }, sections)


def _val_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "val")]


def test_sft_run_lowers_held_out_answer_loss_and_saves_the_template(tmp_path, base_model):
    result = CliRunner().invoke(app, ["run", _recipe(tmp_path, base_model)])
    assert result.exit_code == 0, result.output
    assert "grouped by length" in result.output and "sample: 'Name a colour.' ->" in result.output
    first, last = _val_losses(tmp_path / "run")
    assert last < first - 0.5
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert tok.chat_template == BUILTIN_CHAT_TEMPLATE  # inference renders prompts as training did


def test_packed_sft_trains_too(tmp_path, base_model):
    path = _recipe(tmp_path, base_model, packing={"examples": "packed", "document_mask": True, "seq_len": 128})
    result = CliRunner().invoke(app, ["run", path, "trainer.max_steps=20", "trainer.eval_every=20"])
    assert result.exit_code == 0, result.output
    assert "packed into" in result.output
    first, last = _val_losses(tmp_path / "run")
    assert last < first


@pytest.mark.parametrize("method, marker, drop", [
    ({"name": "lora", "lora": {"rank": 8, "alpha": 16, "base_dtype": "auto"}}, "lora_", 0.2),
    # slow: int8 GEMMs without VNNI (an AMD EPYC) made this 237 s of the suite
    pytest.param({"name": "lora", "lora": {"rank": 8, "alpha": 16, "base_dtype": "int8"}}, "lora_", 0.2,
                 marks=pytest.mark.slow),
    # (IA)^3 trains 4,864 numbers here (LoRA 157,696): it learns less (6.26 -> 6.09 vs 5.79), but learns
    ({"name": "ia3"}, "ia3_", 0.1),
], ids=["lora", "lora-int8", "ia3"])
def test_adapters_train_alone_and_load_with_plain_peft(tmp_path, base_model, method, marker, drop):
    from peft import PeftModel

    from lmforge.models.factory import load_model

    path = _recipe(tmp_path, base_model, method=method, trainer={"lr": 1e-2, "save_every": 20})
    result = CliRunner().invoke(app, ["run", path])
    assert result.exit_code == 0, result.output
    first, last = _val_losses(tmp_path / "run")
    assert last < first - drop
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    # the checkpoint holds the adapters only (the frozen base comes from model.path)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000040" / "model.safetensors")
    assert saved and all(marker in name for name in saved)
    # plain peft on the base == lmforge's merged load; the base itself is untouched
    base = LlamaForCausalLM.from_pretrained(base_model)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    base_logits = base(ids).logits
    peft_logits = PeftModel.from_pretrained(base, str(final))(ids).logits
    merged_logits = load_model(final, "causal_lm")(ids).logits
    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(LlamaForCausalLM.from_pretrained(base_model)(ids).logits, base_logits)


@pytest.mark.parametrize("base_dtype", ["auto", pytest.param("int8", marks=pytest.mark.slow)])  # int8: 150 s
def test_lora_resume_is_exact(tmp_path, base_model, base_dtype):
    path = _recipe(tmp_path, base_model, method={"name": "lora", "lora": {"base_dtype": base_dtype}},
                   trainer={"max_steps": 12, "save_every": 6, "eval_every": 100, "eval_at_start": False})
    assert_cli_resume_is_exact(path, tmp_path / "run", "adapter_model.safetensors", last_step=12)


def test_lora_needs_a_pretrained_base(tmp_path, tokenizer_dir):
    path = _recipe(tmp_path, tokenizer_dir, method={"name": "lora"})
    recipe = yaml.safe_load(Path(path).read_text())
    recipe["model"] = {"family": "llama", "preset": "tiny"}
    Path(path).write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", path])
    assert result.exit_code == 2 and "set model.path" in result.output


def test_bundled_excerpt_is_real_instruction_data():
    with gzip.open(INSTRUCTIONS, "rt") as handle:
        rows = [json.loads(line) for line in handle]
    assert len(rows) > 1000 and len({r["task"] for r in rows}) > 50
    assert all(r["prompt"] and "response" in r for r in rows)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_steps_change_adapters_only(base_model, dora):
    """In-process: after real optimizer steps every base weight is bit-identical, the adapters moved
    (DoRA: its magnitude vectors too)."""
    from lmforge.config import MethodConfig, TrainerConfig
    from lmforge.data.instructions import InstructionFormat as Fmt
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.engine.loop import train
    from lmforge.methods import apply_method
    from lmforge.models.factory import load_model
    from lmforge.objectives.sft import SupervisedFineTuning

    tok = load_tokenizer(base_model)
    tok.chat_template = BUILTIN_CHAT_TEMPLATE
    examples = load_instructions([str(INSTRUCTIONS)], tok, Fmt(), 256, 0.0, max_rows=200).train
    model, groups = apply_method(load_model(base_model, "causal_lm"), MethodConfig(name="lora", lora={"rank": 4, "dora": dora}), 0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    cfg = TrainerConfig(max_steps=5, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, eval_every=100)
    train(model, SupervisedFineTuning(), groups, cfg, Path(base_model).parent / f"lora_loop_{dora}",
          batches=lambda start: iterate_batches(examples, 4, 0, start), batches_per_epoch=len(examples) // 4,
          tokens_per_batch=400, log=lambda s: None)
    after = {n: p.detach().cpu() for n, p in model.named_parameters()}  # train() moved it to the GPU, if any
    assert all(torch.equal(after[n], before[n]) for n in before if n not in trained)
    assert any(not torch.equal(after[n], before[n]) for n in trained if "lora_B" in n)
    assert dora == any("lora_magnitude_vector" in n for n in trained)
    if dora:
        assert any(not torch.equal(after[n], before[n]) for n in trained if "magnitude" in n)


def test_lora_on_an_int8_base_quantizes_every_block_layer_and_trains_like_fp32(base_model):
    """Every frozen projection of every block becomes int8 (a quarter of the bytes), the adapters are
    the same as on an fp32 base, the losses stay close, compiled blocks compute what eager ones do,
    and after real steps the int8 weights are untouched while the adapters moved."""
    from lmforge.config import MethodConfig, TrainerConfig
    from lmforge.engine.loop import train
    from lmforge.engine.runtime import compile_for_training
    from lmforge.methods import apply_method
    from lmforge.models.factory import load_model
    from lmforge.models.int8 import Int8Linear
    from lmforge.objectives.clm import CausalLM

    def lora(base_dtype):
        torch.manual_seed(0)
        return apply_method(load_model(base_model, "causal_lm"), MethodConfig(name="lora", lora={"rank": 4, "base_dtype": base_dtype}), 0.0)

    reference, _ = lora("fp32")
    model, groups = lora("int8")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert len(layers) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    assert all(n.endswith(".base_layer") for n in layers)
    fp32_bytes = sum(m.weight.numel() * 4 for n, m in reference.named_modules() if n in layers)
    assert sum(m.qweight.numel() for m in layers.values()) * 4 == fp32_bytes
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in reference.named_parameters() if p.requires_grad}

    rows = torch.randint(0, model.config.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}
    int8_loss = CausalLM().loss(model, batch)[0].detach()
    assert abs(float(int8_loss) - float(CausalLM().loss(reference, batch)[0])) < 0.02 * float(int8_loss)
    compiled = compile_for_training(model, "blocks")
    torch.testing.assert_close(CausalLM().loss(compiled.module, batch)[0], int8_loss, rtol=1e-4, atol=1e-4)
    compiled.undo()

    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainerConfig(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, eval_every=100)
    train(model, CausalLM(), groups, cfg, Path(base_model).parent / "lora_int8",
          batches=lambda start: iter([batch] * 3), batches_per_epoch=3, tokens_per_batch=128, log=lambda s: None)
    # .cpu(): train() moved the model to the GPU, if any
    assert all(torch.equal(b.cpu(), before[n]) for n, b in model.named_buffers() if n in before)
    assert any(not torch.equal(p.detach().cpu(), adapters[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_int8_base_and_dora_are_refused_by_name(tmp_path, base_model):
    path = _recipe(tmp_path, base_model, method={"name": "lora", "lora": {"base_dtype": "int8", "dora": True}})
    result = CliRunner().invoke(app, ["train", path])
    assert result.exit_code == 2 and "method.lora" in result.output and "dora" in result.output


def test_check_lists_bad_instruction_rows_before_anything_runs(tmp_path, base_model):
    data = _write(tmp_path / "rows.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "only a prompt"}, "not an object"])
    path = _recipe(tmp_path, base_model, data={"train_files": [data]})
    result = CliRunner().invoke(app, ["train", path])
    assert result.exit_code == 2
    assert "rows.jsonl:2: no column 'response'" in result.output and "rows.jsonl:3" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, lr", [("prompt_tuning", 0.3), pytest.param("p_tuning", 1e-2, marks=pytest.mark.slow),
                                      # no KV cache under peft's prefix: its held-out answers take minutes
                                      pytest.param("prefix_tuning", 1e-2, marks=pytest.mark.slow)])
def test_prompt_learning_trains_virtual_tokens_only_and_loads_with_plain_peft(tmp_path, base_model, name, lr):
    from peft import PeftModel

    from lmforge.eval.generate import generate_text
    from lmforge.models.factory import load_model
    from lmforge.objectives.base import causal_lm_loss

    path = _recipe(tmp_path, base_model, method={"name": name, "prompt": {"virtual_tokens": 8}},
                   trainer={"lr": lr, "save_every": 20})
    # `train`: the stage evaluation of `run` is not what this tests (prefix_tuning, slow anyway, keeps `run`:
    # its samples are one more generate through peft's prefix, the path peft 0.22.0 broke; see pyproject.toml)
    result = CliRunner().invoke(app, ["run" if name == "prefix_tuning" else "train", path])
    assert result.exit_code == 0, result.output
    first, last = _val_losses(tmp_path / "run")
    assert last < first - 0.1
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000040" / "model.safetensors")
    assert saved and all(n.startswith("prompt_encoder.") for n in saved)  # the base stays frozen
    # lmforge's objective = the next-token loss of the real tokens under plain peft's model (whose
    # logits cover the virtual tokens too, in front, for prompt and P-tuning)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 8]])
    plain = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_model), str(final))
    ours = load_model(final, "causal_lm")
    with torch.no_grad():
        theirs = torch.nn.functional.cross_entropy(plain(input_ids=ids).logits[0, -7:-1], ids[0, 1:])
        mine, _ = causal_lm_loss(ours, {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.tensor([[-100]])], 1)})
        with plain.disable_adapter():
            untuned = torch.nn.functional.cross_entropy(plain(input_ids=ids).logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    assert abs(theirs - untuned) > 1e-3
    # greedy sampling continues as full forward passes do (prefix tuning: peft's prefix reaches generate)
    tok = AutoTokenizer.from_pretrained(final)
    prompt = tok("Name a colour.", return_tensors="pt", add_special_tokens=False).input_ids
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, ours(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    expected = tok.decode(seq[0, prompt.shape[1]:], skip_special_tokens=True)
    assert generate_text(ours, tok, "Name a colour.", max_new_tokens=4, temperature=0.0) == expected


def test_sharegpt_conversations_map_their_speakers_to_chat_roles(tmp_path):
    from lmforge.config import ConfigError
    from lmforge.data.formats import DataError
    from lmforge.data.instructions import InstructionFormat, iter_conversations
    from lmforge.recipe_files import validate_recipe

    path = tmp_path / "chats.jsonl"
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                               {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye?"},
                               {"from": "gpt", "value": "Bye."}]},
            {"conversations": [{"from": "alien", "value": "?"}, {"from": "gpt", "value": "!"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = list(iter_conversations([str(path)], InstructionFormat()))
    assert [m["role"] for m in first[1]] == ["system", "user", "assistant", "user", "assistant"]
    assert first[1][2]["content"] == "Hello."
    assert isinstance(second, DataError) and "chats.jsonl:2: turn 0 is from the unknown speaker 'alien'" in str(second)
    # a named column of ShareGPT turns works the same
    path.write_text(json.dumps({"chat": rows[0]["conversations"]}) + "\n")
    (only,) = list(iter_conversations([str(path)], InstructionFormat(messages_column="chat")))
    assert [m["role"] for m in only[1]][-1] == "assistant"
    with pytest.raises(ConfigError, match="give data.messages_column .* or data.prompt_template"):
        validate_recipe({"data": {"messages_column": "chat", "prompt_template": "{q}"}}, "r.yaml")


def test_chat_keeps_the_conversation_streams_replies_and_resets(tmp_path, base_model, monkeypatch):
    """`lmforge chat`: each turn is rendered with the whole conversation so far (system prompt first), the
    reply streams through the CLI, /reset forgets, end of input leaves with exit code 0."""
    import lmforge.chat as chat_module
    from lmforge.data.instructions import ensure_chat_template

    model = tmp_path / "chat_model"
    shutil.copytree(base_model, model)
    tok = AutoTokenizer.from_pretrained(model)
    ensure_chat_template(tok, None)
    tok.save_pretrained(model)
    prompts = []
    real = chat_module.generate_many

    def spy(m, t, requests, *args, **kwargs):
        prompts.append(t.decode(requests[0].ids))
        return real(m, t, requests, *args, **kwargs)

    monkeypatch.setattr(chat_module, "generate_many", spy)
    result = CliRunner().invoke(app, ["chat", str(model), "--system", "Be brief.", "--max-new-tokens", "3"],
                                input="first question\nsecond question\n/reset\nthird question\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("model> ") == 3 and "(conversation forgotten)" in result.output
    assert "Be brief." in prompts[0] and "first question" in prompts[0]
    assert "first question" in prompts[1] and "second question" in prompts[1]  # multi-turn
    assert "first question" not in prompts[2] and "Be brief." in prompts[2]  # /reset keeps the system prompt
    no_template = tmp_path / "plain"
    shutil.copytree(base_model, no_template)
    result = CliRunner().invoke(app, ["chat", str(no_template)], input="hi\n")
    assert result.exit_code != 0 and "no chat template" in result.output and "Traceback" not in result.output
