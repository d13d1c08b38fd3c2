"""S3 credentials end to end, against an S3 that checks them (moto with IAM authentication on).

The store refuses unsigned requests, unknown key ids (InvalidAccessKeyId) and wrong secrets
(SignatureDoesNotMatch). The pod runner injects nothing and the operator's own AWS_* variables are
wrong on purpose, so the only way to the store is the Secret named by ``spec.s3.secretRef``: the
operator reads it, and the Jobs it renders reference it (secretKeyRef). Then:

* wrong Secret keys (a key name the Secret lacks; values S3 refuses): the search fails with a
  condition naming the Secret and the key, no Job is created, the operator backs off (no retry storm),
  and fixing the Secret resumes the search;
* the Secret is rotated mid-search (the old key revoked at S3, during an S3 outage too): the next Jobs
  get the new key and the search succeeds;
* on every path the operator log, the pod logs, the status, the Events, the Jobs and every object in
  the store are scanned for the secret key, the access key id and their base64 forms.
"""

from __future__ import annotations

import base64
import json
import re
import time

from tests.conftest import tiny_spec_dict
from tests.k8s._helpers import (
    SECRET_NAME,
    apply_search,
    cond,
    get_ps,
    manifest,
    start_operator,
    wait_phase,
)
from tests.support.cluster import wait_for


def _patterns(*pairs: tuple[str, str]) -> dict[str, str]:
    """What a leak of each key pair looks like: the values, and their base64 forms (as in Secret data)."""
    out = {}
    for key_id, secret in pairs:
        for what, value in (("access key id", key_id), ("secret key", secret)):
            out[value] = what
            out[base64.b64encode(value.encode()).decode()] = f"base64 {what}"
            out[base64.urlsafe_b64encode(value.encode()).decode()] = f"base64url {what}"
    return out


def _leaks(sources: dict[str, str | bytes], patterns: dict[str, str]) -> list[str]:
    found = []
    for where, text in sources.items():
        for pattern, what in patterns.items():
            needle = pattern.encode() if isinstance(text, bytes) else pattern
            if needle in text:
                found.append(f"{what} in {where}")
    return found


def _sources(op, k8s, namespace, pod_runner, s3, name: str) -> dict[str, str | bytes]:
    out: dict[str, str | bytes] = {
        "operator log": op.output,
        "status": json.dumps(get_ps(k8s, namespace, name).get("status") or {}),
        "events": json.dumps(k8s.events(namespace)),
        "jobs": json.dumps(k8s.jobs(namespace)),
        "pod logs": "".join(p.read_log() for p in pod_runner.runs),
    }
    client = s3.client()
    for key in s3.list_keys(s3.bucket):
        out[f"s3://{s3.bucket}/{key}"] = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    return out


def _secret(k8s, namespace, name, data: dict[str, str]) -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    if k8s.core.list_namespaced_secret(namespace, field_selector=f"metadata.name={name}").items:
        k8s.core.replace_namespaced_secret(name, namespace, body)
    else:
        k8s.core.create_namespaced_secret(namespace, body)


def _failed_reconciles(op, namespace, name) -> int:
    return len(re.findall(rf"reconcile of {re.escape(namespace)}/{re.escape(name)} failed", op.output))


