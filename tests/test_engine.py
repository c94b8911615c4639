"""The loop: resume equality, atomic checkpoints, NaN guards, metrics."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import TrainerConfig
from lmforge.data.packing import PackedRows, iterate_batches
from lmforge.engine import checkpoint as ckpt
from lmforge.engine.loop import TrainingDiverged, train
from lmforge.engine.metrics import read_metrics
from lmforge.engine.optimizer import decay_groups
from lmforge.models.factory import build_model, preset_config
from lmforge.objectives.clm import CausalLM

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 128}


def _model(vocab: int):
    torch.manual_seed(0)
    return build_model(preset_config("llama", "tiny", vocab, 128, **TINY), "causal_lm")


def _run(prepared, out, resume=False, crash_after_batches=None, objective=None, evaluate=None, **overrides):
    cfg = TrainerConfig(**{"max_steps": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                           "eval_every": 100, "save_every": 3, "keep_last": 2, "progress": False, "precision": "fp32",
                           **overrides})
    rows = PackedRows(prepared.split("train"), 32)
    model = _model(prepared.vocab_size)

    def batches(start):
        for i, batch in enumerate(iterate_batches(rows, cfg.batch_size, 0, start)):
            if crash_after_batches is not None and i == crash_after_batches:
                raise RuntimeError("simulated crash")
            yield batch

    result = train(model, objective or CausalLM(), decay_groups(model.named_parameters(), 0.1), cfg, out, batches=batches,
                   batches_per_epoch=len(rows) // cfg.batch_size, tokens_per_batch=cfg.batch_size * 32,
                   evaluate=evaluate, resume=resume, log=lambda s: None)
    return model, result


def test_loss_falls(prepared, tmp_path):
    _, result = _run(prepared, tmp_path, max_steps=30, save_every=None)
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("extra_parameter", [False, True], ids=["model_only", "objective_parameter"])
def test_optimizer_state_is_saved_by_parameter_name_unless_a_parameter_is_not_the_model(extra_parameter):
    """By name (any strategy can resume it); by position, as torch saves it, when the optimizer also
    holds a parameter outside the model (an objective's learned temperature). Both load back exactly."""
    from lmforge.engine.optimizer import build_optimizer

    def setup():
        model = _model(64)
        groups = decay_groups(model.named_parameters(), 0.1)
        if extra_parameter:
            groups.append({"params": [torch.nn.Parameter(torch.ones(()))], "weight_decay": 0.0})
        return model, build_optimizer(groups, 1e-3, (0.9, 0.95), 1e-8, "auto")

    model, optimizer = setup()
    x = torch.randint(0, 64, (2, 9))
    CausalLM().loss(model, {"input_ids": x[:, :-1], "labels": x[:, 1:]})[0].backward()
    optimizer.step()
    saved = ckpt._optimizer_state(model, optimizer)
    assert isinstance(saved["param_groups"][0]["params"][0], int if extra_parameter else str)
    fresh_model, fresh_optimizer = setup()
    ckpt._load_optimizer_state(fresh_model, fresh_optimizer, saved)
    for old, new in zip(optimizer.state.values(), fresh_optimizer.state.values(), strict=True):
        assert all(torch.equal(old[k], new[k]) for k in old)


def test_resume_after_crash_matches_uninterrupted_run(prepared, tmp_path):
    full_model, _ = _run(prepared, tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(prepared, tmp_path / "crashed", crash_after_batches=7)  # after the step-6 checkpoint
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "crashed" / "checkpoints")] == ["step_00000003", "step_00000006"]
    resumed_model, result = _run(prepared, tmp_path / "crashed", resume=True)
    assert result.state.step == 8
    full = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "full" / "metrics.jsonl", "train")]
    again = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "crashed" / "metrics.jsonl", "train")]
    assert again == full  # same steps, same losses, bit for bit
    resumed = resumed_model.state_dict()
    for name, tensor in full_model.state_dict().items():
        assert torch.equal(tensor, resumed[name]), name


