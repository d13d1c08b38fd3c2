#!/usr/bin/env python
"""Tokens per second of the pruned GGUF against the dense GGUF in llama.cpp, on this machine's CPU.

The speedup where users run small models. Two GGUF files of the same tensor type, loaded side by side in
one process through llama-cpp-python (the llama.cpp that scripts/setup.sh builds):

  dense    the dense source model (``model.path`` of the search's spec), written by the same exporter
           (``darwinlm.llm.gguf_export``, architecture ``deci``) into ``--work``;
  pruned   the search's GGUF export, ``result/gguf/model-<type>.gguf`` (``darwinlm export SPEC --format gguf``).

Two measurements per model on the same tokens (held-out Brown text, the search's tokenizer):

* ``prompt``: one ``eval`` of ``--prompt`` tokens from an empty cache (prompt processing, batched);
* ``generation``: ``--gen`` single-token ``eval`` calls after that prompt, each with the KV cache (what a
  chat user waits for). The tokens are the text's continuation, not samples, so both models do the same
  work; logits are computed for each token exactly as in generation.

Times are wall-clock around the Python calls, so they include llama-cpp-python's per-call work (a fixed
cost per token that does not shrink with the model and pulls the generation ratio toward 1). "paired" is
the median of the per-repetition ratios, less sensitive to load drifting between repetitions.

Same thread count for both (``--threads``, default 1: the least disturbed by other jobs on a shared
machine). Repetitions are interleaved ABBA (dense, pruned, pruned, dense, ...) and the medians are
reported; the speedup is the ratio of medians. Beside it, the ideal speedup from parameter counts: the
weights every token multiplies by, i.e. the decoder's linear layers plus the LM head (the tied 576 x 49152
matrix for SmolLM2, which pruning never touches), dense / pruned. ``model`` counts the pruned model's own
weights, ``file`` the GGUF's (with the KV heads duplicated and zero heads added for uniform groups, see
``export.json``'s ``duplication``). Both ignore attention-score work and element-wise work, which do not
shrink in proportion, so a real speedup sits a little under the ideal.

    .venv/bin/python bench/gguf_speed.py --spec examples/smollm2-quick.yaml --type f16
    .venv/bin/python bench/gguf_speed.py --spec examples/smollm2-quick.yaml --store file:///tmp/q --type q8_0 --json
    .venv/bin/python bench/gguf_speed.py --hf runs/searches/smollm2-quick/result/model --type q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gguf  # noqa: E402

from darwinlm.spec import load_spec, with_overrides  # noqa: E402
from darwinlm.store import layout, open_store  # noqa: E402


def per_token_weights(path: Path) -> int:
    """Elements of the 2-D matrices a token is multiplied by: every block's linears and the LM head."""
    reader = gguf.GGUFReader(path)
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    total = sum(s[0] * s[1] for n, s in shapes.items() if n.startswith("blk.") and len(s) == 2)
    head = shapes.get("output.weight", shapes["token_embd.weight"])  # tied: the embedding is the LM head
    return total + head[0] * head[1]


def dense_gguf(spec, gguf_type: str, work: Path) -> Path:
    """The dense model as a GGUF of ``gguf_type``, written into ``work`` (every run: the exporter may change)."""
    out = work / f"dense-{gguf_type}.gguf"
    from darwinlm.llm.gguf_export import write_gguf
    from darwinlm.llm.runtime import load_model
    from darwinlm.run.export import gguf_tokenizer

    model, _ = load_model(spec.model)
    work.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    write_gguf(model.eval(), tmp, gguf_type=gguf_type, tokenizer=gguf_tokenizer(spec), name="dense")
    tmp.rename(out)
    return out


def hf_gguf(spec, model_dir: Path, gguf_type: str, work: Path) -> tuple[Path, dict]:
    """A darwinlm HF export written as a GGUF of ``gguf_type`` into ``work`` (with what it cost)."""
    import torch
    from transformers import AutoModelForCausalLM

    import darwinlm  # noqa: F401  (registers darwinlm_llama)
    from darwinlm.llm.gguf_export import write_gguf
    from darwinlm.run.export import gguf_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"pruned-{gguf_type}.gguf"
    return out, write_gguf(model, out, gguf_type=gguf_type, tokenizer=gguf_tokenizer(spec), name="pruned")


