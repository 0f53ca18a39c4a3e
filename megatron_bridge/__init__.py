"""Canonical <-> Megatron: parameter names, split rules, checkpoint formats, the CPU runtime, verification.

megatron-core announces at import time, once per module, that Transformer Engine and Apex are missing and that it
falls back to its local implementations. On a CPU machine that is the expected set-up, not news, and the notices
would be the first thing a user sees from `inspect` or `convert`; only those exact notices are filtered here (any
other warning still shows). With Transformer Engine or Apex installed megatron-core does not emit them at all.
"""
import warnings

for _notice in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                r"Transformer Engine is not installed"):
    warnings.filterwarnings("ignore", message=_notice, category=UserWarning)
