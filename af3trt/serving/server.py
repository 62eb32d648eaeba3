"""Find and run `tritonserver` on a model repository: bind, wait until ready, shut down cleanly.

Where the binary comes from (`find_tritonserver`): `tritonserver` on PATH (an NVIDIA Triton
container: backends in /opt/tritonserver/backends), else the binary shipped in the `nvidia-pytriton`
wheel, whose python backend needs the stub built for this interpreter's Python version copied into
`backends/python/` (reference/triton-cpu.md). Python models run in the interpreter environment of
the calling process: its `bin/` goes first on PATH and VIRTUAL_ENV names it, so start the server
from the serving venv (made with the system python3.11 for the pytriton stub; numpy < 2).

    with start_server("repo") as server:        # free ports on 127.0.0.1, waits for readiness
        print(server.http_url, server.grpc_url)
    serve("repo", http_port=8000, grpc_port=8001) # blocks until Ctrl-C / SIGTERM
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..build.triton_spec import check_writer
from ..errors import MissingInputError, UserError
from .launch import check_server_trtllm, installed_trtllm, launch_argv, read_launch

DEFAULT_HOST = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT_S = 300.0  # python models import torch/transformers; a slow CPU takes a while
STOP_TIMEOUT_S = 30.0  # = tritonserver's --exit-timeout-secs default; requests of clients that went away are
# cancelled (af3 + python LLM), so they no longer hold a shutdown to this limit. Known tritonserver behaviour
# (nvidia-pytriton 0.7.0): a gRPC stream cancelled just as its request ends (e.g. a client killed right after
# an error answer) keeps af3 and ensemble loaded until this timeout; stop() then kills the process group.
CONTAINER_BACKENDS = Path("/opt/tritonserver/backends")


class TritonServerError(UserError, RuntimeError):
    """tritonserver could not be found, did not become ready, or exited."""


@dataclass(frozen=True)
class TritonBinary:
    """A runnable tritonserver: executable, its backend directory, extra library dir, where found."""

    executable: Path
    backend_dir: Path
    lib_dir: Path | None
    source: str


def _pytriton_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    return Path(pytriton.__file__).resolve().parent


def _install_stub(root: Path) -> Path:
    """Backend dir of the pytriton wheel with this Python's stub in backends/python/ (copied once).

    If the wheel's folder is read-only, the backends are copied to a private cache folder instead.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(
            f"expected the python backend stub for Python {version} at {stub}, found none "
            f"(nvidia-pytriton ships stubs for 3.8-3.13)"
        )
    backends = root / "tritonserver" / "backends"
    target = backends / "python" / "triton_python_backend_stub"
    if target.is_file() and target.stat().st_size == stub.stat().st_size:
        return backends
    try:
        shutil.copy2(stub, target)
        return backends
    except OSError:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "af3trt" / f"triton-backends-{version}"
        if not (cache / "python" / "triton_python_backend_stub").is_file():
            shutil.copytree(backends, cache, dirs_exist_ok=True)
            shutil.copy2(stub, cache / "python" / "triton_python_backend_stub")
        return cache


def find_tritonserver() -> TritonBinary:
    """`tritonserver` on PATH (container layout), else the one in the nvidia-pytriton wheel."""
    on_path = shutil.which("tritonserver")
    if on_path:
        exe = Path(on_path).resolve()
        local = exe.parent.parent / "backends"
        backend_dir = local if local.is_dir() else CONTAINER_BACKENDS
        return TritonBinary(exe, backend_dir, None, "PATH")
    root = _pytriton_root()
    if root is None:
        raise TritonServerError(
            "expected `tritonserver` on PATH or the nvidia-pytriton wheel, found neither: "
            "pip install 'af3trt[triton]' (nvidia-pytriton, numpy<2) or use an NVIDIA Triton container"
        )
    exe = root / "tritonserver" / "bin" / "tritonserver"
    if not exe.is_file():
        raise TritonServerError(f"expected the tritonserver binary at {exe}, found none")
    _check_python_env()
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonBinary(exe, _install_stub(root), libs if libs.is_dir() else None, "nvidia-pytriton")


