"""Several nodes, as docs/distributed.md launches them: two torchrun agents (one per "node", here both on
127.0.0.1) meet through c10d rendezvous and train one run over gloo. What every node must share, the
output folder, is checked before anything is written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # three torchrun launches of a tiny run, ~1 min together

ROOT = Path(__file__).resolve().parents[1]
ADAM_ATOL = 1e-4  # as in test_distributed.py: fp32 reduction-order noise turned into moves by Adam


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(tmp_path: Path) -> Path:
    corpus = ROOT / "assets/corpora/brown_excerpt.jsonl.gz"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: nodes
tokenizer: {{train_files: [{corpus}], vocab_size: 512}}
data: {{train_files: [{corpus}], val_fraction: 0.03, max_docs: 400}}
model: {{family: llama, preset: tiny}}
packing: {{seq_len: 64}}
trainer: {{max_steps: 4, batch_size: 4, lr: 3.0e-3, warmup_steps: 1, eval_every: 4, precision: fp32, num_threads: 1, progress: false}}
generate: {{prompts: []}}
""")
    return recipe


def _launch(args: list[str], recipe: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, "-m", "lmforge.cli", "run",
                             str(recipe), f"output_dir={out}"], cwd=out.parent, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _two_nodes(recipe: Path, outs: tuple[Path, Path]) -> list[tuple[int, str]]:
    """Node 0 and node 1 of one job, each an agent of its own with one process, meeting at 127.0.0.1."""
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "lmforge-test"]
    nodes = [_launch(rendezvous, recipe, out) for out in outs]
    results = []
    for node in nodes:
        output, _ = node.communicate(timeout=600)
        results.append((node.returncode, output))
    return results


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_two_nodes_train_what_two_processes_on_one_node_train(tmp_path):
    recipe = _recipe(tmp_path)
    shared = tmp_path / "nodes"
    for code, output in _two_nodes(recipe, (shared, shared)):
        assert code == 0, output
    one_node = tmp_path / "one_node"
    done = _launch(["--standalone", "--nproc-per-node", "2"], recipe, one_node)
    output, _ = done.communicate(timeout=600)
    assert done.returncode == 0, output
    across_nodes, on_one = _weights(shared), _weights(one_node)
    assert across_nodes.keys() == on_one.keys()
    for name, tensor in across_nodes.items():
        torch.testing.assert_close(tensor, on_one[name], atol=ADAM_ATOL, rtol=0, msg=name)
    assert not list(shared.glob(".lmforge-shared-*")), "the shared-folder probe is left behind"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(shared / "final"))  # plain transformers loads what the two nodes made


def test_nodes_that_do_not_share_the_output_folder_stop_at_once_saying_so(tmp_path):
    recipe = _recipe(tmp_path)
    results = _two_nodes(recipe, (tmp_path / "node0", tmp_path / "node1"))  # as two disks, not one file system
    for code, output in results:
        assert code != 0, output
    said = "\n".join(output for _, output in results)
    assert "is not the same folder on every rank" in said and "rank 1 on " in said, said
    assert "error: output_dir:" in said  # lmforge's one line (torchrun then reports the failed worker its own way)
    assert not (tmp_path / "node0" / "tokenizer").exists() and not (tmp_path / "node1" / "tokenizer").exists()
