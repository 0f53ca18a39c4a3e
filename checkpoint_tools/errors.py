"""The project's one error type for bad input on disk.

`CheckpointError` is a `ValueError`, so the command line reports it as one line (exit code 2) like any other bad
input; its message names the file and what to do. Every reader (safetensors, torch pickles, torch_dist indexes,
rank folders, sidecars) raises it, whichever package it lives in.
"""


class CheckpointError(ValueError):
    """A checkpoint on disk is incomplete, damaged, untrusted or inconsistent; the message names the file and the
    fix."""