def test_wrong_secret_keys_fail_with_a_named_condition_no_storm_and_no_leak(kubectl, k8s, namespace, s3_auth,
                                                                           pod_runner, run_operator, pod_assets):
    s3 = s3_auth
    op, _ = start_operator(kubectl, k8s, namespace, s3, run_operator)
    small = {"search": {**tiny_spec_dict(pod_assets, "x")["search"], "generations": 1}}

    # 1. the secretRef names a key the Secret does not have
    body = manifest("nokey", pod_assets, s3, **small)
    body["spec"]["s3"]["secretRef"]["accessKeyIdKey"] = "access-key"
    apply_search(kubectl, body, namespace)
    ps = wait_phase(k8s, namespace, "nokey", ("Failed",), op, pod_runner, timeout=60)
    invalid = cond(ps, "Invalid")
    assert (invalid["status"], invalid["reason"]) == ("True", "CredentialsInvalid"), ps["status"]
    assert f"Secret {namespace}/{SECRET_NAME} has no key 'access-key'" in invalid["message"], invalid
    assert cond(ps, "Failed")["reason"] == "CredentialsInvalid"

    # no retry storm: the loop backs off (1, 2, 4, 8 s ...), one Warning Event per distinct message, no Job
    t0, before = time.monotonic(), _failed_reconciles(op, namespace, "nokey")
    time.sleep(10)
    during = _failed_reconciles(op, namespace, "nokey") - before
    assert 1 <= during <= 4, f"{during} failed reconciles in {time.monotonic() - t0:.1f} s"
    warnings = [e for e in k8s.events(namespace, "nokey") if e["reason"] == "StoreUnavailable"]
    assert len(warnings) == 1 and "has no key 'access-key'" in warnings[0]["message"], warnings
    assert not k8s.jobs(namespace), [j["metadata"]["name"] for j in k8s.jobs(namespace)]

    # 2. the keys exist but S3 refuses their values (a wrong secret for a real key id)
    _secret(k8s, namespace, "wrong-values", {"AWS_ACCESS_KEY_ID": s3.access_key,
                                             "AWS_SECRET_ACCESS_KEY": "not-" + s3.secret_key[4:]})
    body = manifest("badval", pod_assets, s3, **small)
    body["spec"]["s3"]["secretRef"]["name"] = "wrong-values"
    apply_search(kubectl, body, namespace)
    ps = wait_phase(k8s, namespace, "badval", ("Failed",), op, pod_runner, timeout=60)
    invalid = cond(ps, "Invalid")
    assert invalid["reason"] == "CredentialsInvalid", ps["status"]
    prefix = (f"S3 refused the credentials of Secret {namespace}/wrong-values (keys 'AWS_ACCESS_KEY_ID', "
              f"'AWS_SECRET_ACCESS_KEY'; spec.s3.secretRef): ")
    assert invalid["message"] in (prefix + "SignatureDoesNotMatch", prefix + "HTTP 403 Forbidden"), invalid
    assert not [j for j in k8s.jobs(namespace) if j["metadata"]["name"].startswith("badval-")]

    # 3. fixing the Secret is enough: the search resumes and creates its first Job with the Secret's key
    _secret(k8s, namespace, "wrong-values", {"AWS_ACCESS_KEY_ID": s3.access_key,
                                             "AWS_SECRET_ACCESS_KEY": s3.secret_key})
    wait_for(lambda: [p for p in pod_runner.runs if p.job.startswith("badval-database")], 60,
             "the first Job's pod after the fix")
    ps = get_ps(k8s, namespace, "badval")
    assert cond(ps, "Invalid")["status"] == "False" and ps["status"]["phase"] in ("Running", "Pending"), ps["status"]
    kubectl("patch", "psearch", "badval", "--type=merge", "-p", '{"spec":{"suspend":true}}', "-n", namespace)
    wait_phase(k8s, namespace, "badval", ("Suspended",), op, pod_runner, timeout=60)
    pod = next(p for p in pod_runner.runs if p.job.startswith("badval-database"))
    assert pod.env["AWS_ACCESS_KEY_ID"] == s3.access_key and pod.env["AWS_SECRET_ACCESS_KEY"] == s3.secret_key

    # the failure path leaks nothing (the wrong secret neither)
    sources = {**_sources(op, k8s, namespace, pod_runner, s3, "nokey"),
               "status badval": json.dumps(get_ps(k8s, namespace, "badval").get("status") or {})}
    patterns = _patterns((s3.access_key, s3.secret_key), (s3.access_key, "not-" + s3.secret_key[4:]))
    b64 = base64.b64encode(s3.secret_key.encode()).decode()
    assert len(sources) >= 6 and {s3.access_key, s3.secret_key, b64, "not-" + s3.secret_key[4:]} <= set(patterns)
    assert not _leaks(sources, patterns)


def test_secret_rotated_mid_search_through_an_outage_next_jobs_use_the_new_key(kubectl, k8s, namespace, s3_auth,
                                                                               pod_runner, run_operator, pod_assets):
    s3 = s3_auth
    op, _ = start_operator(kubectl, k8s, namespace, s3, run_operator)
    old = (s3.access_key, s3.secret_key)
    small = {"search": {**tiny_spec_dict(pod_assets, "x")["search"], "generations": 1}}
    apply_search(kubectl, manifest("rot", pod_assets, s3, **small), namespace)

    # the database Job ran with the first key; then the Secret gets a new key and the old one is revoked
    wait_for(lambda: any(p.job.startswith("rot-database") and p.state == "succeeded" for p in pod_runner.runs),
             300, "the database Job done")
    new = s3.create_access_key()
    _secret(k8s, namespace, SECRET_NAME, {"AWS_ACCESS_KEY_ID": new[0], "AWS_SECRET_ACCESS_KEY": new[1]})
    rotated_at = len(pod_runner.runs)
    # once a pod started after the rotation runs, the old key is revoked at S3: from then on it works for
    # nobody (the operator's cached copy included)
    wait_for(lambda: [p for p in pod_runner.runs[rotated_at:] if p.state in ("running", "succeeded")], 300,
             "a pod started after the rotation")
    s3.delete_access_key(old[0], signed_with=new)
    s3.access_key, s3.secret_key = new  # the test's own client (listing the store below)
    outage = s3.outage_for(5, "refuse")  # ... and the store goes away for a while right after
    ps = wait_phase(k8s, namespace, "rot", ("Succeeded", "Failed"), op, pod_runner, timeout=600)
    outage.join()
    assert ps["status"]["phase"] == "Succeeded", json.dumps(ps["status"], indent=1)

    before, after = pod_runner.runs[:rotated_at], pod_runner.runs[rotated_at:]
    # the database pod had the old key; every pod created after the rotation the new one (only from the Secret)
    assert {p.env["AWS_ACCESS_KEY_ID"] for p in before if p.job.startswith("rot-database")} == {old[0]}
    assert len(after) >= 4 and {p.env["AWS_ACCESS_KEY_ID"] for p in after} == {new[0]}, [p.name for p in after]
    assert {p.env["AWS_SECRET_ACCESS_KEY"] for p in after} == {new[1]}
    assert {j["metadata"]["name"].split("-")[1] for j in k8s.jobs(namespace)} >= {
        "database", "generation", "posttrain", "export", "evaluate"}

    sources = _sources(op, k8s, namespace, pod_runner, s3, "rot")
    assert len(sources) >= 5 + 30, list(sources)  # the store's objects are scanned too
    assert not _leaks(sources, _patterns(old, new))
