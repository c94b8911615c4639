"""GRPO: rollouts from the policy, rewards, group advantages and the clipped loss (against TRL's
GRPOTrainer on the same tensors); whole runs that raise the held-out reward, resume, bad rewards."""

import json
import os
import re
import sys

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.engine.metrics import read_metrics

from .conftest import REWARDS_MODULE, assert_cli_resume_is_exact, write_recipe

runner = CliRunner()

def _recipe(tmp_path, base, data, **sections) -> str:
    return write_recipe(tmp_path, base, {
        "data": {"train_files": [str(data)], "val_fraction": 0.1},
        "objective": {"name": "grpo", "beta": 0.04},
        "rollout": {"num_generations": 4, "max_new_tokens": 8, "temperature": 1.0},
        "reward": {"terms": [{"kind": "function", "function": "my_rewards:digits"}]},
        "trainer": {"max_steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 20, "log_every": 5},
    }, sections)


def test_grpo_run_raises_the_held_out_reward(tmp_path, base_model, sums_file, reward_module):
    result = runner.invoke(app, ["run", _recipe(tmp_path, base_model, sums_file)])
    assert result.exit_code == 0, result.output
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    print(before, after, train[-1])
    assert after["reward"] > before["reward"] + 0.1
    for key in ("reward", "reward_sd", "kl", "entropy", "completion_length", "zero_sd_groups"):
        assert key in train[-1]


def _tiny_llama(vocab: int, seed: int):
    from lmforge.models.factory import build_model, preset_config

    torch.manual_seed(seed)
    return build_model(preset_config("llama", "tiny", vocab, 512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, intermediate_size=128), "causal_lm")


@pytest.mark.parametrize("loss_type, beta, moved", [("grpo", 0.04, False), ("bnpo", 0.04, False), ("dr_grpo", 0.0, False),
                                                   ("dapo", 0.1, False), ("grpo", 0.04, True), ("dapo", 0.1, True)])
def test_loss_and_gradients_match_trl(tmp_path, tokenizer, loss_type, beta, moved):
    """The same prompts, completions and advantages through TRL's GRPOTrainer._compute_loss (its forward,
    its reference log-probabilities from a separate model) and through lmforge's: same loss, same gradients.
    `moved`: a later step of a rollout used for several (rollout.epochs > 1; TRL's num_iterations): the
    sampler's log-probabilities differ from the policy's, so ratios move and clip; dapo's normaliser is then
    the rollout's tokens per slice (a rollout of two slices here, TRL's steps_per_generation 2)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from lmforge.config import ObjectiveConfig
    from lmforge.objectives.grpo import (
        GroupRelativePolicy,
        clip_shares,
        completion_logprobs,
        group_advantages,
        policy_loss,
    )

    vocab, group, max_len = (len(tokenizer) + 63) // 64 * 64, 4, 7
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(10, len(tokenizer), (2, 5), generator=generator).repeat_interleave(group, 0)
    completion_ids = torch.randint(10, len(tokenizer), (2 * group, max_len), generator=generator)
    lengths = torch.tensor([7, 3, 5, 1, 6, 7, 2, 4])
    completion_mask = (torch.arange(max_len)[None] < lengths[:, None]).long()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.2, 0.9, 0.9, 0.1])
    objective = GroupRelativePolicy(ObjectiveConfig(name="grpo", beta=beta, grpo_loss=loss_type))
    advantages, _ = group_advantages(rewards, group, objective.scale)
    expected = rewards.view(-1, group)  # TRL's own formula: (r - group mean) / (group sd + 1e-4), unscaled for dr_grpo
    centred = (expected - expected.mean(1, keepdim=True))
    if loss_type != "dr_grpo":
        centred = centred / (expected.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(advantages, centred.flatten())

    policy, reference = _tiny_llama(vocab, 0), _tiny_llama(vocab, 1)  # a reference unlike the policy
    ids = torch.cat([prompt_ids, completion_ids], 1)
    full_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    ref_logps = completion_logprobs(reference, ids, full_mask, max_len, temperature=0.7)[0].detach()
    args = GRPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=loss_type, num_generations=group,
                      max_completion_length=max_len, temperature=0.7, report_to="none", use_cpu=True, bf16=False,
                      per_device_train_batch_size=2 * group, epsilon_high=objective.epsilon_high)
    data = Dataset.from_list([{"prompt": "a"}] * 8)
    policy.save_pretrained(tmp_path / "policy")  # TRL builds its own reference from the policy's folder (unused here)
    trainer = GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=data, processing_class=tokenizer)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "ref_per_token_logps": ref_logps,
              "num_items_in_batch": completion_mask.sum()}
    old_logps, tokens_per_slice = None, None
    if moved:
        with torch.no_grad():
            sampler_logps = completion_logprobs(_tiny_llama(vocab, 0), ids, full_mask, max_len, temperature=0.7)[0]
        old_logps = sampler_logps + 0.3 * torch.randn(sampler_logps.shape, generator=generator)  # ratios off 1, some clipped
        inputs["old_per_token_logps"] = old_logps
        trainer.args.steps_per_generation = 2
        tokens_per_slice = completion_mask.sum() / 2
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by its training loop, which is not run here
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    their_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    model = _tiny_llama(vocab, 0)
    logps, _ = completion_logprobs(model, ids, full_mask, max_len, temperature=0.7)
    mine, kl = policy_loss(logps, logps.detach() if old_logps is None else old_logps, ref_logps if beta else None,
                           advantages, completion_mask, beta, objective.epsilon_low, objective.epsilon_high, loss_type,
                           max_len, tokens_per_slice)
    if moved:  # the clip is at work, and lmforge logs the shares TRL logs
        shares = clip_shares(logps, old_logps, advantages, completion_mask.float(), objective.epsilon_low,
                             objective.epsilon_high)
        assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] > 0
        for mine_key, their_key in (("clip_low", "low_mean"), ("clip_high", "high_mean"), ("clip_fraction", "region_mean")):
            assert float(shares[mine_key]) == pytest.approx(trainer._metrics["train"][f"clip_ratio/{their_key}"][-1], abs=1e-6)
    mine.backward()
    torch.testing.assert_close(mine, theirs.detach(), atol=1e-6, rtol=1e-5)
    assert (kl is None) == (beta == 0)
    grads = dict(model.named_parameters())
    assert their_grads.keys() == {n for n, p in grads.items() if p.grad is not None}
    for name, grad in their_grads.items():
        torch.testing.assert_close(grads[name].grad, grad, atol=1e-7, rtol=1e-4)


def test_batched_sampling_of_left_padded_prompts_equals_one_at_a_time(base_model):
    """The rollout sampler continues prompts of different lengths, left-padded in one batch, exactly as
    generate_ids continues each alone (greedy), and masks everything after a completion's EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.data.prompts import Prompt, PromptSet
    from lmforge.eval.generate import generate_ids, prompt_ids, sample_batch

    model = AutoModelForCausalLM.from_pretrained(base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    texts = ["The county", "In the middle of the long and quiet afternoon, the", "He said that"]
    prompts = PromptSet([Prompt(str(i), [], t, torch.tensor(prompt_ids(tokenizer, t)).numpy(), {}) for i, t in enumerate(texts)],
                        tokenizer.pad_token_id or 0)
    batch = prompts.batch([0, 1, 2])
    assert batch["attention_mask"][0, 0] == 0  # the short prompt is padded on the left
    ids, mask = sample_batch(model, tokenizer, batch["input_ids"], batch["attention_mask"], 1, 12, temperature=0.0)
    for row, text in enumerate(texts):
        alone = generate_ids(model, tokenizer, prompt_ids(tokenizer, text), 12, temperature=0.0)
        assert ids[row, : int(mask[row].sum())].tolist() == alone[: int(mask[row].sum())]
    eos = tokenizer.eos_token_id
    fake = torch.tensor([[5, eos, 7, 8], [5, 6, 7, 8]])
    is_eos = fake == eos
    assert ((is_eos.cumsum(1) - is_eos.long()) == 0).long().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_rewards_built_in_and_their_errors(reward_module):
    from lmforge.config import RewardConfig, RewardTermConfig
    from lmforge.rewards import Reward, exact_match, last_number, numeric_match

    assert last_number("so 3 + 4 is 1,207.5 dollars") == 1207.5 and last_number("none") is None
    assert numeric_match(["It is 21.", "21 or 22", "twenty-one"], ["21", "21", "21"]) == [1.0, 0.0, 0.0]
    assert exact_match(["  Paris. ", "paris is it"], ["paris", "Paris"]) == [1.0, 0.0]
    reward = Reward(RewardConfig(terms=[RewardTermConfig(kind="numeric_match"),
                                        RewardTermConfig(kind="regex", pattern=r"\d+", weight=0.5),
                                        RewardTermConfig(kind="function", function="my_rewards:digits", weight=2.0)]),
                    "response")
    rows = [{"response": "12"}, {"response": "12"}]
    total, parts = reward.score(["p", "p"], ["12", "it is 12"], rows, [[], []])
    assert reward.names == ["numeric_match", "regex", "digits"]
    assert parts["regex"].tolist() == [1.0, 0.0] and parts["numeric_match"].tolist() == [1.0, 1.0]
    torch.testing.assert_close(total, torch.tensor([1 + 0.5 + 2.0, 1 + 2 * 2 / 8]))
    for term, message in [({"kind": "function", "function": "no_such_module:f"}, r"reward.terms\[0\].function: cannot import"),
                          ({"kind": "function", "function": "my_rewards:missing"}, "has no function 'missing'"),
                          ({"kind": "function", "function": "my_rewards:no_completions"}, "must take keyword arguments"),
                          ({"kind": "regex", "pattern": "(unclosed"}, r"reward.terms\[0\].pattern"),
                          ({"kind": "model", "path": "/nonexistent"}, "not a model folder")]:
        with pytest.raises(ValueError, match=message):
            Reward(RewardConfig(terms=[RewardTermConfig(**term)]), "response")


def test_a_bad_reward_stops_the_run_before_training_with_its_key(tmp_path, base_model, sums_file, reward_module):
    result = runner.invoke(app, ["train", _recipe(tmp_path, base_model, sums_file, reward={"terms": []})])
    assert result.exit_code != 0 and "reward.terms: the grpo objective needs a reward" in result.output
    bad = {"terms": [{"kind": "function", "function": "my_rewards:no_completions"}]}
    result = runner.invoke(app, ["train", _recipe(tmp_path, base_model, sums_file, reward=bad)])
    assert result.exit_code != 0 and "must take keyword arguments prompts and completions" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "final").exists()


def test_grpo_under_lora_uses_the_base_as_reference_and_resumes_exactly(tmp_path, base_model, sums_file, reward_module):
    """Under LoRA the reference is the base with the adapters off (the KL starts at 0 and grows); the
    rollout seed travels with the batches, so a resumed run samples and ends the same."""
    path = _recipe(tmp_path, base_model, sums_file, method={"name": "lora", "lora": {"rank": 8}},
                   trainer={"max_steps": 6, "save_every": 3, "eval_every": 100, "eval_at_start": False, "log_every": 1,
                            "lr": 1e-2})
    assert_cli_resume_is_exact(path, tmp_path / "run", "adapter_model.safetensors", last_step=6)
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6) and train[-1]["kl"] > 1e-4


