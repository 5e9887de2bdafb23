"""The ``mora-dist`` command line.

Subcommands:
    run       run or resume a task stream from a config (also: python -m mora_dist run ...)
    compare   run a stream with several methods (mora, seq_lora, olora, moe_lora) and compare them
    status    stages done and pending, current task and step, last metrics of a run directory
    report    rebuild a run directory's report from its stored results
    eval      evaluate a base model plus a saved adapter on tasks of a config and/or a general suite
    demo      train MoRA briefly on a short stream of real tasks, save the adapter, reload it, generate
    generate  greedy generation from a base model plus an optional saved adapter
    validate  print the resolved run config (YAML + overrides) and check every task's data (no model is loaded)
    plan      per-GPU memory of a stream before launch (model shape only, no weights)
"""

from __future__ import annotations

import argparse
import sys


def _cmd_validate(args) -> int:
    from mora_dist.config import dump_config, load_config
    from mora_dist.data.check import check_stream_data

    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    if args.config_only:
        return 0
    loader = None
    if not args.no_tokenizer:
        from functools import partial

        from mora_dist.base_model import load_tokenizer

        loader = partial(load_tokenizer, cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    check = check_stream_data(cfg, loader)  # every file is read before the tokenizer loads
    print(f"# data: every split the run uses reads and checks out\n{check.summary()}", file=sys.stderr)
    return 0


def _cmd_plan(args) -> int:
    import json

    from mora_dist.config import load_config
    from mora_dist.plan import format_plan, plan

    cfg = load_config(args.config, args.overrides)
    result = plan(cfg, args.world_size, args.gpu_memory, seq_len=args.seq_len)
    print(json.dumps(result, indent=1) if args.json else format_plan(result), end="\n" if args.json else "")
    return 0


def _cmd_run(args) -> int:
    from mora_dist.config import load_config
    from mora_dist.run.orchestrator import Limits, run

    cfg = load_config(args.config, args.overrides)
    return run(cfg, Limits(max_stages=args.max_stages, until_task=args.until_task, time_budget=args.time_budget))


def _bootstrap(args):
    from mora_dist.config import ConfigError
    from mora_dist.evaluation.bootstrap import BootstrapSettings

    try:
        return BootstrapSettings(args.resamples, args.confidence, args.ci_seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _cmd_compare(args) -> int:
    from mora_dist.compare import parse_method_overrides, parse_methods, parse_seeds, run_compare

    methods = parse_methods(args.methods)
    return run_compare(args.config, methods, args.overrides, seeds=parse_seeds(args.seeds),
                       bootstrap=_bootstrap(args), collect_only=args.collect_only,
                       method_overrides=parse_method_overrides(args.method_override, methods))


def _cmd_status(args) -> int:
    from mora_dist.run.status import print_status

    return print_status(args.run_dir)


def _cmd_report(args) -> int:
    from mora_dist.evaluation.report import rebuild_report

    rep = rebuild_report(args.run_dir, _bootstrap(args))
    print(f"report written to {args.run_dir}/report: " + ", ".join(
        f"{k}={v:.4f}" for k, v in rep["metrics"].items() if isinstance(v, float)))
    return 0


def _cmd_routing(args) -> int:
    from mora_dist.evaluation.routing import measure_run, write_routing

    result = measure_run(args.run_dir, examples=args.examples, batch_size=args.batch_size, final_only=args.final,
                         tokens=args.tokens)
    out = args.output or f"{args.run_dir}/routing" + ("" if args.tokens == "all" else "-last")
    write_routing(result, out)
    for row in result["separation"]["mass"]:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"{row['stage']}: new block's share of the output on its own task {row['own']:.3f}, on earlier tasks "
              f"{row['earlier']:.3f} (ratio {ratio})")
    print(f"routing written to {out}/routing.md")
    return 0


def _cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from mora_dist.config import load_config
    from mora_dist.evaluation.results import build_stage_results
    from mora_dist.evaluation.tasks import evaluate_tasks
    from mora_dist.inference import load_for_inference
    from mora_dist.io import atomic_write_json

    cfg = load_config(args.config, args.overrides) if args.config else None
    model_name = args.model or (cfg.model.name if cfg else "smollm2-135m-instruct")
    model, tok = load_for_inference(model_name, args.adapter, dtype=cfg.model.dtype if cfg else "float32")
    in_domain = {}
    if cfg is not None:
        wanted = set(args.tasks.split(",")) if args.tasks else None
        in_domain = evaluate_tasks(model, tok, cfg, [t for t in cfg.tasks if not wanted or t.name in wanted])
        for name, res in in_domain.items():
            print(f"{name}: {res.metric} = {res.score:.4f}")
    general = None
    suite = args.general.split(",") if args.general else (cfg.eval.general if cfg else [])
    if suite:
        from mora_dist.evaluation.suite import run_general_suite

        general = run_general_suite(model, tok, suite, limit=args.limit or (cfg.eval.general_limit if cfg else None))
        for name, res in general["results"].items():
            print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in res.items() if isinstance(v, float)))
    result = build_stage_results(0, None, in_domain, general, config={"model": model_name, "adapter": args.adapter})
    if args.output:
        atomic_write_json(Path(args.output), result)
        print(f"results written to {args.output}")
    else:
        print(json.dumps(result.get("results", {}), indent=2, default=str))
    return 0


