"""The general-capability suite's local lm-eval tasks, shipped inside the package (see README.md beside this file).

``TASKS_DIR`` is the folder of task YAMLs (and of ``olmo_local.py``, the loader they name), for lm-eval's
``include_path``; it is part of every install, editable or not.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
