"""The token schedule (darwinlm.core.schedule): pool sizes and token counts per stage, warm start."""

from darwinlm.core.schedule import schedule
from darwinlm.spec import load_spec


def _spec(**finetune):
    return load_spec({"name": "s", "model": {"path": "/m"}, "data": {"train": {"path": "/t"}},
                      "search": {"generations": 10, "offspring": 16, "target": {"fraction": 0.5},
                                 "finetune": finetune,
                                 "selection": [{"survivors": 8, "fitness_tokens": 1024, "finetune_tokens": 10000},
                                               {"survivors": 4, "fitness_tokens": 2048, "finetune_tokens": 50000},
                                               {"survivors": 2, "fitness_tokens": 4096, "finetune_tokens": 100000},
                                               {"survivors": 1, "fitness_tokens": 8192, "finetune_tokens": 200000}]}})


def test_the_paper_schedule():
    s = schedule(_spec())
    assert [st["pool"] for st in s["stages"]] == [16, 8, 4, 2 + 1]  # the parent joins the last stage
    per = s["per_generation"]
    assert per["evaluations"] == 31
    assert per["fitness_tokens"] == 16 * 1024 + 8 * 2048 + 4 * 4096 + 3 * 8192
    assert per["finetune_tokens"] == per["trained_tokens"] == 16 * 10000 + 8 * 50000 + 4 * 100000 + 3 * 200000
    assert s["total"]["fitness_tokens"] == 10 * per["fitness_tokens"]


def test_warm_start_trains_only_the_extension_of_survivors():
    per = schedule(_spec(warm_start=True))["per_generation"]
    # survivors continue: 8 x 40K, 4 x 50K, 2 x 100K more; the parent starts cold at the last stage
    assert per["trained_tokens"] == 16 * 10000 + 8 * 40000 + 4 * 50000 + 2 * 100000 + 200000
    assert per["finetune_tokens"] == 16 * 10000 + 8 * 50000 + 4 * 100000 + 3 * 200000
