"""One-process tests of the distributed package: launcher discovery and its errors, the derived DeepSpeed
config and its errors, launch command generation (hostfile, Slurm, deepspeed, torchrun, mpirun), and the
statistics / pruning functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import REPO, tiny_llama_config
from mora_dist.config import ConfigError, DistributedConfig, ModelConfig, PruneConfig, TrainConfig
from mora_dist.distributed import env as E
from mora_dist.distributed import launch_cmd as L
from mora_dist.distributed import stats as S
from mora_dist.mora import pruning as P


# ------------------------------------------------------------------------------------------- discovery
class FakeMPI:
    def __init__(self, rank=0, size=2, hosts=("a", "a")):
        self.rank, self.size, self.local_rank, self.hostnames = rank, size, rank, list(hosts)

    def bcast(self, value):
        return 4242 if value is None else value


def test_discover_single_and_torchrun():
    assert E.discover({}).launcher == "single"
    assert E.discover({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "8"}).launcher == "single"
    info = E.discover({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"})
    assert (info.rank, info.world_size, info.local_rank, info.master_port, info.launcher) == (1, 2, 1, 29500, "env")


@pytest.mark.parametrize("env, names", [
    ({"RANK": "0"}, ["RANK", "WORLD_SIZE"]),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1"}, ["SLURM_STEP_NUM_TASKS=4", "slurm.sbatch"]),
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE", "RANK"]),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["RANK=2", "WORLD_SIZE=2"]),
    ({"RANK": "x", "WORLD_SIZE": "2"}, ["RANK='x'"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, ["LOCAL_RANK"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1"}, ["MASTER_ADDR"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h"}, ["MASTER_PORT", "export"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "99999"},
     ["MASTER_PORT=99999"]),
])
def test_discover_rejects_inconsistent_env_naming_the_variable(env, names):
    with pytest.raises(E.DistributedEnvError) as err:
        E.discover(env)
    for name in names:
        assert name in str(err.value)


def test_discover_mpi_uses_mpi4py_and_loopback_on_one_host():
    info = E.discover({"PMI_RANK": "1", "PMI_SIZE": "2"}, mpi=lambda: FakeMPI(rank=1))
    assert (info.rank, info.world_size, info.master_addr, info.master_port, info.launcher) == \
        (1, 2, "127.0.0.1", 4242, "mpi")
    kept = E.discover({"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"},
                      mpi=lambda: FakeMPI(rank=1))
    assert (kept.master_addr, kept.master_port) == ("10.0.0.5", 1234)  # an address already set is respected
    multi = E.discover({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"},
                       mpi=lambda: FakeMPI(rank=1, hosts=("n1", "n2")))
    assert multi.master_addr == "n1"  # rank 0's host name on several nodes


@pytest.mark.parametrize("env, fake, names", [
    ({"PMI_SIZE": "2", "WORLD_SIZE": "4"}, FakeMPI(), ["WORLD_SIZE=4", "mpiexec -n 4"]),
    ({"PMI_SIZE": "2", "RANK": "1"}, FakeMPI(rank=0), ["RANK=1", "MPI rank 0"]),
    ({"PMI_SIZE": "3"}, FakeMPI(size=2), ["PMI_SIZE=3", "mpi4py"]),
])
def test_discover_mpi_mismatches(env, fake, names):
    with pytest.raises(E.DistributedEnvError) as err:
        E.discover(env, mpi=lambda: fake)
    for name in names:
        assert name in str(err.value)


def test_init_distributed_fails_before_forming_a_group(monkeypatch):
    for var in E.MPI_SIZE_VARS + ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(E.DistributedEnvError, match="WORLD_SIZE"):
        E.init_distributed()
    assert not torch.distributed.is_initialized()


def test_selftest_with_bad_env_exits_before_training(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    env.update(RANK="3", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "mora_dist.distributed.selftest", "--model", "none",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "DistributedEnvError: RANK=3 is outside 0..WORLD_SIZE-1" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was trained or written


FINISH_WORKER = """
import logging, sys
from mora_dist.distributed.env import finish, init_distributed, shutdown
rank, world, _ = init_distributed("gloo")
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
logging.getLogger("w").info("logged by %d", rank)
print(f"rank {rank} of {world}", end="")  # stdout is a pipe: block-buffered, still unwritten at finish
shutdown()
finish(3 + rank)
print("after finish")
"""


def test_finish_leaves_a_launched_worker_with_its_code_and_its_output():
    """Two workers (gloo, 127.0.0.1) end through finish(): each exits with its own code, buffered output and
    logging written, nothing after it run; in a single process finish() only returns the code."""
    assert E.finish(5) == 5
    port = E.free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in E.MPI_SIZE_VARS + E.MPI_RANK_VARS + ("PYTHONUNBUFFERED",)}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", FINISH_WORKER], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 3 + r, err[-2000:]
        assert out == f"rank {r} of 2"
        assert f"logged by {r}" in err


COLLECTIVES_WORKER = """
import sys
from mora_dist.distributed.collectives import any_rank, collective_device, max_over_ranks
from mora_dist.distributed.env import finish, init_distributed, shutdown
rank, world, _ = init_distributed(sys.argv[1])
from mora_dist.distributed.stats import check_decision_agrees
answers = [any_rank(rank == 1), any_rank(False), max_over_ranks([rank, -rank, 7])]
decision = {"block": 1, "block_name": "b", "layers": {"q": {"remove": [0], "keep": [1]}}}
agree = len(set(check_decision_agrees(decision))) == 1
decision["layers"]["q"]["remove"] = [rank]
try:
    check_decision_agrees(decision)