def _cmd_generate(args) -> int:
    from mora_dist.inference import generate, load_for_inference

    model, tok = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    for prompt, answer in zip(args.prompt, generate(model, tok, args.prompt, args.max_new_tokens,
                                                     chat_template=not args.plain,
                                                     system_prompt=args.system_prompt)):
        print(f">>> {prompt}\n{answer}\n")
    return 0


def _cmd_prepare_model(args) -> int:
    from mora_dist.base_model import converted_dir, local_source, resolve_model

    src = local_source(args.model)
    if converted_dir(resolve_model(args.model)) is None:
        print(f"{args.model}: loaded from {src.directory} as it is (not a GGUF file, or MORA_MODEL_CACHE=off)")
    else:
        print(f"{args.model}: converted model and tokenizer in {src.directory}")
    return 0


def _cmd_demo(args) -> int:
    from mora_dist.demo import run_demo

    run_demo(model=args.model, data_root=args.data_root, tasks=args.tasks.split(","), steps=args.steps,
             out=args.out, examples=args.examples, lr=args.lr, max_length=args.max_length)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mora-dist", description="Distributed continual training with MoRA.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run or resume a task stream")
    r.add_argument("config", help="YAML run config (see configs/)")
    r.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    r.add_argument("--max-stages", type=int, default=None, help="do at most N stages, then exit 0")
    r.add_argument("--until-task", default=None, help="stop once this task is done")
    r.add_argument("--time-budget", type=float, default=None,
                   help="seconds; checkpoint and exit 0 before this wall-clock budget is spent")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("compare", help="run the stream with several methods in sibling run directories "
                                       "(<run_dir>-<method>, resumable) and write <run_dir>-compare/")
    c.add_argument("config", help="YAML run config (see configs/)")
    c.add_argument("overrides", nargs="*", help="key.sub=value overrides shared by every method")
    c.add_argument("--methods", default="mora,seq_lora,olora,moe_lora",
                   help="comma-separated: mora, seq_lora, olora, moe_lora, mora_noprune")
    c.add_argument("--seeds", default=None,
                   help="comma-separated training seeds (train.seed): one run per method and seed in "
                        "<run_dir>-<method>-seed<S>, reported as mean ± spread over seeds")
    c.add_argument("--method-override", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="one method's own setting on top of the shared config and overrides, e.g. its own tuned "
                        "learning rate: --method-override mora:train.lr=2e-3 (repeatable)")
    c.add_argument("--collect-only", action="store_true",
                   help="run nothing: write the comparison from the methods' finished run directories (e.g. each "
                        "method run as its own job with --methods <one>)")
    _bootstrap_options(c)
    c.set_defaults(func=_cmd_compare)

    s = sub.add_parser("status", help="show the progress of a run directory")
    s.add_argument("run_dir")
    s.set_defaults(func=_cmd_status)

    rp = sub.add_parser("report", help="rebuild the report of a run directory from stored results")
    rp.add_argument("run_dir")
    _bootstrap_options(rp)
    rp.set_defaults(func=_cmd_report)

    ro = sub.add_parser("routing", help="how each stage's gate routes every seen task's evaluation prompts over "
                                        "the blocks (task separation), written to RUN_DIR/routing/")
    ro.add_argument("run_dir")
    ro.add_argument("--examples", type=int, default=20, help="stored evaluation prompts per task")
    ro.add_argument("--batch-size", type=int, default=8)
    ro.add_argument("--final", action="store_true", help="only the last stage's adapter")
    ro.add_argument("--tokens", choices=("all", "last"), default="all",
                    help="count every prompt token, or only each prompt's last (where the answer starts)")
    ro.add_argument("--output", default=None, help="output folder (default: RUN_DIR/routing, or RUN_DIR/"
                                                   "routing-last with --tokens last)")
    ro.set_defaults(func=_cmd_routing)

    e = sub.add_parser("eval", help="evaluate a model (plus an adapter) on a config's tasks and/or a general suite")
    e.add_argument("--config", default=None, help="run config whose tasks and eval settings to use")
    e.add_argument("--model", default=None, help="base model (default: the config's, or smollm2-135m-instruct)")
    e.add_argument("--adapter", default=None, help="adapter folder, e.g. RUN_DIR/adapters/02-arc_easy")
    e.add_argument("--tasks", default=None, help="comma-separated subset of the config's tasks")
    e.add_argument("--general", default=None, help="comma-separated lm-eval tasks (local: local_arc_easy, ...)")
    e.add_argument("--limit", type=int, default=None, help="documents per general task")
    e.add_argument("--output", default=None, help="write lm-eval-style results JSON here")
    e.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    e.set_defaults(func=_cmd_eval)

    v = sub.add_parser("validate", help="print the resolved run config and check every task's data")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    v.add_argument("--config-only", action="store_true", help="only resolve and print the config")
    v.add_argument("--no-tokenizer", action="store_true",
                   help="skip the answer-length check (it loads the tokenizer, never the model)")
    v.set_defaults(func=_cmd_validate)

    pl = sub.add_parser("plan", help="per-GPU memory of a stream before launch, per component and task")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help="key.sub=value overrides (model.name: a folder or a shape preset)")
    pl.add_argument("--world-size", type=int, default=1, help="data-parallel workers (GPUs)")
    pl.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU: say whether it fits, and how")
    pl.add_argument("--seq-len", type=int, default=None, help="tokens per example (default: model.max_length)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_cmd_plan)

    g = sub.add_parser("generate", help="greedy generation with a base model and an optional adapter")
    g.add_argument("--model", default="smollm2-135m-instruct", help="local folder, .gguf file or packaged name")
    g.add_argument("--adapter", default=None, help="adapter folder written by a run or the demo")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--plain", action="store_true", help="do not apply the chat template")
    g.add_argument("--system-prompt", default=None,
                   help="system turn of the chat template (the run's model.system_prompt; default: the template's)")
    g.add_argument("prompt", nargs="+")
    g.set_defaults(func=_cmd_generate)

    pm = sub.add_parser("prepare-model", help="convert a GGUF model once into the local cache (a set-up step: "
                                              "later loads read the converted copy)")
    pm.add_argument("model", nargs="?", default="smollm2-135m-instruct",
                    help="local folder, .gguf file or packaged name")
    pm.set_defaults(func=_cmd_prepare_model)

    d = sub.add_parser("demo", help="train MoRA on a short real task stream, then generate")
    d.add_argument("--model", default="smollm2-135m-instruct")
    d.add_argument("--data-root", default=None, help="folder of TRACE-style tasks (default: ../shared/data/"
                                                    "llm-cl-benchmark-500 or $MORA_DATA_ROOT)")
    d.add_argument("--tasks", default="FOMC,NumGLUE-cm", help="comma-separated TRACE task folders")
    d.add_argument("--steps", type=int, default=30, help="optimizer steps per task")
    d.add_argument("--examples", type=int, default=200, help="training examples per task")
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--max-length", type=int, default=256)
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(func=_cmd_demo)
    return p


def _bootstrap_options(parser) -> None:
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the test examples")
    parser.add_argument("--confidence", type=float, default=0.95, help="coverage of the confidence intervals")
    parser.add_argument("--ci-seed", type=int, default=0, help="seed of the bootstrap resampling")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides given after an option are left over by argparse: take them as overrides
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    from mora_dist.config import ConfigError
    from mora_dist.data import DataError
    from mora_dist.base_model import ModelSourceError
    from mora_dist.mora.adapter import AdapterError
    from mora_dist.mora.config import MoRAConfigError
    from mora_dist.distributed.env import DistributedEnvError, finish
    from mora_dist.model_shapes import ShapeError
    from mora_dist.run.state import RunStateError

    try:
        code = args.func(args)
    except (ConfigError, DataError, ModelSourceError, AdapterError, MoRAConfigError, RunStateError,
            DistributedEnvError, ShapeError) as err:
        print(f"mora-dist: error: {err}", file=sys.stderr)
        code = 2
    return finish(code)


if __name__ == "__main__":
    sys.exit(main())
