"""kopf handlers: watch PruningSearches and their Jobs; one small reconcile loop per search.

Why this module exists: it is the only place that talks to the Kubernetes API. Each reconcile is
read (the PruningSearch, its Jobs and Pods, the store) -> ``reconcile.decide`` (pure) -> apply
idempotently (create by deterministic name, 409 = already there; delete, 404 = already gone) ->
patch the status fields that changed -> post Events, update metrics.

Why a loop per search and not ``@kopf.timer``/``@kopf.daemon``: kopf always puts its finalizer on
objects that have timers or daemons (``requires_finalizer=True``), and a finalizer blocks
``kubectl delete`` while the operator is down (zalando-incubator/kopf#75). The design allows a
finalizer only for S3 cleanup (``artifactRetention: Delete``). So ``@kopf.on.event`` (no finalizer)
starts one asyncio task per PruningSearch - on creation and, after a restart, when kopf lists the
existing objects - and the task reconciles every ``interval`` seconds or at once when poked: by a
change of the PruningSearch's spec, or by an event of one of its Jobs (a Job finishing starts the
next one in well under a second). The Kubernetes calls run in worker threads (``asyncio.to_thread``).

State: one :class:`Operator` object per process (settings, metrics, the store cache, liveness and the
per-search loops), made by the startup handler and kept in kopf's memo as ``memo.operator``. kopf hands
every handler that memo (resource handlers get a shallow copy, so the same object); nothing is a
module global.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import json
import logging
import os
import time
from typing import Any

import kopf

from darwinlm.errors import SpecError, StoreError
from darwinlm.spec import API_VERSION

from .store_access import CredentialsError, StoreCache, StoreView, open_search_store
from .conditions import parse_timestamp
from .kspec import JobDefaults, KubeSpec, load_psearch
from .metrics import Metrics
from .reconcile import Decision, as_manifest, decide, job_outcome, status_patch
from .status import credentials_invalid
from .render import LABEL_MANAGED_BY, LABEL_SEARCH, LABEL_SEARCH_UID, MANAGED_BY

log = logging.getLogger(__name__)

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "pruningsearches"
FINALIZER = "darwinlm.io/s3-cleanup"


@dataclasses.dataclass
class OperatorConfig:
    """Settings of one operator process (``python -m darwinlm_operator`` flags, or DARWINLM_* env)."""

    interval: float = 2.0
    """Seconds between two reconciles of one search when nothing pokes it (Job and spec changes do)."""
    metrics_port: int = 8000
    """Port of the Prometheus /metrics endpoint; 0 = no endpoint."""
    stale_after: float = 300.0
    """The liveness probe fails when searches exist but none was reconciled for this many seconds."""
    max_backoff: float = 60.0
    """Longest wait (seconds) between reconciles of a search whose reconcile keeps failing."""
    job_defaults: JobDefaults = dataclasses.field(default_factory=JobDefaults)
    """Job image, pull policy and generationsPerJob of searches that set no spec.image/
    spec.imagePullPolicy/spec.generationsPerJob (DARWINLM_JOB_IMAGE, DARWINLM_JOB_IMAGE_PULL_POLICY: the
    chart's jobImage; DARWINLM_GENERATIONS_PER_JOB: the chart's generationsPerJob); empty = none."""

    @classmethod
    def from_env(cls) -> "OperatorConfig":
        """The settings from DARWINLM_* variables; ValueError when one is malformed (at startup)."""
        env = os.environ
        per_job = env.get("DARWINLM_GENERATIONS_PER_JOB", "").strip()
        jobs = JobDefaults(image=env.get("DARWINLM_JOB_IMAGE", "").strip() or None,
                           image_pull_policy=env.get("DARWINLM_JOB_IMAGE_PULL_POLICY", "").strip() or None,
                           generations_per_job=int(per_job) if per_job else None)
        return cls(interval=float(env.get("DARWINLM_RECONCILE_INTERVAL", cls.interval)),
                   metrics_port=int(env.get("DARWINLM_METRICS_PORT", cls.metrics_port)),
                   stale_after=float(env.get("DARWINLM_STALE_AFTER", cls.stale_after)),
                   job_defaults=jobs)



# ------------------------------------------------------------------------------ Kubernetes calls

class Kube:
    """The few API calls the operator makes (kubernetes client, raw JSON dicts, sync: run in threads)."""

    def __init__(self) -> None:
        import kubernetes

        self.core = kubernetes.client.CoreV1Api()
        self.batch = kubernetes.client.BatchV1Api()
        self.custom = kubernetes.client.CustomObjectsApi()
        self.ApiException = kubernetes.client.exceptions.ApiException

    @staticmethod
    def _json(resp) -> Any:
        return json.loads(resp.data)

    def get_search(self, ns: str, name: str) -> dict | None:
        try:
            return self._json(self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name,
                                                                       _preload_content=False))
        except self.ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_jobs(self, ns: str, name: str) -> list[dict]:
        resp = self.batch.list_namespaced_job(ns, label_selector=f"{LABEL_SEARCH}={name}", _preload_content=False)
        return self._json(resp).get("items") or []

    def list_pods(self, ns: str, uid: str) -> list[dict]:
        resp = self.core.list_namespaced_pod(ns, label_selector=f"{LABEL_SEARCH_UID}={uid}", _preload_content=False)
        return self._json(resp).get("items") or []

    def create(self, obj: dict) -> bool:
        """Create ``obj`` (a Job or a Service); False when it already exists (HTTP 409)."""
        ns = obj["metadata"]["namespace"]
        try:
            if obj["kind"] == "Job":
                self.batch.create_namespaced_job(ns, obj, _preload_content=False)
            else:
                self.core.create_namespaced_service(ns, obj, _preload_content=False)
        except self.ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def delete_job(self, ns: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, ns, propagation_policy="Background", _preload_content=False)
        except self.ApiException as e:
            if e.status != 404:
                raise

    def patch_status(self, ns: str, name: str, patch: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, name, patch, _content_type="application/merge-patch+json",
            _preload_content=False)

    def delete_search(self, ns: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name,
                                                        propagation_policy="Background", _preload_content=False)
        except self.ApiException as e:
            if e.status != 404:
                raise


# ------------------------------------------------------------------------------ one reconcile

def _decide(kube: Kube, cr: dict, jobs: list, pods: list, memo: dict, now: _dt.datetime, op: Operator) -> Decision:
    """``decide`` over the search's store; when S3 refuses the cached credentials (rotated since they were
    read?), once more with the Secret read again."""
    try:
        return decide(cr, jobs, pods, _store_view(kube, cr, memo, op.stores), now, defaults=op.config.job_defaults)
    except StoreError as e:
        if _credentials_problem(cr, e) is None:
            raise
    op.stores.forget_credentials()
    return decide(cr, jobs, pods, _store_view(kube, cr, memo, op.stores), now, defaults=op.config.job_defaults)


_REFUSED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken")


def _credentials_problem(cr: dict, exc: Exception) -> str | None:
    """What is wrong with the search's S3 credentials, naming the Secret and its keys (never a value);
    None when ``exc`` is not about them (e.g. an outage: retried without a status change)."""
    if isinstance(exc, CredentialsError):
        return str(exc)
    code = next((c for c in _REFUSED if c in str(exc)), None)
    if code is None and "(HTTP 403)" in str(exc):  # a HEAD's 403 has no body, hence no error code
        code = "HTTP 403 Forbidden"
    ref = (((cr.get("spec") or {}).get("s3") or {}).get("secretRef") or {})
    if code is None or not ref.get("name"):
        return None
    keys = (ref.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID"), ref.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"))
    return (f"S3 refused the credentials of Secret {cr['metadata']['namespace']}/{ref['name']} "
            f"(keys {keys[0]!r}, {keys[1]!r}; spec.s3.secretRef): {code}")


def _store_view(kube: Kube, cr: dict, memo: dict, stores: StoreCache) -> StoreView | None:
    """The search's store as the operator reads it; None when the spec is invalid (decide says why)
    or the search is being deleted (nothing is decided then, and its Secret may be gone already)."""
    if cr["metadata"].get("deletionTimestamp"):
        return None
    try:
        spec, kspec = load_psearch(as_manifest(cr))
    except SpecError:
        return None
    store = open_search_store(stores, spec, kspec, cr["metadata"]["uid"], kube.core, cr["metadata"]["namespace"])
    return StoreView(store, memo)


def _needs_pods(cr: dict, jobs: list[dict], now: _dt.datetime | None) -> bool:
    """Pods matter for a failed Job not yet accounted (its cause) and for a live Job old enough
    to hit podStartTimeoutSeconds; otherwise the (possibly large) pod list is not read."""
    ledger = (cr.get("status") or {}).get("attempts") or {}
    timeout = (cr.get("spec") or {}).get("podStartTimeoutSeconds")
    if not isinstance(timeout, int):
        timeout = KubeSpec.__dataclass_fields__["podStartTimeoutSeconds"].default
    now = now or _dt.datetime.now(_dt.timezone.utc)
    for job in jobs:
        outcome = job_outcome(job)
        if outcome == "Failed" and job["metadata"]["name"] not in ledger:
            return True
        born = parse_timestamp(job["metadata"].get("creationTimestamp"))
        if outcome is None and (born is None or (now - born).total_seconds() >= timeout):
            return True
    return False


def reconcile_once(kube: Kube, ns: str, name: str, memo: dict, now: _dt.datetime | None = None, *,
                   op: Operator) -> tuple[dict, Decision] | None:
    """Read -> decide -> apply for one search (blocking). None when the PruningSearch is gone.
    ``memo``: this search's cached store answers; ``op``: the operator's settings and store cache."""
    cr = kube.get_search(ns, name)
    if cr is None:
        return None
    jobs = kube.list_jobs(ns, name)
    pods = kube.list_pods(ns, cr["metadata"]["uid"]) if _needs_pods(cr, jobs, now) else []
    now = now or _dt.datetime.now(_dt.timezone.utc)
    try:
        decision = _decide(kube, cr, jobs, pods, memo, now, op)
    except (CredentialsError, StoreError) as e:
        message = _credentials_problem(cr, e)
        if message is not None:  # said in the status too; the loop's back-off spaces the retries
            patch = status_patch(cr.get("status"), credentials_invalid(
                cr.get("status"), message, now, cr["metadata"].get("generation")))
            if patch:
                kube.patch_status(ns, name, {"status": patch})
        raise
    for obj in decision.create:
        kube.create(obj)
    for job in decision.delete:
        kube.delete_job(ns, job)
    patch = status_patch(cr.get("status"), decision.status)
    if patch:
        kube.patch_status(ns, name, {"status": patch})
    if decision.delete_self:
        kube.delete_search(ns, name)
    return cr, decision


# ------------------------------------------------------------------------------ per-search loops

@dataclasses.dataclass
class Health:
    """When the operator last saw an event and last finished a reconcile (the liveness probe)."""

    last_event: float = dataclasses.field(default_factory=time.monotonic)
    last_reconcile: float = dataclasses.field(default_factory=time.monotonic)


class SearchLoops:
    """One asyncio task per PruningSearch, keyed by (namespace, name); poked to reconcile at once."""

    def __init__(self, op: Operator) -> None:
        self.op = op
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}
        self._pokes: dict[tuple[str, str], asyncio.Event] = {}
        self.kube: Kube | None = None

    def __len__(self) -> int:
        return sum(not t.done() for t in self._tasks.values())

    def ensure(self, ns: str, name: str) -> None:
        key = (ns, name)
        task = self._tasks.get(key)
        if task is None or task.done():
            self._pokes[key] = asyncio.Event()
            self._tasks[key] = asyncio.create_task(self._run(key), name=f"darwinlm-search-{ns}/{name}")
        self.poke(ns, name)

    def poke(self, ns: str, name: str | None) -> None:
        event = self._pokes.get((ns, name)) if name else None
        if event is not None:
            event.set()

    async def stop(self, ns: str, name: str) -> None:
        task = self._tasks.pop((ns, name), None)
        self._pokes.pop((ns, name), None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def stop_all(self) -> None:
        for ns, name in list(self._tasks):
            await self.stop(ns, name)

    async def _run(self, key: tuple[str, str]) -> None:
        ns, name = key
        op, config = self.op, self.op.config
        memo: dict = {}  # immutable store answers of this search (store_access.StoreView)
        failures, last_error = 0, ""
        while True:
            poke = self._pokes.get(key)
            if poke is None:
                return
            poke.clear()
            try:
                if self.kube is None:
                    self.kube = await asyncio.to_thread(Kube)
                result = await asyncio.to_thread(reconcile_once, self.kube, ns, name, memo, op=op)
            except Exception as e:  # noqa: BLE001 - the loop must survive any error and retry
                failures += 1
                last_error = _report_error(op.metrics, ns, name, e, last_error)
            else:
                op.health.last_reconcile = time.monotonic()
                if result is None:
                    op.metrics.forget(ns, name)
                    self._tasks.pop(key, None)
                    self._pokes.pop(key, None)
                    return
                failures, last_error = 0, ""
                _report(op.metrics, *result)
            delay = min(config.max_backoff, config.interval * (2 ** min(failures, 6))) if failures else config.interval
            try:
                await asyncio.wait_for(poke.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass


@dataclasses.dataclass(eq=False)
class Operator:
    """Everything one operator process holds (see the module docstring: it lives in ``memo.operator``)."""

    config: OperatorConfig = dataclasses.field(default_factory=OperatorConfig)
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    stores: StoreCache = dataclasses.field(default_factory=StoreCache)  # the stores the operator reads
    health: Health = dataclasses.field(default_factory=Health)
    loops: SearchLoops = dataclasses.field(init=False)  # one reconcile loop per PruningSearch

    def __post_init__(self) -> None:
        self.loops = SearchLoops(self)


def _report(metrics: Metrics, cr: dict, decision: Decision) -> None:
    """Events (kopf posts them as the operator) and metrics of one applied decision."""
    for ev in decision.events:
        kopf.event(cr, type=ev.type, reason=ev.reason, message=ev.message[:1024])
    meta = cr["metadata"]
    metrics.observe(meta["namespace"], meta["name"], decision.status, decision.metrics, decision.accounted)


def _report_error(metrics: Metrics, ns: str, name: str, exc: Exception, last: str) -> str:
    """Log (and once per distinct message, post a Warning Event for) a failed reconcile."""
    metrics.error(ns)
    kind = "StoreUnavailable" if isinstance(exc, (StoreError, CredentialsError)) else "ReconcileError"
    message = f"{kind}: {exc}"
    log.warning("reconcile of %s/%s failed: %s", ns, name, message)
    if message != last:
        ref = {"apiVersion": API_VERSION, "kind": "PruningSearch", "metadata": {"namespace": ns, "name": name}}
        kopf.event(ref, type="Warning", reason=kind, message=message[:1024])
    return message


# ------------------------------------------------------------------------------ kopf handlers

@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    op = memo.operator = Operator(config=OperatorConfig.from_env())
    log.info("default job image (for searches without spec.image): %s",
             op.config.job_defaults.image or "none: such searches are Invalid (set DARWINLM_JOB_IMAGE)")
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="darwinlm.io")
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300  # the API server ends a watch after this many seconds
    settings.watching.client_timeout = 330  # ...and we give up on a silent stream a bit later
    settings.watching.connect_timeout = 30
    settings.networking.error_backoffs = [1, 2, 5, 10, 30]
    _quiet_credential_loggers()
    _load_kube_config()
    if op.config.metrics_port:
        op.metrics.serve(op.config.metrics_port)


# At DEBUG (``kopf run --verbose``) these log what must never be logged: the kubernetes client prints
# every response body (the S3 Secret's data, base64), botocore every request's headers (Authorization:
# the access key id) and urllib3/s3transfer more of the same. Found by tests/k8s/test_credentials.py.
_CREDENTIAL_LOGGERS = {"kubernetes.client.rest": logging.INFO, "botocore": logging.INFO,
                       "boto3": logging.INFO, "s3transfer": logging.INFO, "urllib3": logging.INFO}


def _quiet_credential_loggers() -> None:
    for name, level in _CREDENTIAL_LOGGERS.items():
        logger = logging.getLogger(name)
        logger.setLevel(max(level, logger.getEffectiveLevel()))


def _load_kube_config() -> None:
    import kubernetes

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    await memo.operator.loops.stop_all()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def search_event(type: str | None, body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                       **_: Any) -> None:
    """Start (or poke) the search's loop; stop it when the object is gone."""
    op: Operator = memo.operator
    op.health.last_event = time.monotonic()
    if type == "DELETED":
        await op.loops.stop(namespace, name)
        op.metrics.forget(namespace, name)
        return
    status = body.get("status") or {}
    if type in (None, "ADDED") or status.get("observedGeneration") != body.meta.get("generation"):
        op.loops.ensure(namespace, name)  # new, listed after a restart, or a spec change


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
def job_event(labels: kopf.Labels, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A Job of ours changed (e.g. finished): reconcile its search now."""
    op: Operator = memo.operator
    op.health.last_event = time.monotonic()
    op.loops.poke(namespace, labels.get(LABEL_SEARCH))


def _deletes_artifacts(spec: kopf.Spec, **_: Any) -> bool:
    return spec.get("artifactRetention") == "Delete"


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_deletes_artifacts, retries=10, backoff=15)
def delete_artifacts(body: kopf.Body, namespace: str, uid: str, memo: kopf.Memo, **_: Any) -> None:
    """artifactRetention: Delete - remove searches/<name>-<uid>/ before the object goes."""
    try:
        spec, kspec = load_psearch(as_manifest(body))
    except SpecError as e:
        raise kopf.PermanentError(f"artifacts not deleted: the spec is invalid ({e.first_path})") from None
    try:
        store = open_search_store(memo.operator.stores, spec, kspec, uid, Kube().core, namespace)
        count = store.delete_prefix("")
    except (StoreError, CredentialsError) as e:
        raise kopf.TemporaryError(f"deleting the artifacts failed, will retry: {e}", delay=15) from None
    kopf.info(body, reason="ArtifactsDeleted", message=f"deleted {count} object(s) under {store.uri}")


@kopf.on.probe(id="reconcile")
def probe(memo: kopf.Memo, **_: Any) -> dict:
    """Liveness: fails when searches exist but none was reconciled for ``stale_after`` seconds."""
    op: Operator = memo.operator
    now = time.monotonic()
    age, event_age = now - op.health.last_reconcile, now - op.health.last_event
    if len(op.loops) and age > op.config.stale_after:
        raise RuntimeError(f"no reconcile for {age:.0f}s with {len(op.loops)} search(es) active")
    return {"searches": len(op.loops), "secondsSinceReconcile": round(age, 1),
            "secondsSinceEvent": round(event_age, 1)}