def _check_python_env() -> None:
    """The two traps of the pytriton python backend (reference/triton-cpu.md), caught before starting."""
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise TritonServerError(f"expected numpy < 2 in the serving environment (the python backend's BYTES "
                                f"tensors break on numpy 2), got numpy {numpy.__version__}")
    if not sys.base_prefix.startswith("/usr"):
        warnings.warn(f"the pytriton stub links the system libpython{sys.version_info.major}."
                      f"{sys.version_info.minor}; this environment is based on {sys.base_prefix}: if python models "
                      f"fail with `undefined symbol`, make the venv with /usr/bin/python3 -m venv", stacklevel=3)


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_ports_free(host: str, ports: dict[str, int | None]) -> None:
    """Refuse to start when another process listens on one of `ports` ({"HTTP": 8000, ...}; None = unused).

    Bound with SO_REUSEADDR as tritonserver binds, so only a listening socket counts as taken."""
    taken = []
    for name, port in ports.items():
        if port is None:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                taken.append(f"{name} {host}:{port} ({exc.strerror})")
    if taken:
        raise TritonServerError(f"expected free ports for tritonserver, got {', '.join(taken)}: another server "
                                f"listens there; stop it or pick other ports (--http-port, --grpc-port, --metrics-port)")


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP `port` (Linux /proc/net/tcp{,6}); None where /proc has no such table."""
    found, tables = set(), [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not any(t.is_file() for t in tables):
        return None
    for table in tables:
        if not table.is_file():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(fields[9])
    return found


def owns_port(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds the socket listening on TCP `port`; None where /proc cannot tell."""
    listening = _listening_inodes(port)
    fd_dir = Path(f"/proc/{pid}/fd")
    if listening is None or not fd_dir.is_dir():
        return None
    held = set()
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            held.add(target[len("socket:["):-1])
    return bool(listening & held)


def server_env(binary: TritonBinary) -> dict[str, str]:
    """Environment for tritonserver: this interpreter's env first on PATH, pytriton's libraries found."""
    env = dict(os.environ)
    prefix = Path(sys.prefix)
    env["PATH"] = f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = str(prefix)
    if binary.lib_dir is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (env.get("LD_LIBRARY_PATH"), str(binary.lib_dir)) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class TritonServer:
    """A running tritonserver process (a context manager: leaving the block stops it)."""

    process: subprocess.Popen
    repo: Path
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int | None
    log_path: Path | None = None
    binary: TritonBinary | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        """The error lines of the server log (glog `E...` and `error:`), then its last `chars` characters."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace")
        errors = [line for line in text.splitlines() if re.match(r"E\d{4} |error: ", line)
                  and "CudaDriverHelper" not in line][:20]
        return "errors:\n" + "\n".join(errors) + "\n...\n" + text[-chars:] if errors else text[-chars:]

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> "TritonServer":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise TritonServerError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready "
                    f"(repository {self.repo}); log tail:\n{self.log_tail()}"
                )
            if self.is_ready():
                return self._check_owned()
            time.sleep(0.5)
        self.stop()
        raise TritonServerError(
            f"expected tritonserver ready within {timeout_s:.0f} s, got not ready (repository {self.repo}); "
            f"log tail:\n{self.log_tail()}"
        )

    def _check_owned(self) -> "TritonServer":
        """The ready server must be this process: another one on the same ports would answer too."""
        for name, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port)):
            if owns_port(self.process.pid, port) is False:
                self.stop()
                raise TritonServerError(f"expected this tritonserver (pid {self.process.pid}) listening on {name} "
                                        f"{self.host}:{port}, got another process answering there")
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGINT (Triton unloads models and exits), then SIGKILL of its process group after `timeout_s`."""
        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)  # the group holds the python backend stubs
                except ProcessLookupError:  # not a group leader: a process af3trt did not start itself
                    self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def server_args(binary: TritonBinary, repo: Path, host: str, http_port: int, grpc_port: int,
                metrics_port: int | None, extra_args: tuple[str, ...] = ()) -> list[str]:
    """The tritonserver argv. The python backend's shared-memory names get a unique prefix so that
    several servers on one machine do not collide."""
    args = [
        str(binary.executable), f"--model-repository={repo}", f"--backend-directory={binary.backend_dir}",
        f"--http-address={host}", f"--grpc-address={host}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
        f"--backend-config=python,shm-region-prefix-name=af3trt_{os.getpid()}_{uuid.uuid4().hex[:8]}",
    ]
    if metrics_port is None:
        args.append("--allow-metrics=false")
    else:
        args += [f"--metrics-address={host}", f"--metrics-port={metrics_port}"]
    return args + list(extra_args)