def heldout_tokens(spec, n: int) -> list[int]:
    from transformers import AutoTokenizer

    from darwinlm.llm.data import load_documents

    tok = AutoTokenizer.from_pretrained(os.path.expanduser(spec.model.path))
    ids: list[int] = []
    for doc in load_documents(spec.data.heldout or spec.data.train, "data.heldout"):
        ids += tok(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the held-out text has only {len(ids)} tokens, {n} needed")


def measure(llm, prompt: list[int], gen: list[int]) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) of one repetition."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for tok in gen:
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), len(gen) / (t2 - t1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(REPO / "examples" / "smollm2-quick.yaml"), help="the search's spec")
    p.add_argument("--store", help="the store the search ran in (default: the spec's)")
    p.add_argument("--type", default="f16", dest="gguf_type", help="GGUF type of both files (f16, q8_0, ...)")
    p.add_argument("--pruned", help="a pruned GGUF file instead of the search's export")
    p.add_argument("--hf", help="a darwinlm HF export directory (result/model/) instead of the search's GGUF: "
                                "written as GGUF by the same exporter into --work first")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "darwinlm" / "bench"),
                   help="where the GGUF files are written")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--gen", type=int, default=64, help="generated tokens (single-token evals)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per model (interleaved)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from llama_cpp import Llama
    import llama_cpp

    spec = load_spec(args.spec)
    if args.store:
        spec = with_overrides(spec, store=args.store)
    marker = {}
    if args.pruned:
        pruned_path = Path(args.pruned)
    elif args.hf:
        pruned_path, info = hf_gguf(spec, Path(args.hf), args.gguf_type, Path(args.work))
        marker = {"gguf": {args.gguf_type: info}}
    else:
        store = open_store(spec.store).child(layout.search_prefix(spec.name))
        key = layout.gguf_file(args.gguf_type)
        if not store.exists(key):
            raise SystemExit(f"{store.uri}/{key} is missing: run `darwinlm export {args.spec} --format gguf "
                             f"--gguf-type {args.gguf_type}` first")
        pruned_path = Path(args.work) / f"{spec.name}-{args.gguf_type}.gguf"
        pruned_path.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, pruned_path)
        marker = store.get_json(layout.EXPORT_DONE)
    dense_path = dense_gguf(spec, args.gguf_type, Path(args.work))
    tokens = heldout_tokens(spec, args.prompt + args.gen)
    prompt, gen = tokens[: args.prompt], tokens[args.prompt:]

    n_ctx = args.prompt + args.gen
    models = {name: Llama(model_path=str(path), n_ctx=n_ctx, n_batch=args.prompt, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False, seed=0)
              for name, path in (("dense", dense_path), ("pruned", pruned_path))}
    for llm in models.values():  # warm-up: page the weights in, let the allocator settle
        measure(llm, prompt[:32], gen[:4])
    runs: dict[str, list[tuple[float, float]]] = {"dense": [], "pruned": []}
    for rep in range(args.reps):
        order = ("dense", "pruned") if rep % 2 == 0 else ("pruned", "dense")
        for name in order:
            runs[name].append(measure(models[name], prompt, gen))

    med = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in runs.items()}
    w_dense, w_file = per_token_weights(dense_path), per_token_weights(pruned_path)
    extra = marker.get("gguf", {}).get(args.gguf_type, {}).get("duplication", {}).get(
        "extra_params", 0)
    w_model = w_file - extra
    out = {
        "type": args.gguf_type, "threads": args.threads, "prompt_tokens": args.prompt, "gen_tokens": args.gen,
        "reps": args.reps, "llama_cpp_python": llama_cpp.__version__,
        "dense": {"prompt_tps": med["dense"][0], "gen_tps": med["dense"][1], "weights": w_dense,
                  "bytes": dense_path.stat().st_size},
        "pruned": {"prompt_tps": med["pruned"][0], "gen_tps": med["pruned"][1], "weights": w_file,
                   "weights_model": w_model, "bytes": pruned_path.stat().st_size},
        "speedup": {"prompt": med["pruned"][0] / med["dense"][0], "gen": med["pruned"][1] / med["dense"][1],
                    "prompt_paired": statistics.median(p[0] / d[0] for d, p in zip(runs["dense"], runs["pruned"])),
                    "gen_paired": statistics.median(p[1] / d[1] for d, p in zip(runs["dense"], runs["pruned"]))},
        "ideal": {"model": w_dense / w_model, "file": w_dense / w_file},
        "all_runs": runs,
    }
    for k in ("prompt", "gen"):
        out[f"{k}_vs_ideal"] = out["speedup"][k] / out["ideal"]["model"]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), {args.gguf_type}, {args.threads} thread(s), "
          f"{args.reps} interleaved reps, prompt {args.prompt} tokens, generation {args.gen} tokens")
    print(f"{'':10}{'prompt tok/s':>14}{'gen tok/s':>12}{'weights/token':>16}{'file MB':>10}")
    for name in ("dense", "pruned"):
        o = out[name]
        print(f"{name:10}{o['prompt_tps']:14.1f}{o['gen_tps']:12.1f}{o['weights']:16,d}{o['bytes'] / 1e6:10.1f}")
    s, i = out["speedup"], out["ideal"]
    print(f"speedup   prompt {s['prompt']:.3f}x (paired {s['prompt_paired']:.3f})  "
          f"generation {s['gen']:.3f}x (paired {s['gen_paired']:.3f})")
    print(f"ideal     {i['model']:.3f}x from the model's weights, {i['file']:.3f}x from the file's "
          f"(KV duplication and zero heads included)")
    print(f"vs ideal  prompt {out['prompt_vs_ideal']:.2f}  generation {out['gen_vs_ideal']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