except RuntimeError:
    agree = agree and "refused"
print(collective_device().type, answers, agree, end="")
shutdown()
finish(0)
"""


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs two GPUs"))])
def test_rank_decisions_use_tensors_the_backend_can_reduce(backend):
    """any_rank / max_over_ranks (the orchestrator's shared decisions, the statistics' lockstep check) and the
    pruning decision's hash check on two real workers: every worker gets the same answer (a decision that differs
    is refused on both), on gloo from CPU tensors and under NCCL (no CPU path) from GPU ones."""
    port = E.free_port()
    env = {k: v for k, v in os.environ.items() if k not in E.MPI_SIZE_VARS + E.MPI_RANK_VARS}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", COLLECTIVES_WORKER, backend],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    device = "cuda" if backend == "nccl" else "cpu"
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out == f"{device} [True, False, [1, 0, 7]] refused"


# ------------------------------------------------------------------------------------------- ds_config
def _ds(train=None, dist=None, dtype="float32", world=2, **kw):
    from mora_dist.distributed.ds_config import ds_config

    return ds_config(train or TrainConfig(micro_batch_size=2), dist or DistributedConfig(), dtype, world, **kw)


def test_ds_config_batch_arithmetic_precision_and_offload():
    cfg = _ds(TrainConfig(micro_batch_size=2, global_batch_size=16, grad_clip=0.5), world=2)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) \
        == (2, 4, 16)
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"]["stage"] == 2
    assert "bf16" not in cfg and "fp16" not in cfg and "optimizer" not in cfg
    assert _ds(dtype="bfloat16")["bf16"] == {"enabled": True}
    assert _ds(dtype="float16")["fp16"]["enabled"]
    z3 = _ds(dist=DistributedConfig(zero_stage=3, offload_optimizer=True, offload_params=True),
             persistence_threshold=0)
    zo = z3["zero_optimization"]
    assert zo["stage"] == 3 and zo["offload_param"]["device"] == "cpu" and zo["offload_optimizer"]["device"] == "cpu"
    assert zo["stage3_param_persistence_threshold"] == 0
    assert z3["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam for offloaded states
    assert _ds(TrainConfig(micro_batch_size=3), world=4)["train_batch_size"] == 12


def test_ds_config_rejects_bad_input_before_training():
    with pytest.raises(ConfigError, match="global_batch_size=6"):
        _ds(TrainConfig(micro_batch_size=2, global_batch_size=6), world=2)
    with pytest.raises(ConfigError, match="zero_stage=4"):  # the typed config checks; the engine trusts it
        DistributedConfig(zero_stage=4)
    with pytest.raises(ConfigError, match="offload_params"):
        DistributedConfig(zero_stage=2, offload_params=True)
    with pytest.raises(ConfigError, match="dtype"):
        ModelConfig(dtype="int8")
    with pytest.raises(ConfigError, match="offload_optimizer"):
        _ds(dist=DistributedConfig(zero_stage=0, offload_optimizer=True))
    with pytest.raises(ConfigError, match="zero_stage=0 with model.dtype=bfloat16 on 2 workers"):
        _ds(dist=DistributedConfig(zero_stage=0), dtype="bfloat16")
    for stage in (1, 2, 3):  # 16-bit under ZeRO is fine
        assert _ds(dist=DistributedConfig(zero_stage=stage), dtype="bfloat16")["bf16"]["enabled"]


# ---------------------------------------------------------------------------------------- launch commands
def test_expand_slurm_nodelist_and_hostfile():
    assert L.expand_nodelist("gpu[08-10,12],login1") == ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]
    assert L.expand_nodelist("n[1-2]-ib") == ["n1-ib", "n2-ib"]
    assert L.expand_nodelist("single") == ["single"]
    text = L.hostfile_text(L.expand_nodelist("node[01-02]"), 4)
    assert text == "node01 slots=4\nnode02 slots=4\n"
    assert L.parse_hostfile("# c\n" + text + "\n") == [("node01", 4), ("node02", 4)]
    assert L.parse_hostfile((REPO / "launch" / "hostfile.example").read_text()) == [("node01", 4), ("node02", 4)]
    with pytest.raises(ValueError, match="slots"):
        L.hostfile_text(["a"], 0)
    with pytest.raises(ValueError, match="duplicate"):
        L.hostfile_text(["a", "a"], 1)
    with pytest.raises(ValueError, match="line 1"):
        L.parse_hostfile("node01 4")


def test_launcher_command_lines():
    args = ["run", "c.yaml", "train.lr=1e-4"]
    assert L.deepspeed_cmd(args, gpus=2) == [
        "deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", "29500", "--no_local_rank",
        "--module", "mora_dist", *args]
    multi = L.deepspeed_cmd(args, hostfile="hf", launcher="slurm", master_addr="n1")
    assert multi[:7] == ["deepspeed", "--hostfile", "hf", "--launcher", "slurm", "--master_addr", "n1"]
    assert "--num_gpus" not in multi
    assert L.torchrun_cmd(args, nproc=2, master_port=1234) == [
        "torchrun", "--nproc_per_node", "2", "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", "1234",
        "-m", "mora_dist", *args]
    tr = L.torchrun_cmd(args, nproc=4, nnodes=2, master_addr="n1", node_rank=1)
    assert "--rdzv_endpoint" in tr and tr[tr.index("--rdzv_endpoint") + 1] == "n1:29500" and "--node_rank" in tr
    assert L.mpirun_cmd(args, n=2, python="py") == ["mpiexec", "-n", "2", "py", "-m", "mora_dist", *args]
    assert L.mpirun_cmd(args, n=4, hosts=["a", "b"], python="py", master_addr="a", master_port=5)[:9] == [
        "mpiexec", "-n", "4", "-hosts", "a,b", "-genv", "MASTER_ADDR", "a", "-genv"]
    srun = L.srun_torchrun_cmd(args, nodes=2, gpus_per_node=4, master_addr="n1")
    assert srun[:6] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "bash"]
    assert "--rdzv_id ${SLURM_JOB_ID}" in srun[-1] and "--nnodes 2" in srun[-1]


def test_slurm_sbatch_builds_hostfile_and_calls_deepspeed(tmp_path):
    """Run launch/slurm.sbatch with fake scontrol/deepspeed/srun on PATH (no Slurm here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2 $3\" = \"show hostnames gpu[1-2]\" ] && "
                                      "printf 'gpu1\\ngpu2\\n'\n")
    for tool in ("deepspeed", "torchrun"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" > {tmp_path}/{tool}.args\n")
    # srun runs its command (one task here): the inner torchrun line must expand SLURM_JOB_ID on the node
    (bin_dir / "srun").write_text(f"#!/bin/sh\necho srun \"$@\" > {tmp_path}/srun.args\nshift 4\nexec \"$@\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               SLURM_JOB_NODELIST="gpu[1-2]", SLURM_JOB_ID="77", SLURM_GPUS_ON_NODE="4", SLURM_JOB_NUM_NODES="2",
               PYTHONPATH=str(REPO))
    for launcher, tool in (("deepspeed", "deepspeed"), ("torchrun", "torchrun")):
        env["MORA_LAUNCHER"] = launcher
        proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "cfg.yaml", "train.lr=1e-4"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        called = (tmp_path / f"{tool}.args").read_text().split()
        assert called[-3:] == ["run", "cfg.yaml", "train.lr=1e-4"]
        if tool == "deepspeed":
            assert called[1:5] == ["--hostfile", "runs/slurm/hostfile-77", "--master_addr", "gpu1"]
            assert "--launcher" not in called  # pdsh: DeepSpeed's slurm backend sets no RANK for its tasks
            assert "\nPATH=" in "\n" + (tmp_path / "runs/slurm/env-77").read_text()  # the venv reaches the nodes
            assert "gpu1" in called
        else:
            assert "--rdzv_endpoint" in called and "gpu1:29500" in called and "77" in called
            assert (tmp_path / "srun.args").read_text().split()[:5] == ["srun", "--nodes", "2",
                                                                         "--ntasks-per-node", "1"]
    assert (tmp_path / "runs/slurm/hostfile-77").read_text() == "gpu1 slots=4\ngpu2 slots=4\n"


