"""The evaluate_ranker stage (flows/evaluate_ranker.py, tasks/evaluate_ranker.py): the
docs/METHOD.md table for the champion base model and adapter.

Modules: evaluate (the evaluation table with intervals and the guard's decision), report (the
table, the HTML report with plots, the stored evaluation), bias (the listwise task's position
bias)."""