def _check_repo(repo: str | os.PathLike) -> Path:
    repo = Path(repo).resolve()
    if not repo.is_dir() or not any(repo.glob("*/config.pbtxt")):
        raise MissingInputError(f"expected a Triton model repository (folders with config.pbtxt) at {repo}, found none")
    check_writer(repo)  # one of another af3trt: "regenerate it with `af3trt triton`"
    return repo


def start_server(repo: str | os.PathLike, *, host: str = DEFAULT_HOST, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None,
                 startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S, log_path: str | os.PathLike | None = None,
                 extra_args: tuple[str, ...] = (), wait: bool = True) -> TritonServer:
    """Start tritonserver on `repo`, bound to `host` (127.0.0.1 by default); ports None = free ports
    (metrics off). Waits until every model is ready (unless wait=False). Log: `log_path` or a temp file."""
    repo = _check_repo(repo)
    binary = find_tritonserver()
    check_ports_free(host, {"HTTP": http_port, "gRPC": grpc_port, "metrics": metrics_port})
    http_port = http_port or free_port(host)
    grpc_port = grpc_port or free_port(host)
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    argv = server_args(binary, repo, host, http_port, grpc_port, metrics_port, tuple(extra_args))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=server_env(binary),
                                start_new_session=True)
    server = TritonServer(proc, repo, host, http_port, grpc_port, metrics_port, log_path, binary)
    return server.wait_ready(startup_timeout_s) if wait else server


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def serve(repo: str | os.PathLike, *, host: str = DEFAULT_HOST, http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int | None = 8002, startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
          extra_args: tuple[str, ...] = ()) -> int:
    """`af3trt serve`: run tritonserver in the foreground (its log on this terminal) until Ctrl-C or
    SIGTERM, then shut it down cleanly. Returns the server's exit code."""
    repo = _check_repo(repo)
    binary = find_tritonserver()
    spec = read_launch(repo)  # TP/PP > 1: one rank per GPU under mpirun; GPU 0's memory pool
    check_server_trtllm(spec, installed_trtllm())
    if spec.world_size > 1 and shutil.which("mpirun") is None:
        raise TritonServerError(f"expected mpirun on PATH for the engine's {spec.world_size} ranks (the NGC Triton "
                                f"TensorRT-LLM containers ship it), found none")
    check_ports_free(host, {"HTTP": http_port, "gRPC": grpc_port, "metrics": metrics_port})
    argv = launch_argv(server_args(binary, repo, host, http_port, grpc_port, metrics_port, tuple(extra_args)), spec)
    proc = subprocess.Popen(argv, env=server_env(binary), start_new_session=True)
    server = TritonServer(proc, repo, host, http_port, grpc_port, metrics_port, None, binary)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # stop outside the handler, like Ctrl-C
    try:
        server.wait_ready(startup_timeout_s)
        print(f"af3trt serve: ready; HTTP {server.http_url}, gRPC {server.grpc_url} (repository {repo})", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return server.stop()
    finally:
        if server.alive():
            server.stop()
        signal.signal(signal.SIGTERM, previous)
