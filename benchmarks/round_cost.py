"""Cost of SEFT evolution on the core benchmark model: ordinary steps, gradient-window steps, and the round itself.

    python benchmarks/round_cost.py

Random Llama (hidden 512, 4 layers, intermediate 1376, vocab 8192), batch 4 x 256, density 0.01, update_interval 20,
selection_steps 5, AdamW, 1 torch thread. Prints median step times and the share of training time spent in rounds
and in the extra work of window steps over steps 21-60.
"""

import time

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_seft

INTERVAL, WINDOW = 20, 5


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8192,
    )
    seft = peft_seft.SEFTConfig(density=0.01, update_interval=INTERVAL, selection_steps=WINDOW, total_steps=10**6)
    model = get_peft_model(LlamaForCausalLM(config), seft)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (4, 256))

    evolution = model.base_model.evolution
    run_round, round_seconds = evolution._run_round, []

    def timed_round(*args, **kwargs):
        start = time.perf_counter()
        run_round(*args, **kwargs)
        round_seconds.append(time.perf_counter() - start)

    evolution._run_round = timed_round
    step_seconds = {}
    for step in range(1, 3 * INTERVAL + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_seconds[step] = time.perf_counter() - start

    def median(values):
        return sorted(values)[len(values) // 2]

    in_window = {step: (-step) % INTERVAL < WINDOW for step in step_seconds}
    ordinary = median([t for s, t in step_seconds.items() if s > WINDOW and not in_window[s]])
    window = median([t for s, t in step_seconds.items() if s > WINDOW and in_window[s]])
    measured = [t for s, t in step_seconds.items() if s > INTERVAL]
    total = sum(measured)
    rounds = sum(round_seconds[-2:])
    window_extra = (window - ordinary) * WINDOW * 2
    print(f"ordinary step {ordinary * 1e3:.0f} ms, window step {window * 1e3:.0f} ms (rounds run at multiples of 20)")
    print(f"rounds: {[round(r * 1e3) for r in round_seconds]} ms")
    print(f"steps {INTERVAL + 1}-{3 * INTERVAL}: {total:.1f} s; rounds {100 * rounds / total:.1f} %, ", end="")
    print(f"extra work of window steps {100 * window_extra / total:.1f} %")


if __name__ == "__main__":
    main()
