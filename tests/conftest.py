import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite compiles CPU decode graphs with inductor (users get FX there: backend.runs_as_fx), so the
# compiled == eager properties keep checking inductor's handling of the ShadowKV ops on this machine
os.environ.setdefault("SHADOWKV_CPU_INDUCTOR", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Before anything imports triton.language: its standard-library helpers (tl.max, tl.sum, ...) are
# jit functions, and the interpreter can only call them if they were made under TRITON_INTERPRET.
# Another module (inductor, a test) importing triton first would break every interpreted kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import Phase, settings  # noqa: E402

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None)
# the oldest supported transformers re-runs the core tests with fewer examples each (scripts/test.sh)
settings.register_profile("oldest", max_examples=3, deadline=None, derandomize=True, print_blob=True)
# mutation testing (scripts/mutants.py): only the explicit @examples, the known-hard cases, once each
settings.register_profile("mutants", phases=[Phase.explicit], deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# a mutation-testing session (scripts/mutants.py) runs the whole test session with one planted bug
if os.environ.get("SHADOWKV_MUTANT"):
    from tests import mutants  # noqa: E402

    mutants.apply(os.environ["SHADOWKV_MUTANT"])
# one thread per xdist worker (scripts/test.sh runs two on the two cores), else two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every optimized model adds graphs to dynamo's per-code-object cache; start each test clean."""
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (exported once from the GGUF on a fresh machine)."""
    transformers = pytest.importorskip("transformers")
    from shadowkv_fx import smollm2

    if not (smollm2.CACHE_DIR / "model.safetensors").exists():
        try:
            smollm2.load_smollm2()
        except FileNotFoundError as err:
            pytest.skip(f"SmolLM2 not available: {err}")
    return transformers.AutoTokenizer.from_pretrained(smollm2.CACHE_DIR)