def test_launch_cmd_cli(capsys):
    L.main(["hostfile", "--slurm-nodelist", "a[1-2]", "--slots", "2"])
    assert capsys.readouterr().out == "a1 slots=2\na2 slots=2\n"
    L.main(["torchrun", "--nproc", "2", "--", "run", "my config.yaml"])
    assert capsys.readouterr().out.strip().endswith("-m mora_dist run 'my config.yaml'")


# -------------------------------------------------------------------------------------- stats and pruning
def _stats(ladder, order=(3, 0, 2, 1), tokens=100, sizes=(2, 4)):
    R = sum(sizes)
    zeros = torch.zeros(R, dtype=torch.float64)
    return {"world_size": 1, "layers": {"l0": {
        "selected": zeros, "weight_sum": zeros, "mass": zeros, "tokens": tokens, "block_names": ["t0", "t1"],
        "block_sizes": list(sizes), "block_scales": [2.0, 2.0], "ladder": ladder,
        "ladder_order": None if ladder is None else list(order)}}}


def test_decide_pruning_takes_the_largest_rung_within_the_bound():
    cfg = PruneConfig(max_output_change=0.01, min_keep=1)
    # ||Y_full||^2 = 100; rungs remove 1, 2, 3 experts of the new block: relative changes 0.5 %, 2 %, 0.8 %
    ladder = [100.0, 100 * 0.005 ** 2, 100 * 0.02 ** 2, 100 * 0.008 ** 2]
    d = P.decide_pruning(_stats(ladder), None, cfg)
    assert d["block"] == 1 and d["block_name"] == "t1"
    entry = d["layers"]["l0"]
    assert (entry["remove"], entry["keep"]) == ([0, 2, 3], [1])  # order[:3]: each rung is a measured bank
    assert entry["output_change"] == pytest.approx(0.008) and entry["ladder"][2] == pytest.approx(0.02)
    # the hash covers what is removed, not the last bits of the measurement
    nudged = P.decide_pruning(_stats([100.0, ladder[1], ladder[2], ladder[3] * (1 + 1e-12)]), None, cfg)
    assert nudged["hash"] == d["hash"]
    keep2 = P.decide_pruning(_stats(ladder), None, PruneConfig(max_output_change=0.01, min_keep=2))
    assert keep2["layers"]["l0"]["remove"] == [3] and keep2["hash"] != d["hash"]
    strict = P.decide_pruning(_stats(ladder), None, PruneConfig(max_output_change=0.001))
    assert strict["layers"]["l0"]["remove"] == [] and strict["layers"]["l0"]["output_change"] == 0.0
    off = P.decide_pruning(_stats(ladder), None, PruneConfig(enabled=False))
    assert off["layers"]["l0"]["remove"] == [] and off["layers"]["l0"]["ladder"] is not None  # still measured
    assert P.decide_pruning(_stats(ladder, tokens=0), None, cfg)["layers"]["l0"]["remove"] == []
    assert P.decide_pruning(_stats(None), None, cfg)["layers"]["l0"]["remove"] == []  # no complete ladder
    zero = P.decide_pruning(_stats([0.0, 0.0, 0.0, 1e-3]), None, cfg)  # a zero output: only no-change rungs
    assert zero["layers"]["l0"]["remove"] == [0, 3]


