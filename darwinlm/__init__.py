"""darwinlm: DarwinLM (arXiv 2502.07780) training-aware evolutionary structured pruning.

Importing the package arranges for the ``darwinlm_llama`` model type to be registered with
transformers' Auto classes as soon as transformers is (or already was) imported, so an exported,
physically shrunk model loads with stock ``AutoModelForCausalLM.from_pretrained(dir)`` and no
``trust_remote_code``. The registration is a post-import hook (wrapt) rather than an eager import:
the Kubernetes operator imports ``darwinlm.spec``/``plan``/``store`` and must never load torch.
"""

import os as _os

import wrapt as _wrapt

# PyTorch's CPU allocator backs large tensors with transparent huge pages (2 MiB-aligned, madvise) when
# THP_MEM_ALLOC_ENABLE=1. It reads the variable once, at its first allocation, so it is set here, before any
# darwinlm module imports torch. Each search candidate allocates fresh weights, gradients and AdamW state
# (~1 GB for SmolLM2); with 4 KiB pages the page faults were ~12% of a generation on CPU, and the fast
# evaluator path runs 1.13x faster with huge pages (bench/README.md, evaluator). THP_MEM_ALLOC_ENABLE=0 in
# the environment turns it off.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# OpenMP threads that wait sleep at once instead of spinning. torch runs one OpenMP thread per core, and its
# threads wait for each other at the end of every parallel region; libgomp's default is to spin first
# (GOMP_SPINCOUNT 300,000). When another process takes one of the cores, the spinning thread burns the time
# slice its descheduled partner needs: one busy single-threaded neighbour made a quick-example generation
# several times slower (bench/README.md, busy-neighbour). libgomp reads this when torch loads it, so it is set
# here, before any darwinlm module imports torch (it has no effect when torch was imported first). Setting
# OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment overrides it (GOMP_SPINCOUNT=300000: the old default).
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from .version import __version__  # noqa: E402


def _register_model_type(_transformers_module) -> None:
    from .llm.modeling import register

    register()


_wrapt.register_post_import_hook(_register_model_type, "transformers")

# The public API. None of these imports torch: the operator may import the package.
from .core.plan import Task, next_tasks  # noqa: E402
from .errors import ArtifactNotFound, DarwinLMError, InfeasibleTargetError, SpecError, StoreError  # noqa: E402
from .run.runner import run_search  # noqa: E402
from .spec import PruningSearchSpec, load_spec, spec_to_dict, with_overrides  # noqa: E402
from .store import open_store  # noqa: E402

__all__ = [
    "__version__", "ArtifactNotFound", "DarwinLMError", "InfeasibleTargetError", "SpecError", "StoreError",
    "Task", "next_tasks", "run_search", "PruningSearchSpec", "load_spec", "spec_to_dict", "with_overrides",
    "open_store",
]