def test_keep_last_and_atomic_layout(prepared, tmp_path):
    _run(prepared, tmp_path, max_steps=8, save_every=2, keep_last=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_00000006", "step_00000008"]
    state = ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step_00000008")
    assert state["train_state"]["step"] == 8 and set(state["checksums"]) == {"model.safetensors", "optimizer.pt", "rng.pt"}
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(tmp_path / "checkpoints" / "step_00000008" / "model.safetensors")


def test_corrupted_checkpoint_falls_back_to_previous(prepared, tmp_path):
    _run(prepared, tmp_path, max_steps=6, save_every=3)
    newest = tmp_path / "checkpoints" / "step_00000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.verify_checkpoint(newest.parent)
    warnings = []
    path, state = ckpt.latest_valid_checkpoint(tmp_path / "checkpoints", warn=warnings.append)
    assert path.name == "step_00000003" and "step_00000006" in warnings[0]


def test_interrupted_write_leaves_previous_checkpoint(prepared, tmp_path, monkeypatch):
    model, _ = _run(prepared, tmp_path, max_steps=3, save_every=3)
    before = (tmp_path / "checkpoints" / "step_00000003" / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path / "checkpoints", 4, model, opt, {}, keep_last=2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]
    assert (tmp_path / "checkpoints" / "step_00000003" / "model.safetensors").read_bytes() == before


def _nan_on_calls(monkeypatch, calls_with_nan):
    real_loss = CausalLM.loss
    calls = {"n": 0}

    def flaky(self, model, batch):
        calls["n"] += 1
        loss, metrics = real_loss(self, model, batch)
        return (loss * float("nan") if calls["n"] in calls_with_nan else loss), metrics

    monkeypatch.setattr(CausalLM, "loss", flaky)


def test_nan_steps_skipped_on_device_like_on_host(prepared, tmp_path, monkeypatch):
    """The fused optimizer skips non-finite steps itself (no host sync per step); the foreach one is
    checked on the host. Both skip the same steps and end with the same finite weights."""
    runs = {}
    for impl in ("fused", "foreach"):
        _nan_on_calls(monkeypatch, {2, 3})
        runs[impl] = _run(prepared, tmp_path / impl, max_steps=6, log_every=3, save_every=None, optimizer_impl=impl)
    (fused, fused_result), (host, host_result) = runs["fused"], runs["foreach"]
    for result in (fused_result, host_result):
        assert result.state.bad_steps == 2 and result.state.step == 6 and result.state.consecutive_bad == 0
    assert [r["bad_steps"] for r in read_metrics(tmp_path / "fused" / "metrics.jsonl", "train")] == [2, 2]
    for a, b in zip(fused.parameters(), host.parameters(), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    clean, _ = _run(prepared, tmp_path / "clean", max_steps=6, save_every=None)
    assert any(not torch.equal(a, b) for a, b in zip(fused.parameters(), clean.parameters(), strict=True))


@pytest.mark.parametrize("impl, stopped_at", [("foreach", 3), ("fused", 4)])
def test_run_of_nan_steps_stops(prepared, tmp_path, monkeypatch, impl, stopped_at):
    """The host check stops at the limit; the on-device one at the next step that syncs (a log step):
    the weights are untouched either way."""
    _nan_on_calls(monkeypatch, set(range(1, 100)))
    with pytest.raises(TrainingDiverged, match=f"{stopped_at} consecutive steps .* by step {stopped_at} "
                                               r"\(trainer.max_bad_steps: 3\)"):
        _run(prepared, tmp_path, max_steps=10, max_bad_steps=3, log_every=4, save_every=None, optimizer_impl=impl)


def test_grad_accumulation_matches_big_batch(prepared, tmp_path):
    big, _ = _run(prepared, tmp_path / "big", max_steps=2, batch_size=4, save_every=None)
    acc, _ = _run(prepared, tmp_path / "acc", max_steps=2, batch_size=2, grad_accum=2, save_every=None)
    for a, b in zip(big.parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_metrics_jsonl_and_tensorboard(prepared, tmp_path):
    _run(prepared, tmp_path, max_steps=4, save_every=None, log_every=2)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "tokens_seen"} <= set(records[0])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    shutil.rmtree(tmp_path / "tensorboard")
    json.dumps(records)


def test_repeated_blocks_are_found_in_each_family_and_through_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.engine.runtime import repeated_blocks

    llama = _model(100)
    assert repeated_blocks(llama) == list(llama.model.layers)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=2))
    assert repeated_blocks(gpt2) == list(gpt2.transformer.h)
    wrapped = get_peft_model(_model(100), LoraConfig(r=2, target_modules=["q_proj"]))
    assert [type(b).__name__ for b in repeated_blocks(wrapped)] == ["LlamaDecoderLayer"] * 2


