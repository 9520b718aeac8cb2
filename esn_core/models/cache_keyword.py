"""The keyword under which a transformers module takes its KV cache.

transformers renamed ``past_key_values`` to ``cache`` (5.2x); the old name is still accepted
with a deprecation warning until 5.40. The lent GPU hosts run 5.17, which knows only the old
name, so callers ask the module's own signature instead of pinning either.
"""

from __future__ import annotations

import inspect


def cache_keyword(module) -> str:
    """``"cache"`` if ``module``'s forward takes it, else ``"past_key_values"``.

    ``module`` is a module, a module class or a forward function; a wrapper that sets
    ``__wrapped__`` is asked through what it wraps. Called once a generation, not a step.
    """
    target = inspect.unwrap(module)
    forward = getattr(target, "forward", target)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