def test_check_measures_a_grpo_step(tmp_path, base_model, sums_file, reward_module):
    result = runner.invoke(app, ["check", _recipe(tmp_path, base_model, sums_file)])
    assert result.exit_code == 0, result.output
    assert re.search(r"measured: [\d.]+ s/step", result.output)  # real rollouts of stand-in prompts
    assert "split across packed rows" not in result.output


def test_a_run_past_its_kl_bound_stops_with_its_last_checkpoint(tmp_path, base_model, sums_file, reward_module):
    path = _recipe(tmp_path, base_model, sums_file, objective={"max_kl": 1e-3},
                   trainer={"max_steps": 12, "save_every": 2, "log_every": 4, "lr": 1e-2, "eval_every": 100})
    result = runner.invoke(app, ["train", path])
    assert result.exit_code == 2, result.output
    assert re.search(r"step \d+: the mean KL to the reference [\d.e-]+ exceeds objective.max_kl 0.001", result.output)
    assert "last good checkpoint: " + str(tmp_path / "run" / "checkpoints" / "step_") in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "final").exists()


def test_empty_completions_stop_a_run():
    from lmforge.objectives.grpo import GroupRelativePolicy

    objective = GroupRelativePolicy(None)
    assert objective.unhealthy({"kl": 50.0, "completion_length": 3.5}) is None  # no bound set
    assert "collapsed to empty" in objective.unhealthy({"kl": 0.1, "completion_length": 1.0})


