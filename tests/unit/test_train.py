"""Fine-tuning: no revival of pruned structures, shrink == mask, fp32 masters, resumable post-training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from darwinlm.llm.shrink import expand_to_dense
from darwinlm.llm.train import finetune, posttrain
from darwinlm.run.runner import run_search
from darwinlm.run.search import Evaluator
from darwinlm.spec import load_spec, with_overrides

from ..conftest import tiny_spec_dict


@pytest.fixture(scope="module")
def ws(tiny_assets, tmp_path_factory):
    spec = load_spec(tiny_spec_dict(tiny_assets, f"file://{tmp_path_factory.mktemp('t')}",
                                    **{"search.generations": 1}))
    return run_search(spec, until=lambda t: t.kind == "generation")  # database only


def _genome(ws):
    from darwinlm.core.mutation import mutate
    from darwinlm.core.rng import derive_rng

    return mutate(ws.uniform_genome(), ws.space, derive_rng(0, "test"))


def _removed_columns_are_zero(ws, dense_weights, genome):
    for name in ws.space.layers:
        kept = set(ws.db.kept_units(name, genome[name]))
        group = ws.db.manifest["layers"][name]["group_size"]
        W = dense_weights[name]
        for unit in range(ws.db.ladders[name].units):
            cols = W[:, unit * group:(unit + 1) * group]
            assert (unit in kept) or torch.count_nonzero(cols) == 0, (name, unit)


def test_no_revival_mask_mode(ws):
    genome = _genome(ws)
    model, mask = ws.builder.masked(genome)
    chunks = list(ws.pools.finetune.chunks[:4])
    ft = with_overrides(ws.spec, **{"search.finetune.lr": 1e-2, "search.finetune.mode": "mask"}).search.finetune
    finetune(model, chunks, ft, "float32", mask=mask)
    mask.remove()
    from darwinlm.llm.adapter import adapter_for

    ad = adapter_for(model)
    dense = {}
    for i in range(ad.num_layers):
        dense[ad.attn_name(i)] = ad.o_proj(model, i).weight.detach()
        dense[ad.mlp_name(i)] = ad.down_proj(model, i).weight.detach()
    _removed_columns_are_zero(ws, dense, genome)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_no_revival_shrink_mode(ws):
    genome = _genome(ws)
    model = ws.builder.shrunk(genome)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ft = with_overrides(ws.spec, **{"search.finetune.lr": 1e-2}).search.finetune
    finetune(model, list(ws.pools.finetune.chunks[:4]), ft, "float32")
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it did train
    _removed_columns_are_zero(ws, expand_to_dense(model, ws.model.config), genome)


def test_shrink_and_mask_give_the_same_fitness(ws):
    """Same math, two layouts: with weight decay 0 the trained kept weights are identical."""
    genome = _genome(ws)
    fit = list(ws.pools.calibration.chunks[:3])
    train = list(ws.pools.finetune.chunks[:3])
    scores = {}
    for mode in ("shrink", "mask"):
        spec = with_overrides(ws.spec, **{"search.finetune.mode": mode, "search.finetune.lr": 1e-3})
        ev = Evaluator(ws.builder, ws.teacher, spec.search, "float32")
        scores[mode] = ev(genome, train, fit)
    assert scores["shrink"] == pytest.approx(scores["mask"], rel=1e-4, abs=1e-7)


def test_posttrain_resume_is_exact(ws):
    genome = ws.uniform_genome()
    pt = with_overrides(ws.spec, **{"posttrain.tokens": 512, "posttrain.checkpoint_every": 2}).posttrain
    full = ws.builder.shrunk(genome)
    posttrain(full, ws.pools.finetune, pt, "float32", np.random.default_rng(0))

    class Boom(Exception):
        pass

    def crash_at(step, steps, loss):
        if step == 3:
            raise Boom

    store = ws.store.child("test-posttrain")
    part = ws.builder.shrunk(genome)
    with pytest.raises(Boom):
        posttrain(part, ws.pools.finetune, pt, "float32", np.random.default_rng(0), store=store, prefix="p",
                  progress=crash_at)
    assert store.get_json("p/checkpoint.json")["step"] == 2
    resumed = ws.builder.shrunk(genome)
    posttrain(resumed, ws.pools.finetune, pt, "float32", np.random.default_rng(0), store=store, prefix="p")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)


def test_a_torn_checkpoint_trains_again_from_the_start(ws, caplog):
    """Killed between a checkpoint's weights (step 4) and its meta (still step 2): the pair is torn, and
    resuming from it would load step-4 weights as step 2. Post-training starts over instead (found by
    the crash matrix's slow tier), and gives the uninterrupted result."""
    genome = ws.uniform_genome()
    pt = with_overrides(ws.spec, **{"posttrain.tokens": 512, "posttrain.checkpoint_every": 2}).posttrain
    full = ws.builder.shrunk(genome)
    steps = len(posttrain(full, ws.pools.finetune, pt, "float32", np.random.default_rng(0)))
    store = ws.store.child("test-torn")
    part = ws.builder.shrunk(genome)
    seen = {}

    def remember(step, steps, loss):  # called before the step's checkpoint: at 3, step 2's meta is there
        if step == 3:
            seen["meta"] = store.get_bytes("p/checkpoint.json")

    posttrain(part, ws.pools.finetune, pt, "float32", np.random.default_rng(0), store=store, prefix="p",
              progress=remember)
    store.put_bytes("p/checkpoint.json", seen["meta"])  # the meta of step 2 beside the final weights
    resumed = ws.builder.shrunk(genome)
    losses = posttrain(resumed, ws.pools.finetune, pt, "float32", np.random.default_rng(0), store=store, prefix="p")
    assert "torn checkpoint" in caplog.text and len(losses) == steps  # every step again
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
