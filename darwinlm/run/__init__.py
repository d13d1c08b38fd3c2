"""Running a search: the task implementations over the store, and the loops that drive them.

* ``workspace.py``: the lazily loaded shared state of one search (model, pools, database, evaluator);
* ``tasks.py``: ``run_task(ws, task)``, the one implementation of every task kind (embedded and in pods);
* ``search.py``: one generation (candidates built, fine-tuned, scored, persisted);
* ``export.py``, ``report.py``: the exported model; evaluation, ``report.md`` and ``fitness.png``;
* ``runner.py``: ``run_search`` and ``run_phase`` (the embedded loops over the plan) and ``run_tasks`` (named
  tasks: ``darwinlm task`` and the Kubernetes jobs). Importing it loads no torch: it imports the rest of
  this package when a run starts.
"""