@pytest.mark.slow
def test_grpo_under_ddp_each_rank_rolls_out_its_own_prompts(tmp_path, base_model, sums_file):
    """Two processes (gloo): each samples the completions of its half of the batch's prompts, the
    gradients are averaged, and the run learns as one process does."""
    import subprocess

    module = tmp_path / "rewards_module"
    module.mkdir()
    (module / "my_rewards.py").write_text(REWARDS_MODULE)
    path = _recipe(tmp_path, base_model, sums_file, trainer={"strategy": "ddp", "progress": False})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(module), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lmforge.cli", "train", path], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    assert after["reward"] > before["reward"] + 0.1
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_a_reward_model_folder_scores_the_rollouts(tmp_path, base_model, sums_file):
    """A reward model trained by objective.name: reward is a GRPO reward: its score of each prompt +
    completion, rendered with its own chat template, equals the folder's score through plain transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.config import RewardConfig, RewardTermConfig
    from lmforge.rewards import Reward

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "chosen": str(i + 1), "rejected": "no idea"}) + "\n"
                             for i in range(40)))
    (tmp_path / "rm").mkdir()
    reward_recipe = write_recipe(tmp_path / "rm", base_model, {
        "data": {"train_files": [str(pairs)], "val_fraction": 0.1}, "objective": {"name": "reward"},
        "trainer": {"max_steps": 10, "batch_size": 4, "lr": 1e-3, "eval_every": 10}}, {})
    result = runner.invoke(app, ["train", reward_recipe])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "rm" / "run" / "final"
    reward = Reward(RewardConfig(terms=[RewardTermConfig(kind="model", path=str(folder))]), "response")
    messages = [[{"role": "user", "content": "What is 3 plus 1?"}]] * 2
    total, parts = reward.score(["p", "p"], ["4", "no idea"], [{}, {}], messages)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for completion, score in zip(["4", "no idea"], total.tolist(), strict=True):
        text = tokenizer.apply_chat_template([*messages[0], {"role": "assistant", "content": completion}], tokenize=False)
        with torch.no_grad():
            expected = model(input_ids=tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids).logits[0, 0]
        assert score == pytest.approx(float(expected), abs=1e-5)
    assert total[0] > total[1]  # it learned to prefer the answer over the refusal

    path = _recipe(tmp_path, base_model, sums_file, reward={"terms": [{"kind": "model", "path": str(folder)}]},
                   trainer={"max_steps": 2, "eval_every": 2})
    result = runner.invoke(app, ["train", path])
    assert result.exit_code == 0, result.output
    assert "reward: 1 model" in result.output


@pytest.mark.slow
def test_grpo_uses_each_rollout_for_several_steps_and_logs_the_clip(tmp_path, base_model, sums_file, reward_module):
    """rollout.epochs 2 x minibatches 2: each rollout serves 4 optimizer steps; the later ones see a moved
    policy, so ratios leave 1 and some are clipped (clip_fraction > 0); the run still learns."""
    path = _recipe(tmp_path, base_model, sums_file, objective={"grpo_loss": "dapo"},
                   rollout={"epochs": 2, "minibatches": 2}, trainer={"max_steps": 24, "log_every": 2, "eval_every": 24})
    result = runner.invoke(app, ["run", path])
    assert result.exit_code == 0, result.output
    assert "each rollout serves 4 optimizer steps" in result.output
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert max(r["clip_fraction"] for r in train) > 0 and all("clip_low" in r and "clip_high" in r for r in train)
    before, after = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    assert after["reward"] > before["reward"] + 0.1


def test_dapo_weighs_every_token_of_a_rollout_alike_across_its_slices():
    """A rollout cut into two slices (grad_accum 2): dapo's normaliser (the rollout's tokens per slice) makes the
    accumulated loss the mean over all the rollout's tokens, as TRL's num_items_in_batch does; bnpo's per-slice
    mean would weigh the tokens of the slice with fewer of them more."""
    from lmforge.objectives.grpo import policy_loss

    generator = torch.Generator().manual_seed(0)
    logps = torch.randn(4, 6, generator=generator, requires_grad=True)
    mask = torch.tensor([[1] * 6, [1] * 6, [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0])
    args = dict(ref_logps=None, beta=0.0, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=6)

    def accumulated(loss_type, tokens_per_slice):
        return sum(policy_loss(logps[rows], logps[rows].detach(), advantages=advantages[rows], mask=mask[rows],
                               loss_type=loss_type, tokens_per_slice=tokens_per_slice, **args)[0] / 2
                   for rows in (slice(0, 2), slice(2, 4)))

    whole = policy_loss(logps, logps.detach(), advantages=advantages, mask=mask, loss_type="bnpo", **args)[0]
    torch.testing.assert_close(accumulated("dapo", mask.sum() / 2), whole)
    assert not torch.isclose(accumulated("bnpo", None), whole)
