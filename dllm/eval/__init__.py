"""Evaluation: the lm-eval adapter (``dllm.eval.lm``, registered as ``dllm``), the runner
behind ``run.py task=<task>`` (``dllm.eval.runner``) and bundled task YAMLs (``tasks/``)."""
