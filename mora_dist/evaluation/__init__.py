"""Evaluation layer: in-domain metrics and generation, the lm-eval general suite, results files and reports.

Modules: ``metrics`` (per-task metrics, ``METRICS`` registry), ``forgetting`` (AP/BWT/FWT/forgetting over the
``T+1``-row score matrix), ``generation`` (batched greedy ``evaluate_task``), ``lm_eval_adapter`` (an lm-eval
``TemplateLM`` around a live model), ``suite`` (local general-capability task configs in ``mora_dist/evals/``,
``run_general_suite``), ``results`` (per-stage results JSON in lm-eval's layout) and ``report`` (report.json,
report.md and figures). Submodules are imported lazily so that ``import mora_dist.evaluation`` stays cheap.
"""
