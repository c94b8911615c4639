"""Run by tests/test_ppo.py in a subprocess whose path holds TRL 1.12 (the last release with
trl.experimental.ppo; see the Makefile): one rollout of TRL's own PPOTrainer.train() and of lmforge's ppo
objective on the same completions, scores, policy, value head and reference, then both results as JSON.

TRL's trainer samples and scores inside train(): its sampler is replaced by the fixed completions (with
the logits the policy gives them, as sampling would return) and its reward-model call by the fixed
scores; everything else (KL penalty, GAE, whitening, the epochs of clipped policy and value losses, the
optimizer steps) is TRL's code. Its value model shares the policy's body and carries the same linear head
as lmforge's value head, so both compute the same values.

    python ppo_reference_run.py TOKENIZER_DIR OUT.json
"""

import json
import sys
import tempfile

import torch
from torch import nn


def tiny_llama(vocab: int, seed: int):
    from lmforge.models.factory import build_model, preset_config

    torch.manual_seed(seed)
    return build_model(preset_config("llama", "tiny", vocab, 512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, intermediate_size=128), "causal_lm")


class SharedBodyValueModel(nn.Module):
    """What TRL's PPOTrainer takes as its value model (a body under `base_model_prefix`, a `score` head),
    built on the policy's own body: a value head on the policy, as lmforge's."""

    base_model_prefix = "model"

    def __init__(self, policy, head: nn.Linear):
        super().__init__()
        self.model, self.score = policy.model, head


