"""Rollout generation: the backend interface and registry, the Hugging Face and vLLM backends,
the worker actor and the elastic pool of workers and reward scorers."""
