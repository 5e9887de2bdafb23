"""Regression: a ZeRO-3 start-up in a fresh interpreter survives transformers' lazy torch._dynamo imports."""

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", ACCELERATOR="cpu", DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig
    from mora_dist.config import load_config
    from mora_dist.distributed import engine
    cfg = load_config(None, ["distributed.zero_stage=3"])
    tiny = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)

    def loader():  # as from_pretrained does: the model class (and generation code) first imported under zero.Init
        from transformers import LlamaForCausalLM
        return LlamaForCausalLM(tiny)

    assert "transformers.generation.utils" not in sys.modules, "the test needs the lazy import to happen late"
    model = engine.build_model(loader, cfg)
    print("ZERO3_OK", type(model).__name__)
    dist.barrier(); dist.destroy_process_group()
""")


def test_zero3_model_build_in_a_fresh_interpreter(tmp_path):
    from mora_dist.distributed.env import free_port

    out = subprocess.run([sys.executable, "-c", SCRIPT, str(free_port())], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and "ZERO3_OK" in out.stdout, out.stderr[-3000:]
