"""What PPO changed in recipes/smollm2_rlhf.yaml, prompt by prompt: the reward model's score of one greedy
answer per held-out prompt from the SFT model (PPO's start) and from the PPO model, their paired difference
with a bootstrap 95% interval, and as a yardstick the reward model's score of the human answers (the
preferred and the rejected one) to the same prompts. Run after the pipeline:

    python bench/rlhf_heldout.py [runs/smollm2_rlhf]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent


def main(pipeline: Path) -> None:
    from lmforge.config import RewardConfig, RewardTermConfig
    from lmforge.data.instructions import InstructionFormat
    from lmforge.data.prompts import load_prompts
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.eval.generate import sample_batch
    from lmforge.eval.intervals import bootstrap_interval
    from lmforge.models.factory import load_model
    from lmforge.recipe_files import load_recipe
    from lmforge.rewards import Reward

    recipe = load_recipe(pipeline / "ppo" / "recipe.yaml")
    tokenizer = load_tokenizer(pipeline / "ppo" / "final")
    cfg = recipe.data
    prompts = load_prompts(cfg.train_files, tokenizer, InstructionFormat.of(cfg), recipe.packing.seq_len, cfg.val_fraction,
                           cfg.max_docs, cfg.val_files).val
    reward = Reward(RewardConfig(terms=[RewardTermConfig(kind="model", path=str(pipeline / "reward" / "final"))]),
                    cfg.response_column)

    def scores(completions: list[str]) -> np.ndarray:
        rows = prompts.prompts
        total, _ = reward.score([p.text for p in rows], completions, [p.row for p in rows], [p.messages for p in rows])
        return total.numpy()

    def greedy(folder: Path) -> list[str]:
        model = load_model(folder, "causal_lm").eval()
        out = []
        for start in range(0, len(prompts), 8):
            batch = prompts.batch(list(range(start, min(start + 8, len(prompts)))))
            ids, mask = sample_batch(model, tokenizer, batch["input_ids"], batch["attention_mask"], 1,
                                     recipe.rollout.max_new_tokens, temperature=0.0)
            out += [tokenizer.decode(i[: int(m.sum())], skip_special_tokens=True) for i, m in zip(ids, mask, strict=True)]
        return out

    torch.manual_seed(0)
    before, after = greedy(pipeline / "ppo" / "start"), greedy(pipeline / "ppo" / "final")
    raw = [json.loads(line) for line in __import__("gzip").open(cfg.train_files[0], "rt")]
    by_prompt = {r["prompt"]: r for r in raw}
    human = {k: scores([by_prompt[p.row["prompt"]][k] for p in prompts.prompts]) for k in ("chosen", "rejected")}
    s_before, s_after = scores(before), scores(after)
    result = {"held_out_prompts": len(prompts), "sft": float(s_before.mean()), "ppo": float(s_after.mean()),
              "change": float((s_after - s_before).mean()),
              "change_ci": bootstrap_interval((s_before, s_after), lambda x, y: float(np.mean(y - x))),
              "ppo_higher": int((s_after > s_before).sum()), "answers_changed": sum(a != b for a, b in zip(before, after, strict=True)),
              "human_chosen": float(human["chosen"].mean()), "human_rejected": float(human["rejected"].mean()),
              "examples": [{"prompt": p.row["prompt"][-120:], "sft": b, "ppo": a} for p, b, a in
                           list(zip(prompts.prompts, before, after, strict=True))[:8]]}
    sys.path.insert(0, str(HERE))
    import results

    out = results.record({"rlhf_heldout": result}, results.machine({}))
    print(f"-> {out}")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))
    for e in result["examples"]:
        print(f"  {e['sft']!r:40} -> {e['ppo']!r}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2_rlhf"))
