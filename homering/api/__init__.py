"""User-facing front ends: the terminal chat and one-shot prompts."""
