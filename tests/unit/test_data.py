"""Token pools: disjoint, deterministic, exact budgets; minibatch samplers."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from darwinlm.errors import SpecError
from darwinlm.llm.data import build_pools, sample_at_least, sample_exact
from darwinlm.spec import load_spec

from ..conftest import tiny_spec_dict


@pytest.fixture(scope="module")
def spec_and_tok(tiny_assets, tmp_path_factory):
    spec = load_spec(tiny_spec_dict(tiny_assets, "file://" + str(tmp_path_factory.mktemp("s"))))
    return spec, AutoTokenizer.from_pretrained(tiny_assets / "model")


def test_pools_disjoint_exact_and_deterministic(spec_and_tok):
    spec, tok = spec_and_tok
    a, b = build_pools(spec.data, tok), build_pools(spec.data, tok)
    assert a.calibration.tokens == spec.data.calibration_tokens
    assert a.finetune.tokens == spec.data.finetune_tokens
    assert a.heldout.tokens == spec.data.heldout_tokens
    assert all(c.numel() <= spec.data.seq_len for p in (a.calibration, a.finetune, a.heldout) for c in p.chunks)
    assert a.calibration.digest() == b.calibration.digest() and a.finetune.digest() == b.finetune.digest()
    as_set = lambda p: {tuple(c.tolist()) for c in p.chunks}  # noqa: E731
    assert not as_set(a.calibration) & as_set(a.finetune)
    assert not as_set(a.calibration) & as_set(a.heldout)
    assert not as_set(a.finetune) & as_set(a.heldout)


def test_samplers(spec_and_tok):
    spec, tok = spec_and_tok
    pool = build_pools(spec.data, tok).calibration
    fit = sample_exact(pool, 300, np.random.default_rng(1))
    assert sum(c.numel() for c in fit) == 300
    train = sample_at_least(pool, 300, np.random.default_rng(1))
    assert sum(c.numel() for c in train) >= 300
    assert [c.tolist() for c in sample_exact(pool, 300, np.random.default_rng(1))] == [c.tolist() for c in fit]
    assert sample_at_least(pool, 0, np.random.default_rng(1)) == []
    with pytest.raises(ValueError):
        sample_exact(pool, pool.tokens + 1, np.random.default_rng(0))


def test_too_small_source_names_the_field(spec_and_tok, tiny_assets, tmp_path):
    spec, tok = spec_and_tok
    big = load_spec(tiny_spec_dict(tiny_assets, "file://" + str(tmp_path), **{"data.finetune_tokens": 10**8}))
    with pytest.raises(SpecError) as e:
        build_pools(big.data, tok)
    assert e.value.first_path == "data.finetune_tokens"


def test_text_documents_are_exactly_datasets_documents(spec_and_tok, tmp_path):
    """format: text is read without ``datasets``, and gives exactly its documents (so the pools, their digests
    and every layer database key stay what they were); CRLF files too (universal newlines in both)."""
    datasets = pytest.importorskip("datasets")
    from darwinlm.llm.data import load_documents

    spec, _ = spec_and_tok
    crlf = tmp_path / "crlf"
    crlf.mkdir()
    (crlf / "a.txt").write_bytes("line one\r\nline two é\r\n".encode())
    (crlf / "b.md").write_bytes(b"  \n")  # blank: dropped by both
    for src in (spec.data.train, spec.data.heldout, spec.data.train.__class__(path=str(crlf), format="text")):
        files = sorted(str(p) for p in __import__("pathlib").Path(src.path).rglob("*")
                       if p.suffix in (".txt", ".text", ".md", ".rst"))
        ref = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")["text"]
        assert load_documents(src) == [t for t in ref if t.strip()]


def test_text_corpus_without_datasets(spec_and_tok, monkeypatch):
    """The GPU test machine has no ``datasets``: a text spec's pools build all the same."""
    import sys

    spec, tok = spec_and_tok
    want = build_pools(spec.data, tok)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError):
        import datasets  # noqa: F401
    got = build_pools(spec.data, tok)
    assert got.calibration.digest() == want.calibration.digest()
    assert got.heldout.digest() == want.heldout.digest()