def test_retired_prune_thresholds_are_a_clear_error():
    from mora_dist.config import load_config

    with pytest.raises(ConfigError, match=r"prune\.min_usage is no longer a setting.*max_output_change"):
        load_config(None, ["prune.min_usage=0.01"])
    with pytest.raises(ConfigError, match="max_output_change"):
        PruneConfig(max_output_change=-0.1)


def _tiny_mora():
    from transformers import LlamaForCausalLM

    from mora_dist.mora import MoRAConfig, add_block, inject_mora

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    inject_mora(model, MoRAConfig(r_task=4, k=2, tau=0.3, dropout=0.0))
    add_block(model, "t0")
    for _, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    return model


def _direct_change(layer, A_full, B_full, scale, new_size, xs, remove):
    """||Y_pruned - Y_full||_F / ||Y_full||_F of a layer's adapter output over inputs ``xs``, in float64, written
    out independently of the library: normalise, top-k, softmax / tau, threshold, on each bank."""
    start = A_full.shape[0] - new_size
    keep = torch.ones(A_full.shape[0], dtype=torch.bool)
    keep[[start + i for i in remove]] = False

    def out(A, B, sc, x):
        z = x @ A.T
        s = z / z.norm(dim=-1, keepdim=True).clamp_min(layer.eps)
        kept, idx = s.topk(min(layer.k, s.shape[-1]), dim=-1)
        w = torch.zeros_like(s).scatter(-1, idx, torch.softmax(kept / layer.tau, dim=-1))
        w = w * (s >= layer.delta) if layer.delta is not None else w
        return (sc * w * z) @ B.T

    num = den = 0.0
    for x in xs:
        full = out(A_full, B_full, scale, x)
        pruned = out(A_full[keep], B_full[:, keep], scale[keep], x)
        num += float(((pruned - full) ** 2).sum())
        den += float((full ** 2).sum())
    return (num / den) ** 0.5


