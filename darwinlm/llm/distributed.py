"""One generation's candidates evaluated by W workers with ``torch.distributed`` (ARCHITECTURE.md).

Why this module exists: a generation is the expensive task (every stage fine-tunes and scores a pool of
candidates). The Kubernetes generation Job runs W pods (an Indexed Job), one process each; every process
runs the same generation code (``search.run_generation``) on the same spec and store, and only the
candidate evaluations are split. After each selection stage the fitnesses are all-gathered, so every
rank holds the full score list and computes the same deterministic selection, hence the same next pool.
Rank 0 alone writes the generation state and the task's completion marker; every rank writes the result
JSONs of the candidates it scored (that is what makes a retry after a crash reuse finished work).

Environment (torchrun's names): ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` and ``RANK``; when
``RANK`` is absent, ``JOB_COMPLETION_INDEX`` (set by Kubernetes in Indexed Job pods) is the rank. Optional:
``LOCAL_RANK`` (the CUDA device index, default 0: one process per pod), ``DARWINLM_DIST_BACKEND``
(``gloo``/``nccl``; default NCCL when the model is on CUDA, else Gloo) and ``DARWINLM_DIST_TIMEOUT_S``
(how long a rank waits for the others, at rendezvous and at every stage's gather; default 7200: a rank
waits for the slowest rank's share of a stage). Fitnesses travel over a Gloo group even with NCCL:
they are a few floats, and Gloo notices a dead peer at once (a closed socket) instead of at the timeout.

Work split: the items of a stage are ``(pool index, genome)``; rank ``r`` evaluates the items whose pool
index ``i`` has ``i % W == r`` (round-robin, so each rank gets ``ceil`` or ``floor`` of ``len(pool)/W``,
and a candidate's rank does not depend on any timing). Candidates cost about the same, so static
round-robin balances within one candidate; a retry reuses the stored results of whichever rank wrote them.

Determinism: the result of W workers is identical to W=1 (and to any crash/retry history) as long as a
candidate's fitness does not depend on the process that computes it. Every random choice already derives
from ``(seed, generation, stage[, candidate])``; the remaining source is float arithmetic, whose reduction
order depends on torch's intra-op thread count. So every worker MUST run with the same ``model.threads``
(``torch.set_num_threads``), and so must the W=1 run it is compared with; on GPUs the same device model
and library versions. With ``model.threads`` unset, the ``task`` command warns when W > 1.

Failures: an exception while evaluating a candidate on one rank is sent to the others in the gather (no
rank hangs in a collective): the failing rank re-raises its own exception, the others raise
``PeerFailure`` (``permanent`` when the original was a spec/target error). A rank that dies makes the
others' collective fail with ``PeerFailure`` (retriable). Restart the whole Job: the plan is idempotent
and the finished candidates' results are reused.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from darwinlm.errors import InfeasibleTargetError, PeerFailure, SpecError, WorldConfigError

log = logging.getLogger(__name__)

__all__ = ["World", "WorldConfigError", "PeerFailure", "world_env", "init_from_env", "owner",
           "DistributedShard"]

DEFAULT_TIMEOUT_S = 7200.0


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise WorldConfigError(f"{name}={env[name]!r} is not an integer") from None


def world_env(env: Mapping[str, str] | None = None) -> dict | None:
    """Parse the torchrun-style variables: ``None`` when ``WORLD_SIZE`` is unset or 1 (one process)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    size = _int_env(env, "WORLD_SIZE")
    if size < 1:
        raise WorldConfigError(f"WORLD_SIZE must be >= 1, got {size}")
    if size == 1:
        return None
    if "RANK" in env:
        rank = _int_env(env, "RANK")
    elif "JOB_COMPLETION_INDEX" in env:
        rank = _int_env(env, "JOB_COMPLETION_INDEX")
    else:
        raise WorldConfigError("WORLD_SIZE > 1 needs RANK (or JOB_COMPLETION_INDEX in a Kubernetes Indexed Job)")
    if not 0 <= rank < size:
        raise WorldConfigError(f"rank {rank} is outside 0..{size - 1} (WORLD_SIZE={size})")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise WorldConfigError(f"WORLD_SIZE > 1 needs {' and '.join(missing)} (the address of rank 0)")
    port = _int_env(env, "MASTER_PORT")
    if not 0 < port < 65536:
        raise WorldConfigError(f"MASTER_PORT={port} is not a TCP port")
    backend = env.get("DARWINLM_DIST_BACKEND") or None
    if backend not in (None, "gloo", "nccl"):
        raise WorldConfigError(f"DARWINLM_DIST_BACKEND={backend!r}: use gloo or nccl")
    try:
        timeout = float(env.get("DARWINLM_DIST_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    except ValueError:
        raise WorldConfigError(f"DARWINLM_DIST_TIMEOUT_S={env['DARWINLM_DIST_TIMEOUT_S']!r} is not a number") from None
    return {"rank": rank, "world_size": size, "master_addr": env["MASTER_ADDR"], "master_port": port,
            "local_rank": _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            "backend": backend, "timeout_s": timeout}


@dataclass
class World:
    """This process's place in an initialised process group."""

    rank: int
    world_size: int
    backend: str
    _gather_group: Any = field(default=None, repr=False)  # a Gloo group for the fitness exchange

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._gather_group)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self._gather_group)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(*, device=None, env: Mapping[str, str] | None = None) -> World | None:
    """Join the process group the environment describes; ``None`` for a single process (W=1).

    ``device`` is where the model runs (``torch.device`` or a string): NCCL when it is CUDA, else Gloo,
    unless ``DARWINLM_DIST_BACKEND`` says otherwise. Blocks until all ``WORLD_SIZE`` ranks have joined
    (at most ``DARWINLM_DIST_TIMEOUT_S``)."""
    cfg = world_env(env)
    if cfg is None:
        return None
    import torch
    import torch.distributed as dist

    dev_type = torch.device(device).type if device is not None else "cpu"
    backend = cfg["backend"] or ("nccl" if dev_type == "cuda" else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(cfg["local_rank"])
    timeout = datetime.timedelta(seconds=cfg["timeout_s"])
    t0 = time.time()
    # an explicit TCPStore (what env:// would build) because the rank may come from JOB_COMPLETION_INDEX;
    # rank 0 serves it, the others retry connecting until it is up or the timeout passes
    rendezvous = dist.TCPStore(cfg["master_addr"], cfg["master_port"], cfg["world_size"],
                               is_master=cfg["rank"] == 0, timeout=timeout)
    dist.init_process_group(backend, store=rendezvous, rank=cfg["rank"], world_size=cfg["world_size"],
                            timeout=timeout)
    group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    log.info("rank %d/%d joined (%s) in %.1fs", cfg["rank"], cfg["world_size"], backend, time.time() - t0)
    return World(cfg["rank"], cfg["world_size"], backend, group)


def owner(index: int, world_size: int) -> int:
    """The rank that evaluates pool item ``index`` (round-robin)."""
    return index % world_size


def _digest(items: Sequence[tuple[int, Any]]) -> str:
    """The same on every rank iff every rank has the same stage pool (guards against divergence)."""
    h = hashlib.sha256()
    for i, g in items:
        d = g.to_dict() if hasattr(g, "to_dict") else repr(g)
        h.update(json.dumps([i, d], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _is_permanent(e: BaseException) -> bool:
    return isinstance(e, (SpecError, InfeasibleTargetError))


class DistributedShard:
    """The ``shard`` of ``search.run_generation``: ``shard(items, one) -> scores of ALL items``.

    ``items`` is a stage's ``[(pool index, genome)]``; this rank calls ``one(genome)`` for its own items
    (``owner(index, W) == rank``), the scores are all-gathered, and the full list comes back in the order
    of ``items`` on every rank. ``is_writer`` is True on rank 0 only. ``stages`` records, per call, each
    rank's busy seconds and candidate count (for load-balance reports)."""

    def __init__(self, world: World):
        self.world = world
        self.stages: list[dict] = []

    @property
    def is_writer(self) -> bool:
        return self.world.is_writer

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    def barrier(self) -> None:
        """Wait for every rank (``tasks.run_task`` calls it after rank 0 wrote the marker)."""
        try:
            self.world.barrier()
        except RuntimeError as e:
            raise PeerFailure(f"rank {self.rank}: lost the other ranks at the end of the task: {e}") from e

    def _gather(self, payload: dict) -> list[dict]:
        try:
            return self.world.all_gather(payload)
        except RuntimeError as e:  # DistBackendError, closed connections, timeouts
            raise PeerFailure(f"rank {self.rank}: lost the other ranks during the fitness exchange "
                              f"(a worker died or timed out; rerun the task): {e}") from e

    def __call__(self, items: Sequence[tuple[int, Any]], one: Callable[[Any], float]) -> list:
        W, r = self.world_size, self.rank
        t0 = time.time()
        scores: dict[int, Any] = {}
        error, exc = None, None
        for i, genome in items:
            if owner(i, W) != r:
                continue
            try:
                scores[i] = one(genome)
            except Exception as e:  # noqa: BLE001 - forwarded to every rank, then re-raised below
                error = {"rank": r, "index": i, "type": type(e).__name__, "message": str(e),
                         "permanent": _is_permanent(e)}
                exc = e
                break
        busy = time.time() - t0
        gathered = self._gather({"rank": r, "digest": _digest(items), "scores": scores, "error": error,
                                 "seconds": busy})
        self.stages.append({"items": len(items), "seconds": [p["seconds"] for p in gathered],
                            "counts": [len(p["scores"]) for p in gathered],
                            "wait": round(time.time() - t0 - busy, 3)})
        if self.is_writer:
            log.debug("stage of %d candidates on %d ranks: %s evaluated, busy %s s",
                     len(items), W, self.stages[-1]["counts"], [round(x, 1) for x in self.stages[-1]["seconds"]])
        if exc is not None:
            raise exc
        return self._merge(items, gathered)

    @staticmethod
    def _merge(items: Sequence[tuple[int, Any]], gathered: list[dict]) -> list:
        """Every rank's scores in the order of ``items``, after checking that no rank failed or diverged."""
        failed = [p["error"] for p in gathered if p["error"] is not None]
        if failed:
            f = failed[0]
            raise PeerFailure(f"rank {f['rank']} failed on candidate {f['index']}: {f['type']}: {f['message']}",
                              permanent=f["permanent"])
        digests = {p["digest"] for p in gathered}
        if len(digests) != 1:
            raise PeerFailure(f"the ranks disagree on the stage pool ({sorted(digests)}): they must run the "
                              "same spec on the same store")
        merged: dict[int, Any] = {}
        for p in gathered:
            merged.update(p["scores"])
        missing = [i for i, _ in items if i not in merged]
        if missing:
            raise PeerFailure(f"no rank returned a score for pool items {missing}")
        return [merged[i] for i, _ in items]
