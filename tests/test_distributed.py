"""Data parallel (DDP, gloo, 2 CPU processes) trains exactly what one process trains on the same batch."""

import os
import socket

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


def _train(prepared_dir: str, out: str, objective: CausalLM | None = None, lora_base: str | None = None) -> torch.nn.Module:
    """Full training of a fresh tiny Llama; or, given `lora_base` (a saved checkpoint), LoRA on its int8 base."""
    corpus = load_prepared(prepared_dir)
    torch.manual_seed(0)
    if lora_base is None:
        model = build_model(preset_config("llama", "tiny", corpus.vocab_size, 128, **TINY), "causal_lm")
        groups = decay_groups(model.named_parameters(), 0.1)
    else:
        lora = MethodConfig(name="lora", lora={"rank": 4, "base_dtype": "int8"})
        model, groups = apply_method(load_model(lora_base, "causal_lm"), lora, 0.0)
    rows = PackedRows(corpus.split("train"), 32)
    cfg = TrainerConfig(max_steps=4, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, eval_every=100,
                        save_every=4, progress=False, precision="fp32")
    train(model, objective or CausalLM(), groups, cfg, __import__("pathlib").Path(out),
          batches=lambda start: iterate_batches(rows, 8, 0, start), batches_per_epoch=len(rows) // 8,
          tokens_per_batch=8 * 32, log=lambda s: None)
    return model


def _worker(rank: int, world: int, port: int, prepared_dir: str, out: str, lora_base: str | None = None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    objective = RowCountingCLM()
    model = _train(prepared_dir, out, objective, lora_base)
    if rank == 0:
        torch.save({"weights": model.state_dict(), "rows": torch.tensor(objective.rows)}, os.path.join(out, "weights.pt"))
    torch.distributed.destroy_process_group()


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
        torch.testing.assert_close(ddp[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
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
    mp.spawn(_worker, args=(2, _free_port(), str(prepared.directory), str(tmp_path / "ddp"), str(tmp_path / "base")),
             nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp" / "weights.pt", weights_only=True)["weights"]
    trained = {n: p for n, p in single.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # they trained (B starts at zero)
    for name, tensor in trained.items():
        torch.testing.assert_close(ddp[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
