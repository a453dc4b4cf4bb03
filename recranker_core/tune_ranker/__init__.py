"""The tune_ranker stage (flows/tune_ranker.py, tasks/tune_ranker.py): LoRA instruction tuning of
the ranker on the champion base model's data, gated against the champion adapter.

Modules, in the order of a run: context (settings and profiles, the champion and its split,
hints), sampling (which users), served_data (training data on the served task), dataset
(instruction data, the validation set and its Validator), batches and packing (examples
tokenized and batched), objectives (the ALRO and DMPO loss math), losses (a loss per objective),
loop (the tuning loop: checkpoints, early stopping), run (`run_tuning`), adapter (publish, fetch
and gate the adapter); experiment (the objectives experiment's comparison)."""
