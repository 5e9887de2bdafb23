"""MoRA versus peft LoRA of the same total rank: forward+backward step time, same inputs, side by side.

Usage:
    python bench/layer_speed.py [--device cpu|cuda] [--shape smollm2|llama-1.1b] [--rank 64] [--k 8]
                                [--batch 4] [--seq 128] [--reps 10] [--out bench/results/layer_speed.json]

The model is randomly initialised with the named shape (no download). Variants, timed in interleaved rounds so
that machine noise hits all of them alike (median of rounds reported):

* ``base``: the frozen base with a full backward (input gradients only), the floor;
* ``lora``: peft LoRA, rank R on the targets;
* ``mora_1block``: MoRA with one trainable block of R experts, top-k gating (the worst case: all experts train);
* ``mora_blocks``: MoRA with R/8 blocks of 8 experts, only the last one trainable (a stream mid-way).

Ratios to ``lora`` are the figures to read; absolute times only mean something on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    # SmolLM2-135M: hidden 576, 30 layers, 9 heads (3 kv), MLP 1536, vocab 49152
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, head_dim=64, tie_word_embeddings=True),
    # TinyLlama-1.1B shape: the GPU setting (--shape llama-1.1b --device cuda)
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}


def build_variants(shape: str, rank: int, k: int, targets: list[str], dtype, device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from mora_dist.mora import MoRAConfig, add_block, inject_mora

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    base = LlamaForCausalLM(cfg).to(dtype=dtype, device=device)
    base.requires_grad_(False)
    variants = {"base": base}
    variants["lora"] = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                       target_modules=targets, lora_dropout=0.0))
    one = copy.deepcopy(base)
    inject_mora(one, MoRAConfig(r_task=rank, k=k, tau=0.03, delta=None, dropout=0.0, target_modules=targets))
    add_block(one, "t0")
    variants["mora_1block"] = one
    if rank % 8 == 0 and rank > 8:
        many = copy.deepcopy(base)
        inject_mora(many, MoRAConfig(r_task=8, k=k, tau=0.03, delta=None, dropout=0.0, target_modules=targets))
        for b in range(rank // 8):
            add_block(many, f"t{b}")
        variants["mora_blocks"] = many
    for m in variants.values():
        m.to(device=device, dtype=dtype)
        m.train()
    return variants


def step_fn(model, ids, device):
    params = [p for p in model.parameters() if p.requires_grad]
    emb = model.get_input_embeddings()

    def step():
        if params:
            out = model(input_ids=ids, labels=ids)
        else:  # frozen base: backward to the input embeddings, as a full backward through all layers
            x = emb(ids).detach().requires_grad_(True)
            out = model(inputs_embeds=x, labels=ids)
        out.loss.backward()
        for p in params:
            p.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--all-linears", action="store_true", help="adapt the MLP projections too")
    ap.add_argument("--out", default="bench/results/layer_speed.json")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["gate_proj", "up_proj", "down_proj"]
                                                          if args.all_linears else [])
    variants = build_variants(args.shape, args.rank, args.k, targets, dtype, args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), generator=g).to(args.device)
    steps = {name: step_fn(m, ids, args.device) for name, m in variants.items()}
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.reps):
        names = list(steps)
        if r % 2:
            names.reverse()  # alternate the order inside each round
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    result = {
        "benchmark": "layer_speed",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "shape": args.shape, "rank": args.rank, "k": args.k, "batch": args.batch, "seq": args.seq,
        "dtype": str(dtype).replace("torch.", ""), "targets": targets, "reps": args.reps,
        "median_step_s": med,
        "ratio_to_lora": {n: med[n] / med["lora"] for n in med},
        "all_step_s": times,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "all_step_s"}, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
