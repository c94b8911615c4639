"""Data parallel (DDP, and FSDP2; gloo, 2 CPU processes) trains exactly what one process trains on the same batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lmforge.config import MethodConfig, TrainerConfig
from lmforge.data.packing import PackedRows, iterate_batches
from lmforge.data.prepare import load_prepared
from lmforge.engine.loop import train
from lmforge.engine.metrics import read_metrics
from lmforge.engine.optimizer import decay_groups
from lmforge.methods import apply_method
from lmforge.models.factory import build_model, load_model, preset_config
from lmforge.objectives.clm import CausalLM

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 128}


class RowCountingCLM(CausalLM):
    """CLM that remembers how many rows each of its batches had."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def loss(self, model, batch):
        self.rows.append(batch["input_ids"].shape[0])
        return super().loss(model, batch)


def _train(prepared_dir: str, out: str, objective: CausalLM | None = None, lora_base: str | None = None,
           base_dtype: str = "int8", strategy: str = "ddp", crash_after_batches: int | None = None,
           resume: bool = False, activation_checkpointing: bool = False) -> torch.nn.Module:
    """Full training of a fresh tiny Llama; or, given `lora_base` (a saved checkpoint), LoRA on it
    (its frozen layers in `base_dtype`)."""
    corpus = load_prepared(prepared_dir)
    torch.manual_seed(0)
    if lora_base is None:
        model = build_model(preset_config("llama", "tiny", corpus.vocab_size, 128, **TINY), "causal_lm")
        groups = decay_groups(model.named_parameters(), 0.1)
    else:
        lora = MethodConfig(name="lora", lora={"rank": 4, "base_dtype": base_dtype})
        model, groups = apply_method(load_model(lora_base, "causal_lm"), lora, 0.0)
    rows = PackedRows(corpus.split("train"), 32)
    cfg = TrainerConfig(max_steps=4, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, eval_every=100,
                        save_every=2, progress=False, precision="fp32", strategy=strategy,
                        activation_checkpointing=activation_checkpointing)

    def batches(start):
        for i, batch in enumerate(iterate_batches(rows, 8, 0, start)):
            if i == crash_after_batches:
                raise RuntimeError("simulated crash")
            yield batch

    train(model, objective or CausalLM(), groups, cfg, __import__("pathlib").Path(out), batches=batches,
          batches_per_epoch=len(rows) // 8, tokens_per_batch=8 * 32, resume=resume, log=lambda s: None)
    return model


def _worker(rank: int, world: int, port: int, prepared_dir: str, out: str, options: dict | None = None) -> None:
    """One rank of `_train(prepared_dir, out, **options)`; what it held and (DDP) trained are saved."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    objective = RowCountingCLM()
    try:
        model = _train(prepared_dir, out, objective, **(options or {}))
        # what this rank holds: a DTensor's local shard under FSDP, the whole parameter under DDP
        held = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in model.parameters())
        torch.save({"held": held, "total": sum(p.numel() for p in model.parameters())}, os.path.join(out, f"held{rank}.pt"))
        if rank == 0 and (options or {}).get("strategy", "ddp") == "ddp":
            torch.save({"weights": model.state_dict(), "rows": torch.tensor(objective.rows)}, os.path.join(out, "weights.pt"))
    finally:
        torch.distributed.destroy_process_group()


# Adam turns fp32 reduction-order noise in near-zero gradients into moves of up to lr (3e-3): on an
# AMD EPYC (fp32 kernels other than the Intel machine's these tests were first run on) the two sides
# ended up to 1.3e-5 apart after 4 steps. Sides that trained apart (no gradient all-reduce, other rows)
# end much further apart, their gradients pointing different ways.
ADAM_ATOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(prepared, tmp_path):
    single = _train(str(prepared.directory), str(tmp_path / "single"))
    mp.spawn(_worker, args=(2, _free_port(), str(prepared.directory), str(tmp_path / "ddp")), nprocs=2, join=True)
    saved = torch.load(tmp_path / "ddp" / "weights.pt", weights_only=True)
    assert saved["rows"].tolist() == [4, 4, 4, 4]  # each rank trained on its half of every batch of 8
    ddp = saved["weights"]
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(ddp[name], tensor, atol=ADAM_ATOL, rtol=1e-4, msg=name)
    # rank 0 alone wrote the metrics and the checkpoint; the logged loss is the global batch's
    single_losses = [r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl", "train")]
    ddp_losses = [r["loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl", "train")]
    assert len(ddp_losses) == 4
    for a, b in zip(single_losses, ddp_losses, strict=True):
        assert abs(a - b) < 1e-4
    assert (tmp_path / "ddp" / "checkpoints" / "step_00000004" / "model.safetensors").is_file()


def test_ddp_lora_on_an_int8_base_matches_one_process(prepared, tmp_path):
    """Per-row quantization does not depend on which rows share a batch, so each rank's half gives
    what one process gives; the int8 buffers travel with DDP's broadcast."""
    corpus = load_prepared(str(prepared.directory))
    torch.manual_seed(0)
    build_model(preset_config("llama", "tiny", corpus.vocab_size, 128, **TINY), "causal_lm").save_pretrained(tmp_path / "base")
    single = _train(str(prepared.directory), str(tmp_path / "single"), lora_base=str(tmp_path / "base"))
    mp.spawn(_worker, args=(2, _free_port(), str(prepared.directory), str(tmp_path / "ddp"), {"lora_base": str(tmp_path / "base")}),
             nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp" / "weights.pt", weights_only=True)["weights"]
    trained = {n: p for n, p in single.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # they trained (B starts at zero)
    for name, tensor in trained.items():
        torch.testing.assert_close(ddp[name], tensor, atol=ADAM_ATOL, rtol=1e-4, msg=name)


def _checkpoint_weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(sorted((out / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_fsdp_two_processes_hold_half_each_and_match_one_process(prepared, tmp_path, checkpointing):
    """FSDP2: each rank holds half of every parameter, the gathered checkpoint equals one process's
    weights, and the logged losses match (also with each block recomputed in the backward pass)."""
    single = _train(str(prepared.directory), str(tmp_path / "single"))
    mp.spawn(_worker, args=(2, _free_port(), str(prepared.directory), str(tmp_path / "fsdp"),
                            {"strategy": "fsdp", "activation_checkpointing": checkpointing}), nprocs=2, join=True)
    for rank in (0, 1):
        held = torch.load(tmp_path / "fsdp" / f"held{rank}.pt", weights_only=True)
        assert held["held"] <= held["total"] // 2 + 64 * 2  # a half, give or take odd rows
    saved = _checkpoint_weights(tmp_path / "fsdp")
    for name, tensor in single.named_parameters():  # each tied weight once, as checkpoints hold it
        torch.testing.assert_close(saved[name], tensor.detach(), atol=ADAM_ATOL, rtol=1e-4, msg=name)
    single_losses = [r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl", "train")]
    fsdp_losses = [r["loss"] for r in read_metrics(tmp_path / "fsdp" / "metrics.jsonl", "train")]
    assert len(fsdp_losses) == 4 and all(abs(a - b) < 1e-4 for a, b in zip(single_losses, fsdp_losses, strict=True))


def test_fsdp_run_killed_mid_way_resumes_to_the_same_weights(prepared, tmp_path):
    """A sharded run that dies after its step-2 checkpoint, resumed (each rank takes its shards of the
    gathered checkpoint, optimizer states included), ends where an uninterrupted run ends."""
    single = _train(str(prepared.directory), str(tmp_path / "single"))
    out, port = str(tmp_path / "fsdp"), _free_port()
    with pytest.raises(Exception, match="simulated crash"):
        mp.spawn(_worker, args=(2, port, str(prepared.directory), out, {"strategy": "fsdp", "crash_after_batches": 3}),
                 nprocs=2, join=True)
    assert [p.name for p in sorted((tmp_path / "fsdp" / "checkpoints").glob("step_*"))] == ["step_00000002"]
    mp.spawn(_worker, args=(2, _free_port(), str(prepared.directory), out, {"strategy": "fsdp", "resume": True}), nprocs=2, join=True)
    saved = _checkpoint_weights(tmp_path / "fsdp")
    for name, tensor in single.named_parameters():  # each tied weight once, as checkpoints hold it
        torch.testing.assert_close(saved[name], tensor.detach(), atol=ADAM_ATOL, rtol=1e-4, msg=name)


def test_fsdp_lora_trains_the_adapters_one_process_trains(prepared, tmp_path):
    """LoRA under FSDP: frozen and trained parameters share each block's shards; the checkpoint holds
    the adapters only, moved as one process moves them. Not to DDP's 1e-5: the gathered parameters sit
    in another memory layout, so the products round differently, and Adam's first steps, normalized
    by the gradients' own size, magnify that in the adapters' near-zero entries."""
    corpus = load_prepared(str(prepared.directory))
    torch.manual_seed(0)
    build_model(preset_config("llama", "tiny", corpus.vocab_size, 128, **TINY), "causal_lm").save_pretrained(tmp_path / "base")
    options = {"lora_base": str(tmp_path / "base"), "base_dtype": "fp32"}
    single = _train(str(prepared.directory), str(tmp_path / "single"), **options)
    mp.spawn(_worker, args=(2, _free_port(), str(prepared.directory), str(tmp_path / "fsdp"), {**options, "strategy": "fsdp"}),
             nprocs=2, join=True)
    saved = _checkpoint_weights(tmp_path / "fsdp")
    trained = {n: p.detach() for n, p in single.named_parameters() if p.requires_grad}
    assert saved.keys() == trained.keys() and all("lora_" in n for n in saved)
    for name, tensor in trained.items():
        assert "lora_A" in name or tensor.abs().max() > 1e-3  # B moved off its zero start
        torch.testing.assert_close(saved[name], tensor, atol=1e-4, rtol=1e-3, msg=name)


def test_a_checkpoint_resumes_under_another_strategy(prepared, tmp_path):
    """Checkpoints hold the whole model and the optimizer state by parameter name, whatever wrote
    them: a sharded run's resumes in one process, and one process's resumes sharded, each ending
    where an uninterrupted run ends."""
    data = str(prepared.directory)
    single = _train(data, str(tmp_path / "single"))
    sharded_then_single = tmp_path / "fsdp_then_single"
    with pytest.raises(Exception, match="simulated crash"):
        mp.spawn(_worker, args=(2, _free_port(), data, str(sharded_then_single), {"strategy": "fsdp", "crash_after_batches": 3}),
                 nprocs=2, join=True)
    resumed = _train(data, str(sharded_then_single), resume=True)
    single_then_sharded = tmp_path / "single_then_fsdp"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(data, str(single_then_sharded), crash_after_batches=3)
    mp.spawn(_worker, args=(2, _free_port(), data, str(single_then_sharded), {"strategy": "fsdp", "resume": True}), nprocs=2, join=True)
    resharded = _checkpoint_weights(single_then_sharded)
    for name, tensor in single.named_parameters():  # each tied weight once, as checkpoints hold it
        torch.testing.assert_close(resumed.state_dict()[name], tensor.detach(), atol=ADAM_ATOL, rtol=1e-4, msg=name)
        torch.testing.assert_close(resharded[name], tensor.detach(), atol=ADAM_ATOL, rtol=1e-4, msg=name)


def _train_contrastive(tokenizer_dir: str, out: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny BERT encoder, InfoNCE on question/answer pairs with a learned temperature, 3 steps of 8 pairs."""
    from lmforge.config import ObjectiveConfig
    from lmforge.data.pairs import load_pairs
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.objectives import get_objective

    from .conftest import REPO

    tokenizer = load_tokenizer(tokenizer_dir)
    pairs, _ = load_pairs([str(REPO / "assets" / "corpora" / "pyfaq_qa.jsonl.gz")], tokenizer, "question", "answer", 64, 0.0)
    torch.manual_seed(0)
    bert = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = build_model(preset_config("bert", "tiny", len(tokenizer), 128, **bert), "encoder")
    objective = get_objective(ObjectiveConfig(name="contrastive", temperature=0.1, symmetric=True, learn_temperature=True),
                              tokenizer)
    groups = [*decay_groups(model.named_parameters(), 0.1), {"params": objective.extra_parameters(), "weight_decay": 0.0}]
    cfg = TrainerConfig(max_steps=3, batch_size=8, lr=2e-3, warmup_steps=0, log_every=1, eval_every=100, progress=False,
                        precision="fp32")
    train(model, objective, groups, cfg, __import__("pathlib").Path(out), batches=lambda start: iterate_batches(pairs, 8, 0, start),
          batches_per_epoch=len(pairs) // 8, tokens_per_batch=8, log=lambda s: None)
    return model, objective.logit_scale.detach()


def _contrastive_worker(rank: int, world: int, port: int, tokenizer_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        model, scale = _train_contrastive(tokenizer_dir, out)
        torch.save({"weights": model.state_dict(), "logit_scale": scale}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_contrastive_sees_the_whole_batch_as_negatives(tokenizer_dir, tmp_path):
    """Each rank's rows are scored against every rank's positives (gathered embeddings) and the
    learned temperature's gradient is averaged: DDP trains what one process trains on the whole batch."""
    single, single_scale = _train_contrastive(str(tokenizer_dir), str(tmp_path / "single"))
    mp.spawn(_contrastive_worker, args=(2, _free_port(), str(tokenizer_dir), str(tmp_path / "ddp")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert single_scale != torch.log(torch.tensor(10.0))  # the temperature trained
    for saved in ranks:
        torch.testing.assert_close(saved["logit_scale"], single_scale, atol=1e-6, rtol=1e-5)
        for name, tensor in single.state_dict().items():
            torch.testing.assert_close(saved["weights"][name], tensor, atol=ADAM_ATOL, rtol=1e-4, msg=name)