def test_compiled_blocks_train_like_eager_and_save_the_same_weights(prepared, tmp_path):
    eager, _ = _run(prepared, tmp_path / "eager", max_steps=3, save_every=3)
    from torch._dynamo.utils import counters

    counters.clear()
    compiled, _ = _run(prepared, tmp_path / "compiled", max_steps=3, save_every=3, compile="blocks")
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks really ran compiled
    assert all(block._compiled_call_impl is None for block in compiled.model.layers)  # undone after training
    losses = [[r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl", "train")] for run in ("eager", "compiled")]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5) and losses[0][-1] == pytest.approx(losses[1][-1], rel=1e-4)
    saved = [load_file(next((tmp_path / run / "checkpoints").glob("step_*/model.safetensors"))) for run in ("eager", "compiled")]
    assert saved[0].keys() == saved[1].keys()  # compiling in place renames nothing in the checkpoint
    for name, tensor in saved[0].items():
        torch.testing.assert_close(saved[1][name], tensor, atol=1e-5, rtol=1e-4)


def test_evaluation_runs_compiled_blocks_eagerly_and_training_goes_on_compiled(prepared, tmp_path):
    """No second (inference) graph for evaluation under no_grad: the blocks run eagerly there, and
    every training step, also after an evaluation, runs them compiled."""
    from torch._dynamo.utils import counters

    compiled_in = {"train": [], "eval": []}

    def blocks_compiled(model) -> bool:
        return all(block._compiled_call_impl is not None for block in model.model.layers)

    class Recording(CausalLM):
        def loss(self, model, batch):
            compiled_in["train"].append(blocks_compiled(model))
            return super().loss(model, batch)

    def evaluate(model, precision):
        compiled_in["eval"].append(blocks_compiled(model))
        with torch.no_grad():
            return {"loss": float(CausalLM().loss(model, {"input_ids": held[:, :-1], "labels": held[:, 1:]})[0])}

    held = torch.randint(0, prepared.vocab_size, (3, 21))  # another shape than training's 4 x 32
    torch._dynamo.reset()  # graphs cached by earlier tests would not be counted
    counters.clear()
    _run(prepared, tmp_path, max_steps=4, save_every=None, eval_every=2, compile="blocks", objective=Recording(),
         evaluate=evaluate)
    assert compiled_in == {"train": [True] * 4, "eval": [False, False]}
    assert counters["stats"]["unique_graphs"] == 1  # the training graph only


def _saved_bytes_and_lora_grads(model, batch) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes the forward pass keeps for the backward (outside recomputed blocks), and the gradients."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = CausalLM().loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return sum(saved), grads


def test_activation_checkpointing_keeps_less_and_computes_the_same_gradients(llama_mlp_calls):
    from peft import LoraConfig, get_peft_model

    from lmforge.engine.runtime import checkpoint_activations

    model = get_peft_model(build_model(preset_config("llama", "tiny", 100, 128, **{**TINY, "num_hidden_layers": 4}),
                                       "causal_lm"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, 65))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    plain_bytes, plain_grads = _saved_bytes_and_lora_grads(model, batch)

    forwards = llama_mlp_calls
    forwards.clear()
    undo = checkpoint_activations(model, True)
    assert not model.get_input_embeddings()(ids).requires_grad  # no gradient computed for frozen embeddings
    kept_bytes, grads = _saved_bytes_and_lora_grads(model, batch)
    assert len(forwards) == 2 * 4  # every block ran again in the backward pass
    assert kept_bytes < plain_bytes / 3, (kept_bytes, plain_bytes)
    assert grads.keys() == plain_grads.keys() and all("lora_" in name for name in grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad)
    undo()
    forwards.clear()
    assert _saved_bytes_and_lora_grads(model, batch)[0] == plain_bytes and len(forwards) == 4


def test_activation_checkpointing_in_the_loop_with_compiled_blocks_trains_like_without(prepared, tmp_path):
    plain, _ = _run(prepared, tmp_path / "plain", max_steps=3, save_every=None)
    checkpointed, _ = _run(prepared, tmp_path / "checkpointed", max_steps=3, save_every=None, activation_checkpointing=True,
                           compile="blocks")
    assert not any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())  # switched off after
    for (name, weight), other in zip(plain.state_dict().items(), checkpointed.state_dict().values(), strict=True):
        torch.testing.assert_close(other, weight, atol=1e-5, rtol=1e-4, msg=name)


def test_activation_checkpointing_refuses_a_model_without_blocks():
    from lmforge.engine.runtime import checkpoint_activations

    with pytest.raises(ValueError, match="trainer.activation_checkpointing: Linear"):
        checkpoint_activations(torch.nn.Linear(2, 2), True)


def test_auto_precision_is_not_flipped_by_a_disturbed_timing(monkeypatch):
    """bf16 is picked only where it measured faster; other work slowing some fp32 timings (here 4 of
    5) must not make a slow bf16 look fast."""
    from lmforge.engine import runtime

    durations = iter([2.0, 1.6, 2.0, 1.6, 2.0, 1.6, 1.0, 1.6, 2.0, 1.6])  # fp32, bf16 alternating
    clock = iter([t for d in durations for t in (0.0, d)])
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(clock))
    assert runtime.bf16_matmul_speedup.__wrapped__(64) == pytest.approx(1.0 / 1.6)

    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)
    cpu = torch.device("cpu")
    for speedup, picked in ((0.6, "fp32"), (1.05, "fp32"), (2.0, "bf16")):
        monkeypatch.setattr(runtime, "bf16_matmul_speedup", lambda speedup=speedup: speedup)
        assert runtime.resolve_precision("auto", cpu) == picked
    assert runtime.resolve_precision("fp32", cpu) == "fp32"
