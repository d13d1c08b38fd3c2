"""The sensitivity table: exact one-shot KLs, stored once per database, the start it gives, the plan around it."""

from __future__ import annotations

import pytest

from darwinlm.core.genome import Genome
from darwinlm.core.plan import STOP_KEY, Task, generations_planned, next_tasks, progress
from darwinlm.llm.fitness import TeacherCache, kl_to_teacher
from darwinlm.llm.sensitivity import measure_blocks, sensitivity_chunks
from darwinlm.run.runner import run_search
from darwinlm.spec import load_spec
from darwinlm.store import open_store

from ..conftest import tiny_spec_dict


@pytest.fixture(scope="module")
def ws(tiny_assets, tmp_path_factory):
    spec = load_spec(tiny_spec_dict(tiny_assets, f"file://{tmp_path_factory.mktemp('sens')}",
                                    **{"search.generations": 1, "search.sensitivity.tokens": 256}))
    return run_search(spec, until=lambda t: t.kind == "generation")  # database and sensitivity


def test_every_entry_is_the_kl_of_the_model_with_only_that_layer_pruned(ws):
    """The prefix cache, the level batches and the entropy/logsumexp form of the KL change the cost, not the
    value: each entry equals the KL of a real candidate model built with only that layer pruned."""
    chunks = sensitivity_chunks(ws.pools.calibration, 256)
    table = measure_blocks(ws.model, ws.db, chunks, "float32", range(ws.model.config.num_hidden_layers))
    assert set(table) == set(ws.space.layers)
    teacher = TeacherCache(ws.model, "float32")
    dense = {n: 0 for n in ws.space.layers}
    checked = 0
    for name in ws.space.layers:
        assert len(table[name]) == ws.space.ladders[name].num_levels and table[name][0] == 0.0
        for level in range(1, ws.space.ladders[name].num_levels):
            model = ws.builder.shrunk(Genome.from_dict(ws.space, {**dense, name: level}))
            assert table[name][level] == pytest.approx(kl_to_teacher(model, chunks, teacher, "float32"),
                                                       rel=1e-4, abs=5e-6), (name, level)
            checked += 1
    assert checked == sum(ws.space.ladders[n].max_level for n in ws.space.layers) >= 20
    # removing every unit of a layer costs clearly more than its first level, for every layer
    assert all(table[n][-1] > max(10 * table[n][1], 1e-5) for n in ws.space.layers)


def test_the_stored_table_is_the_measured_one_and_gives_the_start(ws):
    table = ws.sensitivity_table()
    chunks = sensitivity_chunks(ws.pools.calibration, 256)
    again = measure_blocks(ws.model, ws.db, chunks, "float32", range(ws.model.config.num_hidden_layers))
    assert table["layers"] == again and table["tokens"] == 256 and table["dtype"] == "float32"
    parent = ws.initial_parent()
    record = ws.init_record()
    assert record["init"] == "sensitivity" and record["sensitivity"]["key"] == ws.sensitivity_key
    cost = sum(again[n][parent[n]] for n in ws.space.layers)
    uniform = ws.uniform_genome()
    assert record["sensitivity"]["additive_cost"] == pytest.approx(cost)
    assert cost < sum(again[n][uniform[n]] for n in ws.space.layers)  # the DP beats the even spread
    assert parent.level_sums() == uniform.level_sums() and parent != uniform
    assert record["tracking"]["parent"] > 0 and record["tracking"]["uniform"] > 0


def test_sensitivity_chunks_come_from_the_end_of_the_pool(ws):
    pool = ws.pools.calibration
    chunks = sensitivity_chunks(pool, 100)
    assert sum(int(c.numel()) for c in chunks) == 100
    assert chunks[0] is pool.chunks[-1] or bool((chunks[0] == pool.chunks[-1]).all())
    with pytest.raises(ValueError, match="fewer than"):
        sensitivity_chunks(pool, pool.tokens + 1)


class _Store(dict):
    """The plan reads only exists/get_json."""

    def exists(self, key):
        return key in self

    def get_json(self, key):
        return self[key]


