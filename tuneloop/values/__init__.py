"""Plain values: params' sections and their defaults, decisions, errors, labels, a project's paths, PII masks.

Nothing here imports another floor; numpy (labels) and `regex` (config's time-boxed
patterns) are the only libraries beside the standard library.
"""
