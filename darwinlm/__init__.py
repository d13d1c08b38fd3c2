"""darwinlm: DarwinLM (arXiv 2502.07780) training-aware evolutionary structured pruning.

Importing the package registers the ``darwinlm_llama`` model type with transformers' Auto classes
(when transformers is installed), so an exported, physically shrunk model loads with stock
``AutoModelForCausalLM.from_pretrained(dir)`` and no ``trust_remote_code``.
"""

__version__ = "0.1.0"