def test_plan_orders_sensitivity_after_the_database_and_skips_generations_after_a_stop(tiny_assets):
    spec = load_spec(tiny_spec_dict(tiny_assets, "file:///unused", **{
        "search.generations": 5, "search.sensitivity.shards": 2, "database.shards": 2}))
    store = _Store()
    assert next_tasks(spec, store) == [Task("database", 0, 2), Task("database", 1, 2)]
    store["database/shard-0-of-2.json"] = store["database/shard-1-of-2.json"] = {}
    assert next_tasks(spec, store) == [Task("sensitivity", 0, 2), Task("sensitivity", 1, 2)]
    assert Task.parse("sensitivity-1-of-2") == Task("sensitivity", 1, 2)
    store["sensitivity/shard-0-of-2.json"] = store["sensitivity/shard-1-of-2.json"] = {}
    assert next_tasks(spec, store) == [Task("generation", 0)]
    store["generations/00000/state.json"] = store["generations/00001/state.json"] = {}
    assert next_tasks(spec, store) == [Task("generation", 2)] and generations_planned(spec, store) == 5
    store[STOP_KEY] = {"after": 1}
    assert next_tasks(spec, store) == [Task("posttrain", variant="searched"), Task("posttrain", variant="uniform")]
    assert progress(spec, store) == {"generations_done": 2, "generations": 2, "stopped_early": True,
                                     "complete": False}
    even = load_spec(tiny_spec_dict(tiny_assets, "file:///unused", **{"search.init": "even"}))
    assert next_tasks(even, _Store({"database/shard-0-of-1.json": {}})) == [Task("generation", 0)]


def test_a_second_search_on_the_same_database_reuses_the_table(ws, tiny_assets):
    """Other seed, other target, same database: the table is read, not measured again."""
    root = ws.root.uri
    other = load_spec(tiny_spec_dict(tiny_assets, root, **{
        "name": "other", "seed": 5, "search.target.fraction": 0.3, "search.generations": 1,
        "search.sensitivity.tokens": 256}))
    ws2 = run_search(other, until=lambda t: t.kind == "generation")
    marker = ws2.store.get_json("sensitivity/shard-0-of-1.json")
    assert marker["key"] == ws.sensitivity_key and marker["measured_blocks"] == 0
    first = ws.store.get_json("sensitivity/shard-0-of-1.json")
    assert first["measured_blocks"] == ws.model.config.num_hidden_layers
    assert ws2.sensitivity_table()["layers"] == ws.sensitivity_table()["layers"]
    # a different token count is a different table
    assert open_store(root).exists(f"databases/{ws.db_key}/sensitivity/{ws.sensitivity_key}/table.json")


def test_sigkill_mid_table_resumes_to_the_identical_table(ws, tiny_assets, tmp_path):
    """SIGKILL the CLI while it measures the table (after the first block is stored, before the shard is
    complete); running it again measures only the missing blocks and stores the same table."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    over = {"search.generations": 1, "search.sensitivity.tokens": 2048}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec_dict(tiny_assets, f"file://{tmp_path / 'store'}", **over)))
    cmd = [sys.executable, "-m", "darwinlm.cli", "--log-level", "WARNING", "sensitivity", str(spec_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    root = open_store(f"file://{tmp_path / 'store'}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not [k for k in root.list("databases") if "/sensitivity/" in k and "/blocks/" in k]:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    blocks = [k for k in root.list("databases") if "/sensitivity/" in k and "/blocks/" in k]
    assert not [k for k in root.list("databases") if k.endswith("table.json")], "killed too late to test a resume"
    assert len(blocks) < ws.model.config.num_hidden_layers
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    resumed = load_spec(tiny_spec_dict(tiny_assets, f"file://{tmp_path / 'store'}", **over))
    marker = root.child("searches/tiny").get_json("sensitivity/shard-0-of-1.json")
    assert marker["measured_blocks"] == ws.model.config.num_hidden_layers - len(blocks)  # only the missing ones
    reference = load_spec(tiny_spec_dict(tiny_assets, f"file://{tmp_path / 'reference'}", **over))
    ref_ws = run_search(reference, until=lambda t: t.kind == "generation")
    got_ws = run_search(resumed, until=lambda t: t.kind == "generation")
    assert got_ws.sensitivity_table()["layers"] == ref_ws.sensitivity_table()["layers"]
