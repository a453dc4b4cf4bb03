"""The LLM layer every ranker stage shares: the backbone, the prompts and their scoring.

Modules: backbone (fetch, load and verify the backbone; answer token ids), tiny (a tiny
random-weight Llama for tests and the demo), prompts (the Prompt and Catalog types, the
templates' vocabulary, shared helpers), layouts (the wording of templates rr-1, rr-2, rr-3),
builders (training and inference prompts), render (a prompt in the chat template; the
verbalizer's token ids), score (verbalizer scoring without generation). It imports no stage."""
