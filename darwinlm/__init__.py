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
