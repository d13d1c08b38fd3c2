"""The PruningSearch status as typed dataclasses: what the operator writes, declared in the CRD.

Why this module exists: the API server prunes status fields that the CRD does not declare (the retry
ledger with them), so the status the operator owns (``reconcile._OWNED``) is declared like the spec:
frozen dataclasses with a docstring under each field, from which ``crd.status_schema`` generates
``openAPIV3Schema.properties.status`` (``kubectl explain pruningsearch.status``). Only the CRD reads
them; the reconciler writes the status as plain dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from darwinlm.spec import Bounds, SpecNode, setting
from darwinlm_operator.kspec import FrozenMap, kfield

__all__ = ["PHASES", "PruningSearchStatus", "Condition", "Attempt", "Estimate"]

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Condition(SpecNode):
    """A metav1.Condition: one aspect of the search's state."""

    type: str = setting(max_length=316, pattern=(
        r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"))
    """Condition type in CamelCase: Invalid, Running, Suspended, Retrying, Succeeded or Failed."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds: True, False or Unknown."""
    observedGeneration: int | None = setting(None, ge=0)
    """metadata.generation of the spec the condition was computed from."""
    lastTransitionTime: str = kfield(fmt="date-time")
    """When `status` last changed (RFC 3339)."""
    reason: str = setting(min_length=1, max_length=1024,
                          pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    """Machine-readable CamelCase cause of the last transition, e.g. BackoffLimitExceeded."""
    message: str = setting(max_length=32768)
    """Human-readable details; for Invalid it names the field paths at fault."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Attempt(SpecNode):
    """One finished (or deleted) Job of the search, as the operator accounted it."""

    task: str
    """Task the Job ran, e.g. generation-12 or database-shard-0."""
    attempt: int = setting(0, ge=0)
    """Attempt number of the task (the Job is named <search>-<task>-a<attempt>)."""
    outcome: Literal["Succeeded", "Failed", "Deleted"]
    """How the Job ended: Succeeded, Failed, or Deleted by the operator (suspend, deadline)."""
    reason: str
    """Why, e.g. Completed, Evicted, Preempted, OOMKilled, PermanentError, DeadlineExceeded."""
    counted: bool = False
    """Whether this failure counts toward spec.backoffLimit (evictions and preemptions do not)."""
    permanent: bool = False
    """Whether the failure is permanent (retrying the same input fails the same way)."""
    message: str | None = None
    """Details of a failure (exit code, first error line, pod events)."""
    generation: int | None = None
    """metadata.generation of the spec the Job ran under (a spec change resets the retry budget)."""
    seconds: float | None = setting(None, ge=0.0)
    """Run time of the Job in seconds."""
    gpuSeconds: float | None = setting(None, ge=0.0)
    """GPU-seconds the Job used (GPUs per pod x pod run time)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Estimate(SpecNode):
    """The search's token budget, exact from the spec's selection schedule (``darwinlm estimate`` prints
    the same numbers, with FLOPs, bytes, memory and hours)."""

    evaluationsPerGeneration: int = setting(0, ge=0)
    """Candidates fine-tuned and scored per generation (offspring, survivors, the parent at the last stage)."""
    fitnessTokensPerGeneration: int = setting(0, ge=0)
    """Tokens scored per generation (each candidate on its stage's fitness batch)."""
    finetuneTokensPerGeneration: int = setting(0, ge=0)
    """Tokens scheduled for fine-tuning per generation (each candidate on its stage's budget)."""
    trainedTokensPerGeneration: int = setting(0, ge=0)
    """Tokens actually trained per generation (fewer with warm_start: survivors continue)."""
    fitnessTokensTotal: int = setting(0, ge=0)
    """fitnessTokensPerGeneration x generations."""
    trainedTokensTotal: int = setting(0, ge=0)
    """trainedTokensPerGeneration x generations."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruningSearchStatus(SpecNode):
    """Observed state of a PruningSearch, written by the operator only."""

    phase: Literal[PHASES] | None = None  # type: ignore[valid-type]
    """Summary of the state: Pending, Running, Suspended, Succeeded or Failed."""
    conditions: tuple[Condition, ...] = kfield((), max_items=32, list_map_keys=("type",))
    """Latest observations of the search's state (metav1.Condition), one per type."""
    observedGeneration: int | None = setting(None, ge=0)
    """metadata.generation of the spec the operator last acted on."""
    generation: str | None = None
    """Generations done out of the total, as "i/N" (e.g. 37/200)."""
    generationsDone: int | None = setting(None, ge=0)
    """Completed search generations."""
    generationsTotal: int | None = setting(None, ge=0)
    """Generations the search runs in total (spec.search.generations)."""
    bestFitness: float | None = None
    """Fitness of the current parent (the best genome so far); lower is better."""
    progress: str | None = None
    """Percent of the planned generations done, e.g. 45% (0% while the database is built, 100% once the
    search part is over; `stage` says which phase runs)."""
    stage: str | None = None
    """The phase running now: BuildingDatabase, MeasuringSensitivity, Searching, PostTraining,
    Exporting, Evaluating; Suspended or Finished."""
    eta: str | None = None
    """Estimated time left until the last generation finishes, e.g. 2h13m: the generations left times
    the mean wall-clock interval between generation finishes (Job hand-off included), minus the time
    the generation in flight has run. Unset outside the search phases."""
    etaRange: str | None = None
    """The spread of `eta`, e.g. 1h50m-2h40m: the same estimate from the 25th and 75th percentile of
    the measured generation intervals."""
    estimate: Estimate | None = None
    """The token budget of the search, from its spec (see `darwinlm estimate` for FLOPs and hours)."""
    gpuSeconds: float | None = setting(None, ge=0.0)
    """GPU-seconds used so far by the search's Jobs (GPUs per pod x pod run time)."""
    offspringEvaluated: int | None = setting(None, ge=0)
    """Offspring evaluated so far, over all generations."""
    offspringFailed: int | None = setting(None, ge=0)
    """Failed generation Job attempts. A generation's offspring are evaluated by its Job as a whole, so a
    failure loses no offspring: the attempt is retried and re-evaluates them (the unit of the metric
    ``darwinlm_generation_attempts_failed_total``)."""
    checkpointURI: str | None = None
    """Store URI of the last completed generation's state (where a resume continues)."""
    resultURI: str | None = None
    """Store URI of the result (exported model, report) once the search succeeded."""
    startTime: str | None = kfield(None, fmt="date-time")
    """When the operator started the first Job (RFC 3339)."""
    completionTime: str | None = kfield(None, fmt="date-time")
    """When the search succeeded or failed (RFC 3339)."""
    retries: dict[str, int] = kfield(factory=FrozenMap, items=Bounds(ge=0))
    """Attempts used per task (task name -> count) under the current spec generation, compared
    with spec.backoffLimit."""
    attempts: dict[str, Attempt] = kfield(factory=FrozenMap)
    """The retry ledger: every finished Job by name, accounted once (it survives operator
    restarts and Job deletion)."""
    message: str | None = None
    """Human-readable summary of the current state or of the last error."""
    kopf: dict[str, Any] | None = None
    """Handler progress of the kopf framework (internal; free-form)."""
