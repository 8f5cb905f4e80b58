"""Fixtures of the multi-process tests: real etcd and NATS (their URLs in ETCD_ENDPOINTS and
NATS_SERVER) and the `dynamix` binary (DYNAMIX_BIN). `cargo nextest run` (tests/python_sdk.rs) starts
the servers, sets these variables and DYNAMIX_SDK_REQUIRE_INFRA=1, so there a missing piece fails the
run instead of skipping the tests."""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import json

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _need(names):
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        message = f"set {', '.join(missing)} (tests/python_sdk.rs does) to run the multi-process tests"
        if os.environ.get("DYNAMIX_SDK_REQUIRE_INFRA") == "1":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process whose output goes to a log file, printed when a test fails."""

    def __init__(self, name, args, env, logs):
        self.name = name
        self.log_path = os.path.join(logs, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=HERE)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for_output(self, text, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.output()}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not print {text!r} in {timeout} s:\n{self.output()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def cluster(tmp_path, request):
    """etcd, NATS, and a way to start workers and a `dynamix frontend` against them."""
    _need(["ETCD_ENDPOINTS", "NATS_SERVER", "DYNAMIX_BIN"])
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = []
    # Each test gets its own namespace, so tests never see each other's workers.
    namespace = "sdk" + request.node.name.replace("_", "")[-12:].lower()

    class Cluster:
        ns = namespace
        env = dict(os.environ, DYN_NAMESPACE=namespace,
                   DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS="0",
                   DYN_DISTRIBUTED__LEASE_TTL_SECS="3", DYN_LOG="info",
                   ENDPOINT=f"{namespace}.backend.generate")

        def spawn(self, name, args, **env):
            process = Process(name, args, dict(self.env, **env), str(logs))
            processes.append(process)
            return process

        def worker(self, name, script, *args, compat=False, **env):
            runner = [sys.executable, "-m", "dynamix.compat"] if compat else [sys.executable]
            return self.spawn(name, runner + [os.path.join(HERE, "workers", script), *args], **env)

        def frontend(self, *extra):
            port = free_port()
            process = self.spawn("frontend", [
                os.environ["DYNAMIX_BIN"], "frontend", "--config", _repo("configs/frontend.toml"),
                "--http-host", "127.0.0.1", "--http-port", str(port),
                "--router-mode", "round-robin", *extra,
            ], DYN_NAMESPACE=namespace)
            process.base = f"http://127.0.0.1:{port}"
            return process

    yield Cluster()
    failed = getattr(request.node, "failed", False)
    for process in processes:
        process.stop()
        if failed:
            print(f"----- {process.name} -----\n{process.output()[-20000:]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.failed = True


def _repo(path: str) -> str:
    return os.path.normpath(os.path.join(HERE, "..", "..", path))


def get_json(url: str, timeout: float = 5):
    """The JSON body of a GET, whatever its status (/health answers 503 with a body)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def wait_for_model(base: str, model: str, present: bool = True, timeout: float = 60):
    deadline = time.time() + timeout
    listed = None
    while time.time() < deadline:
        try:
            listed = [m["id"] for m in get_json(f"{base}/v1/models")["data"]]
            if (model in listed) == present:
                return listed
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{model} {'never appeared in' if present else 'stayed in'} "
                         f"/v1/models within {timeout} s (last: {listed})")