def main(tokenizer_dir: str, out_path: str) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from lmforge.config import ObjectiveConfig, RewardConfig, RolloutConfig
    from lmforge.data.prompts import PromptSet
    from lmforge.engine.rollout import Rollout, RolloutBatch
    from lmforge.objectives.ppo import ProximalPolicy
    from lmforge.rewards import Reward

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = (len(tokenizer) + 63) // 64 * 64
    rows, prompt_len, completion_len, temperature, epochs = 4, 5, 6, 0.7, 2
    lr = float(sys.argv[3]) if len(sys.argv) > 3 else 0.05  # both clips engage at this step size
    settings = {"beta": 0.05, "epsilon": 0.2, "value_clip": 0.2, "vf_coef": 0.1, "gamma": 1.0, "gae_lambda": 0.95}
    generator = torch.Generator().manual_seed(0)
    reserved = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    allowed = torch.tensor([i for i in range(10, len(tokenizer)) if i not in reserved])
    pick = lambda *shape: allowed[torch.randint(0, len(allowed), shape, generator=generator)]  # noqa: E731
    queries, completions = pick(rows, prompt_len), pick(rows, completion_len)  # no EOS: they run to the end
    scores = torch.tensor([1.5, -0.5, 0.25, 2.0])
    head_init = nn.Linear(64, 1)
    torch.manual_seed(3)
    nn.init.normal_(head_init.weight, std=0.5)

    # ---- TRL 1.12's PPOTrainer, one rollout
    policy, reference = tiny_llama(vocab, 0), tiny_llama(vocab, 1)
    head = nn.Linear(64, 1)
    head.load_state_dict(head_init.state_dict())
    by_query = {tuple(q.tolist()): (c, s) for q, c, s in zip(queries, completions, scores, strict=True)}

    def fixed_generation(model, batch_queries, batch_size, pad_token_id, generation_config):
        responses = torch.stack([by_query[tuple(q.tolist())][0] for q in batch_queries])
        query_responses = torch.cat([batch_queries, responses], 1)
        with torch.no_grad():
            logits = model(input_ids=query_responses).logits[:, prompt_len - 1 : -1] / (generation_config.temperature)
        return query_responses, logits

    original_get_reward = trl_ppo.get_reward

    def fixed_reward(model, query_responses, pad_token_id, context_length):
        if model is not reward_model:
            return original_get_reward(model, query_responses, pad_token_id, context_length)
        return None, torch.stack([by_query[tuple(q[:prompt_len].tolist())][1] for q in query_responses]), None

    trl_ppo.batch_generation, trl_ppo.get_reward = fixed_generation, fixed_reward
    reward_model = nn.Linear(1, 1)  # never called: fixed_reward answers for it
    value_model = SharedBodyValueModel(policy, head)
    parameters = list(policy.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=rows, gradient_accumulation_steps=1,
                     num_mini_batches=1, num_ppo_epochs=epochs, total_episodes=rows, response_length=completion_len,
                     temperature=temperature, kl_coef=settings["beta"], kl_estimator="k1", cliprange=settings["epsilon"],
                     cliprange_value=settings["value_clip"], vf_coef=settings["vf_coef"], gamma=settings["gamma"],
                     lam=settings["gae_lambda"], whiten_rewards=False, stop_token=None, missing_eos_penalty=None,
                     report_to="none", use_cpu=True, bf16=False, num_sample_generations=0, save_strategy="no",
                     logging_steps=1, disable_tqdm=True)
    data = Dataset.from_list([{"input_ids": q.tolist()} for q in queries])
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward_model, train_dataset=data, value_model=value_model, eval_dataset=data,
                         optimizers=(optimizer, schedule))
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss/policy_avg" in entry)
    theirs = {"weights": {n: p.detach().clone() for n, p in policy.named_parameters()},
              "head": head.weight.detach().clone()}

    # ---- lmforge's ppo objective, the same rollout
    policy, reference = tiny_llama(vocab, 0), tiny_llama(vocab, 1)

    class FixedRollout(Rollout):
        def sample(self, model, batch):
            return RolloutBatch(queries, torch.ones_like(queries), completions, torch.ones_like(completions), scores, {}, [])

    cfg = RolloutConfig(num_generations=1, max_new_tokens=completion_len, temperature=temperature, epochs=epochs)
    rollout = FixedRollout(cfg, tokenizer, Reward(RewardConfig(terms=[]), "response"), PromptSet([], 0), PromptSet([], 0))
    objective = ProximalPolicy(ObjectiveConfig(name="ppo", kl_estimator="k1", **settings))
    objective.bind(rollout, reference.eval().requires_grad_(False), policy, torch.device("cpu"))
    objective.value_head.load_state_dict(head_init.state_dict())
    optimizer = torch.optim.SGD(list(policy.parameters()) + objective.extra_parameters(), lr=lr)
    policy.train()
    mine = []
    for part in range(epochs):
        batch = {"input_ids": queries, "rollout_part": torch.full((rows,), part), "rollout_seed": torch.zeros(rows, dtype=torch.long)}
        loss, metrics = objective.loss(policy, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mine.append({k: float(v) for k, v in metrics.items()})
    average = lambda key: sum(m[key] for m in mine) / len(mine)  # noqa: E731
    weight_diff = max(float((p.detach() - theirs["weights"][n]).abs().max()) for n, p in policy.named_parameters())
    start = dict(tiny_llama(vocab, 0).named_parameters())
    moved = max(float((p.detach() - start[n].detach()).abs().max()) for n, p in policy.named_parameters())
    result = {
        "trl": {"policy_loss": logged["loss/policy_avg"], "value_loss": logged["loss/value_avg"],
                "clip_fraction": logged["policy/clipfrac_avg"], "value_clip_fraction": logged["val/clipfrac_avg"],
                "kl_per_completion": logged["objective/kl"], "scores": logged["objective/scores"],
                "approx_kl": logged["policy/approxkl_avg"]},
        "lmforge": {"policy_loss": average("policy_loss"), "value_loss": average("value_loss"),
                    "clip_fraction": average("clip_fraction"), "value_clip_fraction": average("value_clip_fraction"),
                    "kl_per_completion": mine[0]["kl"] * completion_len, "scores": mine[0]["reward"],
                    "approx_kl": average("approx_kl")},
        "max_weight_difference": weight_diff, "max_weight_change": moved,
        "max_head_difference": float((objective.value_head.weight.detach() - theirs["head"]).abs().max()),
    }
    with open(out_path, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
