"""The machinery of the end-to-end check (scripts/e2e.py): processes and the services it starts and always stops,
and headless Chromium driven over the DevTools protocol (the alert webhook is scripts/alert_receiver.py)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1400,1100",
]
PNG_DATA_URL = "data:image/png;base64,"


class E2EError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- processes


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below pid, including those that moved to a session of their own (flow runs do)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Service:
    """A command in its own process group, output to a log file; stop() ends it and everything below it."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path):
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 15) -> None:
        if self._log.closed:  # already stopped
            return
        pids = descendants(self.proc.pid)
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        for pid in [self.proc.pid, *pids, *descendants(self.proc.pid)]:
            _signal(pid, signal.SIGKILL)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)
        self._log.close()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_cli(cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> None:
    with open(log_path, "wb") as out:
        try:
            rc = subprocess.run(
                cmd,
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise E2EError(f"`{' '.join(cmd[1:])}` failed ({rc}); see {log_path}:\n{tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(server: Service, api_url: str, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if not server.alive():
            raise E2EError(f"prefect server exited during start-up:\n{server.tail()}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as reply:
                if reply.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1)
    raise E2EError(f"prefect server not healthy after {timeout_s:.0f}s:\n{server.tail()}")


# ---------------------------------------------------------------------------------------------- chromium


def ensure_chromium() -> str:
    """The system Chromium; Debian's package is installed (as root) when it is missing."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if os.geteuid() != 0:
        raise E2EError("chromium is not installed and this is not root: run `sudo apt-get install -y chromium`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    log("chromium missing: apt-get install chromium")
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, timeout=600, check=True)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, timeout=900, check=True)
    if path := shutil.which("chromium"):
        return path
    raise E2EError("apt-get installed chromium but no `chromium` command is on PATH")


class Browser:
    """Headless Chromium driven over the DevTools protocol: real waiting on the DOM instead of fixed sleeps."""

    def __init__(self, executable: str, profile: Path, log_path: Path, env: dict[str, str]):
        from websockets.sync.client import connect

        self.service = Service(
            "chromium",
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            env,
            log_path,
        )
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if not self.service.alive() or time.monotonic() > deadline:
                raise E2EError(f"chromium did not open its DevTools port:\n{self.service.tail()}")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            page = next(t for t in json.load(reply) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20)
        self._id = 0

    def call(self, method: str, **params: Any) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise E2EError(f"chromium {method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def open(self, url: str, ready: str, timeout_s: float = 60) -> Any:
        """Navigate and wait until the JS expression `ready` is truthy; returns its value."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
            value = self.evaluate(f"(() => {{ try {{ return {ready}; }} catch (e) {{ return null; }} }})()")
            if value:
                return value
        return None

    def save(self, out: Path, stem: str, settle_s: float = 15) -> Path:
        """Screenshot (PNG) and rendered DOM (HTML) of the current page, once it has stopped changing: the
        run graph is drawn a few seconds after the DOM is ready."""
        shots, deadline = [], time.monotonic() + settle_s
        while len(shots) < 3 or len(set(shots[-3:])) > 1:
            if time.monotonic() > deadline:
                break
            time.sleep(1)
            shots.append(self.call("Page.captureScreenshot", format="png")["data"])
        png = out / f"{stem}.png"
        png.write_bytes(base64.b64decode(shots[-1]))
        (out / f"{stem}.html").write_text(self.evaluate("document.documentElement.outerHTML") or "")
        return png

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.service.stop(grace_s=5)


def png_size(data_url: str) -> tuple[int, int]:
    raw = base64.b64decode(data_url[len(PNG_DATA_URL) :][:64] + "==", validate=False)
    if raw[:8] != b"\x89PNG\r\n\x1a\n":
        raise E2EError("plot artifact holds a data URL that is not a PNG")
    return struct.unpack(">II", raw[16:24])
