"""Start, wait for and stop a real SGLang server process with CPU-sane defaults."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvsqueeze.errors import KvsqueezeError

# float32: --dtype auto picks float16, the slowest dtype on this CPU. A bounded pool: without
# --max-total-tokens SGLang takes ~70% of RAM and needs ~70 s to start.
CPU_DEFAULTS = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    "--dtype": "float32",
    "--max-total-tokens": "32768",
}


READY_LINE = "The server is fired up and ready to roll!"


def cpu_defaults() -> dict[str, str]:
    """The CPU defaults where no CUDA device is present; none on a GPU machine (SGLang's own apply)."""
    import torch

    return {} if torch.cuda.is_available() else dict(CPU_DEFAULTS)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def has_flag(args: list[str], flag: str) -> bool:
    """Whether ``flag`` is in ``args`` (``--flag``, ``--flag V`` or ``--flag=V``)."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag V`` or ``--flag=V``; the last one wins), or None."""
    out = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            out = args[i + 1]
        elif a.startswith(flag + "="):
            out = a.split("=", 1)[1]
    return out


@dataclass
class SGLangServer:
    """A SGLang server subprocess in its own process group (so that stopping it stops its children)."""

    model: Path
    host: str = "127.0.0.1"
    port: int = 30000
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "kvsqueeze.backends.sglang.launch",
               "--model-path", str(self.model), "--host", self.host, "--port", str(self.port)]
        for flag, value in cpu_defaults().items():
            if not has_flag(self.extra_args, flag):
                cmd += [flag, value]
        return cmd + list(self.extra_args)

    def start(self) -> None:
        if not port_is_free(self.host, self.port):
            raise KvsqueezeError(
                f"--port={self.port}: already in use on {self.host}; expected a free port "
                "(pick another with --port, or --port 0 for any free one)"
            )
        env = dict(os.environ)
        env.setdefault("SGLANG_PLUGINS", "kvsqueeze")
        env.update(self.env)
        out = open(self.log_path, "ab") if self.log_path else None
        self._log_start = out.tell() if out else 0  # the log may hold earlier runs: read past them
        self.proc = subprocess.Popen(
            self.command(), env=env, stdout=out or None, stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 300.0, progress=None) -> None:
        """Poll ``/health_generate``-free ``/health`` until the server answers or dies."""
        import urllib.error
        import urllib.request

        assert self.proc is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                where = f"; its log is {self.log_path}" if self.log_path else ""
                raise KvsqueezeError(f"the SGLang server exited with code {self.proc.returncode} "
                                     f"while starting{where}")
            try:
                with urllib.request.urlopen(self.url + "/model_info", timeout=2) as r:
                    if r.status == 200 and self._warmed_up():
                        return
            except (urllib.error.URLError, OSError):
                pass
            if progress:
                progress(time.monotonic() - t0)
            time.sleep(1.0)
        self.stop()
        raise KvsqueezeError(f"the SGLang server did not answer at {self.url} within {timeout:.0f} s")

    def _warmed_up(self) -> bool:
        """SGLang answers ``/model_info`` before its own warmup request is served; a burst sent then
        queues that request behind it, and SGLang kills itself when it waits 600 s. With a log, wait
        for the line SGLang prints after its warmup."""
        if not self.log_path:
            return True
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(getattr(self, "_log_start", 0))
                return READY_LINE.encode() in fh.read()
        except OSError:
            return False

    def stop(self, grace: float = 15.0) -> None:
        """SIGINT to the whole process group, then SIGKILL to whatever is left after ``grace``."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            t0 = time.monotonic()
            while time.monotonic() - t0 < wait:
                if self.proc.poll() is not None and not _group_alive(pgid):
                    self.proc = None
                    return
                time.sleep(0.2)
        self.proc = None

    def start_and_wait(self, timeout: float = 300.0, progress=None) -> "SGLangServer":
        """Start and wait until it answers; on failure stop it and raise with the log's tail."""
        self.start()
        try:
            self.wait_ready(timeout=timeout, progress=progress)
        except BaseException as e:
            self.stop()
            if self.log_path and Path(self.log_path).exists() and isinstance(e, KvsqueezeError):
                tail = Path(self.log_path).read_text(errors="replace")[-3000:]
                raise KvsqueezeError(f"{e}\n--- last lines of {self.log_path} ---\n{tail}") from e
            raise
        return self

    def __enter__(self) -> "SGLangServer":
        return self.start_and_wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def post_json(url: str, payload: dict, timeout: float = 3600) -> dict:
    """POST ``payload`` as JSON to a server endpoint and return the decoded JSON answer."""
    import json
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def generate_burst(url: str, prompts: list[list[int]], max_new: int, name: str = "", every: int = 8,
                   log=None) -> tuple[list[dict], float]:
    """Send every prompt to ``/generate`` at once (greedy, ``ignore_eos``), one thread each; returns
    the answers in prompt order (``{"error": ...}`` for a failed request: a result, not a crash) and
    the wall time. Progress is logged every ``every`` answers."""
    from concurrent.futures import ThreadPoolExecutor

    log = log or (lambda msg: print(msg, flush=True))
    t0 = time.monotonic()
    done = [0]

    def one(ids):
        try:
            out = post_json(url.rstrip("/") + "/generate", {"input_ids": ids, "sampling_params": {
                "max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}})
        except Exception as e:  # noqa: BLE001 - reported per request
            return {"error": repr(e)}
        done[0] += 1
        if done[0] % every == 0:
            log(f"[{name}] {done[0]}/{len(prompts)} done after {time.monotonic() - t0:.0f}s")
        return out

    with ThreadPoolExecutor(max(1, len(prompts))) as ex:
        outs = list(ex.map(one, prompts))
    return outs, time.monotonic() - t0