def test_collect_statistics_sums_batches_and_skips_padding():
    from mora_dist.distributed.selftest import collate
    from mora_dist.mora import mora_layers
    from mora_dist.mora.removal import relative_changes

    model = _tiny_mora()
    layers = mora_layers(model)
    g = torch.Generator().manual_seed(1)
    ex = [torch.randint(1, 128, (n,), generator=g) for n in (5, 16, 9, 12)]
    b1, b2 = collate(ex[:2]), collate(ex[2:])
    raw = {name: [] for name in layers}
    handles = [layer.register_forward_pre_hook(lambda m, args, n=name: raw[n].append(args[0].detach()))
               for name, layer in layers.items()]
    both = S.collect_statistics(model, [b1, b2])
    for h in handles:
        h.remove()
    masks = [b["attention_mask"].reshape(-1).bool() for b in (b1, b2)]
    inputs = {n: [x.reshape(-1, x.shape[-1])[m].double() for x, m in zip(xs, masks)] for n, xs in raw.items()}
    one, two = S.collect_statistics(model, [b1]), S.collect_statistics(model, [b2])
    for name, e in both["layers"].items():
        assert e["tokens"] == 5 + 16 + 9 + 12  # padding excluded
        assert torch.equal(e["selected"], one["layers"][name]["selected"] + two["layers"][name]["selected"])
        torch.testing.assert_close(e["mass"], one["layers"][name]["mass"] + two["layers"][name]["mass"])
        torch.testing.assert_close(torch.tensor(e["ladder"]), torch.tensor(one["layers"][name]["ladder"])
                                   + torch.tensor(two["layers"][name]["ladder"]))
        assert e["selected"].sum() > 0 and len(e["ladder"]) == 4  # rungs: remove 0..3 of the 4 new experts
    assert all(layer.stats is None and layer.stats_token_mask is None for layer in layers.values())
    banks = {name: (*(t.detach().double().clone() for t in (*layer.bank(), layer.mora_scale)),
                    layer.block_sizes[-1]) for name, layer in layers.items()}
    # a bound inside the measured range, so that some layers prune and others keep experts
    rung1 = sorted(relative_changes(e["ladder"])[1] for e in both["layers"].values())
    decision = P.decide_pruning(both, model, PruneConfig(max_output_change=rung1[len(rung1) // 2], min_keep=1))
    record = json.loads(json.dumps(S.statistics_record(both, decision, "t0")))  # what stats/NN-TASK.json holds
    assert record["decision"]["hash"] == decision["hash"]
    first = next(iter(record["layers"].values()))
    assert first["blocks"][0]["name"] == "t0" and len(first["blocks"][0]["usage"]) == 4
    assert first["blocks"][0]["weight_share"] == pytest.approx(1.0)
    removed = P.apply_pruning(model, decision)
    assert removed == sum(len(v["remove"]) for v in decision["layers"].values()) > 0
    assert any(not v["remove"] for v in decision["layers"].values())
    for name, layer in layers.items():
        entry = decision["layers"][name]
        assert layer.block_sizes == [len(entry["keep"])]
        direct = _direct_change(layer, *banks[name], inputs[name], entry["remove"])
        assert direct <= decision["rule"]["max_output_change"] * (1 + 1e-9)
        assert direct == pytest.approx(entry["output_change"], rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="do not match"):
        P.decide_pruning(both, model, PruneConfig())  # the bank changed since the statistics were taken


def test_expert_summary_separates_routing_from_block_size():
    blocks = [{"name": "t0", "size": 8, "weight_sum": [1.0] * 8}, {"name": "t1", "size": 2, "weight_sum": [4.0, 4.0]}]
    record = {"layers": {f"m.layers.{i}.self_attn.q_proj": {"tokens": 10, "blocks": blocks} for i in range(2)},
              "decision": {"layers": {"m.layers.0.self_attn.q_proj": {"remove": [0, 1, 3], "keep": [2, 4, 5, 6, 7],
                                                                       "output_change": 0.004},
                                      "m.layers.1.self_attn.q_proj": {"remove": [], "keep": list(range(8)),
                                                                       "output_change": 0.0}}}}
    out = S.expert_summary(record)
    assert out["usage"]["q_proj"] == pytest.approx([0.5, 0.5])  # same share of gate weight ...
    assert out["usage_per_expert"]["q_proj"] == pytest.approx([0.0625, 0.25])  # ... 4x more per expert
    assert out["summary"]["experts_pruned"] == 3 and out["summary"]["layers_pruned"] == 1
    assert out["summary"]["output_change_max"] == 0.004 and out["blocks"] == ["t0", "t1"]
