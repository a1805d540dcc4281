"""What differs between the transformers versions we support, in one place.

transformers 5.24 renamed the cache argument and output field ``past_key_values`` -> ``cache``
(the old name is deprecated: "removed in 5.40.0" for ``forward``, "6.0.0" for ``generate``) and
calls ``cache.update(key, value, layer_idx, kwargs=...)``. We accept both spellings from users
and use the installed version's own spelling in our calls, so we cause no deprecation warning.
"""
from __future__ import annotations

import functools
import warnings

from packaging.version import Version
from transformers.modeling_outputs import CausalLMOutputWithPast

# The versions CI runs (.ci/run): the oldest and the newest. pyproject's bounds name the same two.
TESTED_TRANSFORMERS = ("5.17.0", "5.24.0")

CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_ARGS = ("cache", "past_key_values")


def pop_cache(kwargs: dict):
    """Remove the cache from ``kwargs`` whichever name the caller used; refuse both at once."""
    given = {name: kwargs.pop(name) for name in CACHE_ARGS if name in kwargs}
    present = {name: value for name, value in given.items() if value is not None}
    if len(present) > 1:
        raise ValueError("pass the cache once, as cache= (or past_key_values= on transformers < 5.24), not both")
    return next(iter(present.values()), None)


def output_cache(output):
    """The cache a ``generate(..., return_dict_in_generate=True)`` or forward output carries:
    ``output.cache`` on transformers >= 5.24, ``output.past_key_values`` before."""
    for name in CACHE_ARGS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def set_output_cache(output, cache) -> None:
    output[CACHE_ARG] = cache


@functools.cache
def warn_if_untested() -> bool:
    """Warn once when the installed transformers is outside the range CI runs; True if it is."""
    import transformers  # the module as it is now in sys.modules (tests swap it)

    installed = Version(transformers.__version__)
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    if low <= installed <= high:
        return False
    warnings.warn(
        f"shadowkv-fx is tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}; "
        f"{transformers.__version__} is installed. Install a tested version "
        f"(pip install 'transformers>={low},<={high}') or widen the range as docs/design.md's "
        "'Supported transformers versions' section says.",
        stacklevel=3,
    )
    return True
