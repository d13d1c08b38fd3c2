"""darwinlm: DarwinLM (arXiv 2502.07780) training-aware evolutionary structured pruning.

Importing the package arranges for the ``darwinlm_llama`` model type to be registered with
transformers' Auto classes as soon as transformers is (or already was) imported, so an exported,
physically shrunk model loads with stock ``AutoModelForCausalLM.from_pretrained(dir)`` and no
``trust_remote_code``. The registration is a post-import hook (wrapt) rather than an eager import:
the Kubernetes operator imports ``darwinlm.spec``/``plan``/``store`` and must never load torch.
"""

import wrapt as _wrapt

__version__ = "0.1.0"


def _register_model_type(_transformers_module) -> None:
    from .modeling import register

    register()


_wrapt.register_post_import_hook(_register_model_type, "transformers")

# The public API. None of these imports torch: the operator may import the package.
from .errors import ArtifactNotFound, DarwinLMError, InfeasibleTargetError, SpecError, StoreError  # noqa: E402
from .plan import Task, next_tasks  # noqa: E402
from .runner import run_search  # noqa: E402
from .spec import PruningSearchSpec, load_spec, spec_to_dict, with_overrides  # noqa: E402
from .store import open_store  # noqa: E402

__all__ = [
    "__version__", "ArtifactNotFound", "DarwinLMError", "InfeasibleTargetError", "SpecError", "StoreError",
    "Task", "next_tasks", "run_search", "PruningSearchSpec", "load_spec", "spec_to_dict", "with_overrides",
    "open_store",
]
