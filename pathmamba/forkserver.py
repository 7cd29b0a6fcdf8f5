"""A warm start for many short jobs: one process imports torch and the project once and forks a child
for each ``python -m pathmamba`` call that reaches it.

Why: on a CPU the demo's jobs train for seconds, but a fresh ``python -m pathmamba`` spends about 2.5 s
importing torch, the models and ``torch._dynamo`` (which every ``torch.optim`` optimizer imports) before
its first step, and the demo starts 168 of them. A forked child starts with those imports done.

How: for a local CPU run of one thread per job whose config says ``forkserver: true``, the workflow
starts a server (:func:`start_for_jobs`, from ``workflow/rules/common.smk``; when it cannot, the run goes
on without it) and puts its socket's path in ``PATHMAMBA_FORKSERVER``. ``python -m pathmamba`` then sends the server its arguments, working folder,
environment and standard streams (their file descriptors, over the Unix socket); the server forks, and
the child runs :func:`pathmamba.cli.main` as the process itself would have, writing to the caller's
streams. The caller waits for the child's exit status and exits with it; SIGINT, SIGTERM and SIGHUP it
receives are passed on to the child's process group, and the server stops a child whose caller is gone.

A call is forked only where a fresh process would start the same: the same Python (executable, prefix,
version, ``sys.path``), the same environment apart from :data:`PER_SHELL_VARIABLES`, and unchanged project
sources (size and modification time of every ``pathmamba``/``baselines`` module the server imported; on
a change the server refuses and exits). Otherwise, or where the server cannot be reached, the call says
why on stderr and runs in its own process as usual: the same result, a slower start.

The server is single-threaded (a fork from a threaded process can deadlock the child on a lock another
thread held: hence one thread per job, for which torch starts no thread pool) and never initialises CUDA,
so that a child may. It ends with the process that started it, however that ends, and removes its
socket's folder. Imports nothing heavy itself: the caller
side runs before torch is imported.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

#: The environment variable naming the server's socket; unset, every call starts its own process.
SOCKET_VARIABLE = "PATHMAMBA_FORKSERVER"

#: Set by the shell or by Snakemake per job, and read by nothing a job imports at start-up: these may
#: differ between a call and the server. The temporary folder is looked up again in the child.
PER_SHELL_VARIABLES = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "TMPDIR", "TMP", "TEMP", "TEMPDIR", SOCKET_VARIABLE})

#: The thread-count variables Snakemake sets for each job to its ``threads`` (snakemake/shell.py); the
#: server gets the same so that BLAS and OpenMP, which read them when loaded, start alike.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

#: What a job imports before its first step, besides the registered methods' modules. torch._dynamo:
#: every torch.optim optimizer imports it in its __init__ (1.3 s here).
PRELOAD = ("torch", "torch._dynamo", "pathmamba.cli", "pathmamba.engine.train", "pathmamba.engine.evaluate",
           "pathmamba.engine.pseudo_masks", "scipy.ndimage", "sklearn.cluster")

#: Packages whose imported modules are the project's sources, watched for changes.
PROJECT_PACKAGES = ("pathmamba", "baselines")

_STREAMS = (0, 1, 2)
# The server imports before it answers its first call (cold disk cache: tens of seconds).
_FIRST_ANSWER_TIMEOUT_S = 300.0


# --- the caller: `python -m pathmamba` ---------------------------------------------------------------------

#: What makes two processes the same Python: compared between a call and the server.
_IDENTITY_KEYS = ("executable", "prefix", "version", "path", "package")


def _identity() -> dict:
    import pathmamba

    values = (sys.executable, sys.prefix, sys.version, list(sys.path), pathmamba.__file__)
    return dict(zip(_IDENTITY_KEYS, values, strict=True))


def _notice(text: str) -> None:
    print(f"pathmamba: fork server not used ({text}); starting this process normally", file=sys.stderr,
          flush=True)


def _read_message(stream) -> dict | None:
    line = stream.readline()
    return json.loads(line) if line else None


def run_in_server(argv: list[str], socket_path: str) -> int | None:
    """Run ``python -m pathmamba <argv>`` in a child of the server at ``socket_path``; its exit status, or
    None (with a notice on stderr) when the server cannot run it and this process must."""
    open_streams = [fd for fd in _STREAMS if _is_open(fd)]
    request = {"argv": argv, "argv0": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ),
               "streams": open_streams, **_identity()}
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(socket_path)
        payload = json.dumps(request).encode()
        socket.send_fds(connection, [len(payload).to_bytes(4, "big") + payload], open_streams)
        connection.settimeout(_FIRST_ANSWER_TIMEOUT_S)
        replies = connection.makefile("r", encoding="utf-8")
        answer = _read_message(replies)
    except (OSError, ValueError) as error:
        connection.close()
        _notice(f"{socket_path}: {error}")
        return None
    if answer is None or "refused" in answer:
        connection.close()
        _notice(answer["refused"] if answer else f"{socket_path} closed the connection")
        return None
    return _wait_for_child(connection, replies, answer["pid"])


def _wait_for_child(connection: socket.socket, replies, pid: int) -> int:
    def pass_on(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, pass_on)
    connection.settimeout(None)
    answer = _read_message(replies)
    connection.close()
    if answer is None:
        pass_on(signal.SIGTERM, None)
        print(f"pathmamba: the fork server ended before its child {pid} did; stopped the child", file=sys.stderr)
        return 1
    status = answer["exit"]
    return 128 - status if status < 0 else status


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- the server ------------------------------------------------------------------------------------------

@dataclass
class _Child:
    pid: int
    pidfd: int
    connection: socket.socket
    argv: list[str]
    started: float = field(default_factory=time.monotonic)
    caller_gone: bool = False


def _log(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", file=sys.stderr, flush=True)


def _preload() -> dict[str, tuple[int, int]]:
    """Import what jobs import; (size, mtime) of every project source file imported."""
    import importlib

    from pathmamba.engine.registry import METHODS

    targets = [spec.target for spec in METHODS.values()]
    targets += [spec.stage1.target for spec in METHODS.values() if spec.stage1 is not None]
    for module in (*PRELOAD, *sorted({target.split(":")[0] for target in targets})):
        importlib.import_module(module)
    return _project_sources()


def _project_sources() -> dict[str, tuple[int, int]]:
    sources = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and name.split(".")[0] in PROJECT_PACKAGES:
            stat = os.stat(path)
            sources[path] = (stat.st_size, stat.st_mtime_ns)
    return sources


def _changed_sources(sources: dict[str, tuple[int, int]]) -> list[str]:
    changed = []
    for path, signature in sources.items():
        try:
            stat = os.stat(path)
        except OSError:
            changed.append(path)
            continue
        if (stat.st_size, stat.st_mtime_ns) != signature:
            changed.append(path)
    return changed


def _refusal(request: dict, identity: dict, environment: dict[str, str]) -> str | None:
    """Why a call must not be forked from this server, or None."""
    for key, value in identity.items():
        if request.get(key) != value:
            return f"its Python {key} is {request.get(key)!r}, the server's {value!r}"
    names = (set(request["env"]) | set(environment)) - PER_SHELL_VARIABLES
    differing = sorted(name for name in names if request["env"].get(name) != environment.get(name))
    if differing:
        return f"the environment differs from the server's in {', '.join(differing)}"
    return None


def _receive_request(connection: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _address = socket.recv_fds(connection, 1 << 16, len(_STREAMS))
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        more = connection.recv(1 << 16)
        if not more:
            raise ConnectionError("the caller closed the connection mid-request")
        data += more
    request = json.loads(data[4:4 + int.from_bytes(data[:4], "big")])
    missing = {"argv", "argv0", "cwd", "env", "streams", *_IDENTITY_KEYS} - set(request)
    if missing or len(fds) != len(request["streams"]):
        for fd in fds:
            os.close(fd)
        raise ValueError(f"a call without {', '.join(sorted(missing)) or 'its streams'}")
    return request, fds


def _caller_gone(connection: socket.socket) -> bool:
    readable, _, _ = select.select([connection], [], [], 0)
    return bool(readable) and not connection.recv(1, socket.MSG_PEEK)


def _send(connection: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        connection.sendall(json.dumps(message).encode() + b"\n")


def _run_child(request: dict, fds: list[int], inherited: list[int]) -> int:
    """In the forked child: become the caller's process and run its command; the exit status."""
    os.setpgid(0, 0)
    for fd in inherited:
        os.close(fd)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in zip(request["streams"], fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None
    logging.root.handlers.clear()  # the job's own logging set-up (cli.main) must take effect
    sys.argv = [request["argv0"], *request["argv"]]
    try:
        from pathmamba.cli import main

        status = main(request["argv"])
    except SystemExit as exit_request:
        status = exit_request.code
    except KeyboardInterrupt:
        traceback.print_exc()
        status = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - as the interpreter ends a process: the traceback, then status 1
        traceback.print_exc()
        status = 1
    if status is None:
        status = 0
    elif not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    return status


def _fork(request: dict, fds: list[int], connection: socket.socket, inherited: list[int]) -> _Child:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            status = _run_child(request, fds, inherited)
        finally:
            with contextlib.suppress(BaseException):
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
    with contextlib.suppress(OSError):  # also in the parent: killpg must find the group at once
        os.setpgid(pid, pid)
    for fd in fds:
        os.close(fd)
    return _Child(pid, os.pidfd_open(pid), connection, request["argv"])


def serve(socket_path: Path, idle_exit_s: float = 600.0, parent: int | None = None, own_folder: bool = False) -> int:
    """Answer calls at ``socket_path`` until SIGTERM/SIGINT/SIGHUP, the end of the process ``parent`` (by
    default the one that started it; SIGKILL too), a changed project source, or ``idle_exit_s`` without
    a call or a running child. Then the socket is removed, and with ``own_folder`` its folder (made for
    this server by :func:`start_server`; only if empty), so that nothing is left however the run ended."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(socket_path))  # bound before importing: callers wait in the backlog, not fall back
    except OSError:
        listener.close()
        if own_folder:
            with contextlib.suppress(OSError):
                socket_path.parent.rmdir()
        raise
    listener.listen(64)
    stop_signal: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: stop_signal.append(signum))
    parent = parent or os.getppid()
    # What a fresh process has before its imports, to compare calls with; what the imports then set in
    # the environment (torch sets some), to set again in each child over the caller's environment.
    identity, environment = _identity(), dict(os.environ)
    try:
        start = time.monotonic()
        sources = _preload()
        set_by_imports = {name: value for name, value in os.environ.items() if environment.get(name) != value}
        _log(f"ready in {time.monotonic() - start:.1f} s: {len(sys.modules)} modules, {len(sources)} project "
             f"files; set by the imports: {', '.join(sorted(set_by_imports)) or 'nothing'}")
        _answer_calls(listener, _Server(sources, identity, environment, set_by_imports), stop_signal, parent,
                      idle_exit_s)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        if own_folder:
            with contextlib.suppress(OSError):
                socket_path.parent.rmdir()
    return 0


@dataclass
class _Server:
    """What the server compares calls with, and gives its children."""

    sources: dict[str, tuple[int, int]]
    identity: dict
    environment: dict[str, str]
    set_by_imports: dict[str, str]


def _answer_calls(listener, server: _Server, stop_signal, parent, idle_exit_s) -> None:
    children: dict[int, _Child] = {}  # by pidfd
    last_call = time.monotonic()
    stopping = None
    while True:
        if stopping is None:
            if stop_signal:
                stopping = f"signal {stop_signal[0]}"
            elif os.getppid() != parent:
                stopping = "the process that started it ended"
            elif not children and time.monotonic() - last_call > idle_exit_s:
                stopping = f"no call for {idle_exit_s:.0f} s"
            if stopping is not None:
                _log(f"stopping: {stopping}; {len(children)} children still running are stopped")
                for child in children.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGTERM)
        if stopping is not None and not children:
            return
        waiting = [child.pidfd for child in children.values()]
        waiting += [child.connection for child in children.values() if not child.caller_gone]
        if stopping is None:
            waiting.append(listener)
        ready, _, _ = select.select(waiting, [], [], 1.0)
        for item in ready:
            if item is listener:
                last_call = time.monotonic()
                if _accept(listener, server, children) == _SOURCES_CHANGED:
                    stopping = "project sources changed"
                    _log(f"stopping: {stopping}; {len(children)} children still running may finish")
            elif isinstance(item, int):
                _reap(children.pop(item))
            else:
                child = next((child for child in children.values() if child.connection is item), None)
                if child is None:  # reaped earlier in this round: its connection is closed
                    continue
                child.caller_gone = True
                _log(f"caller of child {child.pid} is gone: stopping the child")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)


_SOURCES_CHANGED = "project sources changed since the server started"


def _accept(listener, server: _Server, children: dict[int, _Child]) -> str | None:
    """Answer one call by forking a child; why it was not forked, if it was not."""
    connection, _ = listener.accept()
    connection.settimeout(10.0)
    try:
        request, fds = _receive_request(connection)
    except (OSError, ValueError) as error:
        _log(f"unreadable call: {error}")
        connection.close()
        return str(error)
    changed = _changed_sources(server.sources)
    reason = _SOURCES_CHANGED if changed else _refusal(request, server.identity, server.environment)
    if reason is None and _caller_gone(connection):  # it gave up waiting for the server's imports
        reason = "the caller left before its answer"
    if reason is not None:
        detail = f"{reason}: {', '.join(changed)}" if changed else reason
        _log(f"refused {' '.join(request['argv'][:1])}: {detail}")
        for fd in fds:
            os.close(fd)
        _send(connection, {"refused": detail})
        connection.close()
        return reason
    connection.settimeout(None)
    request["env"] = {**request["env"], **server.set_by_imports}
    inherited = [listener.fileno(), connection.fileno()]
    for child in children.values():
        inherited += [child.pidfd, child.connection.fileno()]
    child = _fork(request, fds, connection, inherited)
    children[child.pidfd] = child
    _send(connection, {"pid": child.pid})
    return None


def _reap(child: _Child) -> None:
    _pid, status = os.waitpid(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os.close(child.pidfd)
    _send(child.connection, {"exit": code})
    child.connection.close()
    _log(f"child {child.pid} exit {code} after {time.monotonic() - child.started:.1f} s: {' '.join(child.argv[:1])}")


# --- starting and stopping it from the workflow ----------------------------------------------------------

@dataclass
class ServerHandle:
    """A running server: its process, its socket, and the folder made for the socket."""

    process: subprocess.Popen
    socket_path: Path
    folder: Path

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server (it stops its children), wait, and remove the socket folder it was given."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()


def job_environment(threads: int, pythonpath_entry: str) -> dict[str, str]:
    """The environment a job of the workflow gets: this one, with Snakemake's per-job thread counts and
    the Snakefile's PYTHONPATH entry first (workflow/rules/common.smk's shell prefix)."""
    environment = {name: value for name, value in os.environ.items() if name != SOCKET_VARIABLE}
    environment.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    existing = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = f"{pythonpath_entry}:{existing}" if existing else pythonpath_entry
    return environment


#: The longest path a Unix socket may have (Linux: 108 bytes with the terminating NUL).
SOCKET_PATH_LIMIT = 107
_FOLDER_PREFIX = "pathmamba-forkserver-"
#: mkdtemp's folder name: the prefix and 8 random characters; then the socket's name.
_SOCKET_SUFFIX_LENGTH = len(f"/{_FOLDER_PREFIX}12345678/socket")


def socket_parent() -> str:
    """Where the socket's folder is made: the temporary folder, or /tmp when the temporary folder's path
    is too long for a Unix socket (a ``TMPDIR`` deep in a scratch file system)."""
    temporary = tempfile.gettempdir()
    if len(os.fsencode(temporary)) + _SOCKET_SUFFIX_LENGTH <= SOCKET_PATH_LIMIT:
        return temporary
    return "/tmp"


def start_server(log_path: Path, environment: dict[str, str], idle_exit_s: float = 600.0) -> ServerHandle:
    """Start a server for jobs whose environment is ``environment`` (:func:`job_environment`), logging to
    ``log_path``; it answers once its imports are done (calls wait meanwhile). Its socket lies in a new
    private folder (:func:`socket_parent`), which the server removes when it ends, and it ends when this
    process does, however this process ends. Raises OSError or RuntimeError when it cannot start."""
    python = shutil.which("python", path=environment.get("PATH"))
    if python is None:
        raise FileNotFoundError("no `python` on PATH, the interpreter the workflow's jobs run")
    folder = Path(tempfile.mkdtemp(prefix=_FOLDER_PREFIX, dir=socket_parent()))
    socket_path = folder / "socket"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [python, "-m", "pathmamba.forkserver", "--socket", str(socket_path), "--idle-exit", str(idle_exit_s),
             "--parent", str(os.getpid()), "--own-folder"],
            env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30.0  # it binds the socket before its imports: a fraction of a second
    while not socket_path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    handle = ServerHandle(process, socket_path, folder)
    if not socket_path.exists():
        handle.stop()
        raise RuntimeError(f"the fork server did not start (exit {process.poll()}); see {log_path}")
    return handle


def start_for_jobs(log_path: Path, environment: dict[str, str], warn) -> ServerHandle | None:
    """:func:`start_server` for a workflow run; when it cannot start, one line through ``warn`` and None:
    the run goes on without it, each job starting its own process."""
    try:
        return start_server(log_path, environment)
    except (OSError, RuntimeError) as error:
        warn(f"fork server not started ({error}); each job starts its own process")
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m pathmamba.forkserver --socket PATH``: the server, as :func:`start_server` runs it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pathmamba.forkserver", description=serve.__doc__)
    parser.add_argument("--socket", required=True, type=Path, help="the Unix socket to create and listen on")
    parser.add_argument("--idle-exit", type=float, default=600.0,
                        help="seconds without a call or a running child after which it exits")
    parser.add_argument("--parent", type=int, default=None,
                        help="exit when this process ends (default: the process that started this one)")
    parser.add_argument("--own-folder", action="store_true",
                        help="the socket's folder was made for this server: remove it (if empty) at exit")
    args = parser.parse_args(argv)
    return serve(args.socket, args.idle_exit, args.parent, args.own_folder)


if __name__ == "__main__":
    raise SystemExit(main())
