"""The orchestrator: a run directory as a resumable state machine over a task stream (docs/design.md,
The run directory)."""
