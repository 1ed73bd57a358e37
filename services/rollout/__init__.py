"""Rollout generation: one backend interface, a Hugging Face backend and the Ray actor."""
