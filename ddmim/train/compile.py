"""torch.compile with a fallback: a model whose compilation fails keeps training eagerly, with one message."""
from __future__ import annotations

import sys

import torch


def compiled_or_eager(fn):
    compiled = torch.compile(fn)
    state = {"fn": compiled}

    def call(*args, **kwargs):
        if state["fn"] is fn:
            return fn(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # compilation errors surface at the first call, of many types
            print(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                  "continuing without compilation", file=sys.stderr)
            state["fn"] = fn
            return fn(*args, **kwargs)

    return call
