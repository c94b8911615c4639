"""PPO: the same numbers as TRL's PPOTrainer on the same completions (TRL 1.12, in a subprocess), the score
on the last real token, GAE and whitening on padded rows, whole runs that raise the held-out reward with a
value head saved beside the policy, exact resume in the middle of a rollout, bad recipes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.engine.metrics import read_metrics

from .conftest import assert_cli_resume_is_exact, write_recipe

runner = CliRunner()
TRL_PPO = Path(sys.prefix) / "trl-ppo-reference"  # TRL 1.12, installed there by the Makefile


def test_ppo_equals_trl_ppo_trainer(tmp_path, tokenizer_dir):
    """One rollout (4 completions), two epochs: TRL's own PPOTrainer.train() and lmforge's ppo objective
    on the same completions, scores, policy, value head and reference give the same policy and value
    losses, clip fractions, KL and approximate KL, and the same weights after both optimizer steps."""
    if not (TRL_PPO / "trl").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{TRL_PPO}: TRL 1.12 (PPO's reference) is missing; `make install` puts it there")
        pytest.skip(f"{TRL_PPO}: TRL 1.12 is not installed (make install)")
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TRL_PPO), os.environ.get("PYTHONPATH")])),
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "ppo_reference_run.py"), str(tokenizer_dir), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    print(result)
    for key, theirs in result["trl"].items():
        assert result["lmforge"][key] == pytest.approx(theirs, rel=1e-4, abs=1e-6), key
    assert result["trl"]["clip_fraction"] > 0 and result["trl"]["value_clip_fraction"] > 0  # both clips at work
    assert result["max_weight_change"] > 0.1  # the steps moved the weights, and alike:
    assert result["max_weight_difference"] < 1e-5 and result["max_head_difference"] < 1e-5


def test_the_score_lands_on_the_last_real_token_and_padding_stays_out():
    from lmforge.objectives.ppo import generalised_advantages, token_rewards, whiten

    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # the first ends with EOS at 2, the second runs out
    logps, ref = torch.full((2, 5), -1.0), torch.full((2, 5), -1.5)
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, beta=0.1, estimator="k1")
    assert kl.tolist() == [[0.5, 0.5, 0.5, 0, 0], [0.5] * 5]  # k1: log pi - log ref, nothing after the end
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.05, 1.95, 0, 0])  # the score on EOS, not after it
    assert rewards[1, 4] == pytest.approx(-1.05)
    _, kl3 = token_rewards(torch.zeros(2), logps, ref, mask, 0.1, "k3")
    assert kl3[0, 0] == pytest.approx(torch.exp(torch.tensor(-0.5)) - 1 + 0.5)
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0, 9.0], [0.0] * 5])  # values after the end are ignored
    advantages, returns = generalised_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    # lambda = gamma = 1: the advantage is the rest of the rewards minus the value
    assert advantages[0, :3].tolist() == pytest.approx([1.85 - 0.5, 1.9 - 0.2, 1.95 - 0.1])
    assert returns[0, :3].tolist() == pytest.approx([1.85, 1.9, 1.95])
    assert advantages[0, 3:].tolist() == [0.0, 0.0]
    white = whiten(advantages, mask)
    assert white[0, 3:].tolist() == [0.0, 0.0]
    assert float((white * mask).sum() / mask.sum()) == pytest.approx(0.0, abs=1e-6)


def _recipe(tmp_path, base, data, **sections) -> str:
    return write_recipe(tmp_path, base, {
        "data": {"train_files": [str(data)], "val_fraction": 0.1},
        "objective": {"name": "ppo", "beta": 0.02},
        "rollout": {"num_generations": 2, "max_new_tokens": 8, "temperature": 1.0, "epochs": 2},
        "reward": {"terms": [{"kind": "function", "function": "my_rewards:digits"}]},
        "trainer": {"max_steps": 24, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 24, "log_every": 4},
    }, sections)


def policy_width(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["hidden_size"]


@pytest.mark.slow
def test_ppo_run_raises_the_held_out_reward_and_saves_its_value_head(tmp_path, base_model, sums_file, reward_module):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = runner.invoke(app, ["run", _recipe(tmp_path, base_model, sums_file)])
    assert result.exit_code == 0, result.output
    assert "each rollout serves 2 optimizer steps" in result.output
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    print(before, after, train[0], train[-1])
    assert after["reward"] > before["reward"] + 0.1
    for key in ("reward", "kl", "rlhf_reward", "entropy", "completion_length", "policy_loss", "value_loss",
                "clip_fraction", "value_clip_fraction", "approx_kl", "explained_variance"):
        assert key in train[-1], key
    assert any(record["clip_fraction"] > 0 for record in train)  # the second epoch of a rollout moves the ratio
    final = tmp_path / "run" / "final"
    head = load_file(final / "value_head.safetensors")
    assert head["weight"].shape == (1, policy_width(final)) and head["weight"].abs().sum() > 0  # trained away from its zero start
    policy = AutoModelForCausalLM.from_pretrained(final)  # the policy alone, with plain transformers
    assert policy.config.model_type == "llama"


@pytest.mark.slow
def test_ppo_under_lora_resumes_exactly_in_the_middle_of_a_rollout(tmp_path, base_model, sums_file, reward_module):
    """Each rollout serves 4 optimizer steps (2 epochs x 2 minibatches); the checkpoint at step 3 holds the
    rollout in use and the value head, so a run resumed there ends on the same weights and value head."""
    path = _recipe(tmp_path, base_model, sums_file, method={"name": "lora", "lora": {"rank": 8}},
                   rollout={"minibatches": 2},
                   trainer={"max_steps": 6, "save_every": 3, "eval_every": 100, "eval_at_start": False, "log_every": 1,
                            "lr": 1e-2})
    assert_cli_resume_is_exact(path, tmp_path / "run", ("adapter_model.safetensors", "value_head.safetensors"), last_step=6)
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "objective.safetensors").is_file()
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the base: adapters off
    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "final") is not None


def test_bad_ppo_recipes_are_named_before_training(tmp_path, base_model, sums_file, reward_module):
    result = runner.invoke(app, ["train", _recipe(tmp_path, base_model, sums_file, reward={"terms": []})])
    assert result.exit_code != 0 and "reward.terms: the ppo objective needs a reward" in result.output
    result = runner.invoke(app, ["train", _recipe(tmp_path, base_model, sums_file, rollout={"minibatches": 3})])
    assert result.exit_code != 0 and "rollout.minibatches: 3 minibatches x trainer.grad_accum 1 do not divide" in result.output
    result = runner.invoke(app, ["train", _recipe(tmp_path, base_model, sums_file,
                                                  objective={"name": "grpo"}, rollout={"num_generations": 1})])
    assert result.exit_code != 0 and "rollout.num_generations: grpo compares" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_check_measures_a_ppo_step(tmp_path, base_model, sums_file, reward_module):
    result = runner.invoke(app, ["check", _recipe(tmp_path, base_model, sums_file)])
    assert result.exit_code == 0, result.output
    assert "measured:" in result.output


@pytest.mark.slow
def test_ppo_under_ddp_resumes_each_ranks_rollout_exactly(tmp_path, base_model, sums_file):
    """Two processes (gloo), each rolling out its half of the prompts: the checkpoint in the middle of a
    rollout holds both ranks' rollouts (objective.safetensors), and a run resumed there under DDP ends on
    the same weights and value head as the run that went straight through."""
    import shutil

    from .conftest import REWARDS_MODULE

    module = tmp_path / "rewards_module"
    module.mkdir()
    (module / "my_rewards.py").write_text(REWARDS_MODULE)
    path = _recipe(tmp_path, base_model, sums_file, rollout={"minibatches": 2},
                   trainer={"strategy": "ddp", "progress": False, "max_steps": 6, "save_every": 3, "eval_every": 100,
                            "eval_at_start": False, "log_every": 1})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(module), os.environ.get("PYTHONPATH")]))}

    def torchrun(*extra: str) -> None:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "lmforge.cli", "train", path, *extra], capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run = tmp_path / "run"
    torchrun()
    straight = [(run / "final" / name).read_bytes() for name in ("model.safetensors", "value_head.safetensors")]
    from safetensors.torch import load_file

    buffers = load_file(run / "checkpoints" / "step_00000003" / "objective.safetensors")
    assert {"rank0.buffer.seed", "rank1.buffer.seed"} <= buffers.keys()
    assert not torch.equal(buffers["rank0.buffer.rows.input_ids"], buffers["rank1.buffer.rows.input_ids"])
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    shutil.rmtree(run / "final")
    torchrun("--resume")
    assert [(run / "final" / name).read_bytes() for name in ("model.safetensors", "value_head.safetensors")] == straight


def test_a_reward_model_can_start_from_a_lora_sft_model(tmp_path, base_model):
    """RLHF's second stage starts `after` a LoRA SFT stage: the causal-LM adapter is merged under its own
    head, and its body becomes the reward model's (the score head starts new)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmforge.models.factory import load_model

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False))
    policy.save_pretrained(tmp_path / "sft")
    merged = policy.merge_and_unload()
    scorer = load_model(tmp_path / "sft", "classifier", num_labels=1)
    assert type(scorer).__name__ == "LlamaForSequenceClassification" and scorer.config.num_labels == 1
    for name, weight in merged.model.state_dict().items():
        torch.testing.assert_close(scorer.model.state_dict()[name], weight)
    assert not torch.equal(merged.model.state_dict()["layers.0.self_attn.q_proj.weight"],
                           AutoModelForCausalLM.from_pretrained(base_model).model.state_dict()["layers.0.self_attn.q_proj.weight"])
