"""Every command the README and docs/*.md show runs, is run by a named test, or is checked without running.

The rules and markers are in docs/tests.md ("The docs check"); the blocks come from ``tests/doc_blocks.py``.

The blocks run as a reader runs them after ``make serve``, in document order per file, in a scratch
copy of the repository (its tracked and new files, ``model_store`` copied, ``.venv`` and the trained
weights cache linked; ``PYTHONPATH`` points at the copy, so ``.venv/bin/servekit`` and
``python -m servekit...`` take their defaults from it). So everything the commands write (``var/``,
``bundle/``, archives, the deployment history, the proxy's and Prometheus's files) lands in the copy
and goes with it; the fixture's teardown checks that the repository was left as it was.

The server is started by running ``make serve`` in the copy (module fixture) on make serve's own
addresses, which the docs' commands use, and stopped by ``make stop`` there in teardown. A
developer's own ``make serve`` holding those ports fails the module at once, untouched. Before each
file the server is put back as ``make serve`` left it (its versions and defaults; no proxy,
Prometheus or history), so each page runs on its own. So ``make serve`` and ``make stop`` lines in a
block are the fixture's and are not run again in place.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from servekit.cli import build_parser
from servekit.serving.client import TorchServeClient, read_keys
from servekit.serving.monitor import DEFAULT_PORT as PROMETHEUS_PORT
from servekit.serving.oip_service import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT
from servekit.serving.processes import group_alive, read_pid
from servekit.serving.server import BASE_CONFIG, REPO_ROOT, read_properties
from tests.doc_blocks import Block, blocks, dangling_markers, doc_files, inline_spans

pytestmark = pytest.mark.integration

BLOCK_TIMEOUT_S = 300
TAIL = 4000  # characters of a failed block's output shown


def default_ports() -> dict[str, int]:
    """What ``make serve`` and the docs' commands listen on or call (config.properties, then fixed defaults)."""
    props = read_properties(BASE_CONFIG)
    ports = {kind: int(props[f"{kind}_address"].rsplit(":", 1)[1]) for kind in ("inference", "management", "metrics")}
    return {
        **ports,
        "OIP HTTP": DEFAULT_HTTP_PORT,
        "OIP gRPC": DEFAULT_GRPC_PORT,
        "TorchServe gRPC inference": int(props.get("grpc_inference_port", 7070)),
        "TorchServe gRPC management": int(props.get("grpc_management_port", 7071)),
        "servekit proxy": int(build_parser().get_default("proxy_port")),
        "Prometheus (make monitor)": PROMETHEUS_PORT,
    }


def makefile_targets(makefile: Path) -> set[str]:
    targets: set[str] = set()
    for line in makefile.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.%/ -]+?)\s*:(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


# ------------------------------------------------------------------------------------------ static checks
def is_test_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".py" and path.name.startswith("test_") and "tests" in path.parts


def test_every_command_block_is_run_named_by_a_test_or_marked_dry_run(repo_root: Path) -> None:
    problems = []
    for block in blocks(repo_root):
        markers = [c for c in block.comments if c.startswith("docs-check:")]
        if not block.is_command:
            if block.has_prompt:
                problems.append(f"{block.where}: `$ ` commands in a ```{block.language} block: tag it console")
            elif markers:
                problems.append(f"{block.where}: a docs-check marker on a ```{block.language} block (not a command)")
            continue
        try:
            marker = block.marker
        except ValueError as exc:
            problems.append(f"{block.where}: {exc}")
            continue
        if marker is None or marker.kind != "test":
            continue
        test = repo_root / marker.argument
        if not is_test_file(test):
            problems.append(f"{block.where}: docs-check: test names {marker.argument}, which is no test file")
            continue
        names = [str(block.path), *(c.split()[0] for c in block.comments if c not in markers and c.split())]
        if not any(name in test.read_text() for name in names):
            problems.append(f"{block.where}: {marker.argument} does not mention {' or '.join(names)}")
    problems += [f"{where}: a docs-check marker not just above a fenced block" for where in dangling_markers(repo_root)]
    assert not problems, "\n".join(problems)


def is_placeholder(word: str) -> bool:
    """``NAME``, ``TARGET``, ``X``: a word the reader replaces, in a synopsis or in prose about commands."""
    return re.fullmatch(r"[A-Z][A-Z0-9_]*(\.\.\.)?", word) is not None


def subcommands(help_text: str) -> set[str]:
    """The subcommands a ``--help`` lists (its ``{a,b,c}`` positional), empty for a leaf command."""
    match = re.search(r"^positional arguments:\n\s+\{([^}]+)\}", help_text, re.M)
    return set(match.group(1).split(",")) if match else set()


def servekit_problems(words: list[str], help_of: Callable[[tuple[str, ...]], str | None]) -> list[str]:
    """What is wrong with ``servekit WORDS``: an unknown subcommand, or a flag its level's ``--help`` does not show.

    ``help_of(())`` is ``servekit --help``, ``help_of(("proxy", "start"))`` that subcommand's (None: no such).
    """
    path: tuple[str, ...] = ()
    help_text = help_of(()) or ""
    problems = []
    words = [w.strip("[]") for w in words if w.strip("[]")]  # a synopsis's [--flag VALUE]
    while words:
        word = words.pop(0)
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            where = " ".join(("servekit", *path))
            if flag not in ("-h", "--help") and not re.search(rf"{re.escape(flag)}\b", help_text):
                problems.append(f"{where}: no flag {flag} in its --help")
            elif "=" not in word and re.search(rf"{re.escape(flag)} [A-Z{{]", help_text) and words:
                words.pop(0)  # the flag's value
        elif choices := subcommands(help_text):
            if is_placeholder(word):
                return problems
            if word not in choices:
                return [*problems, f"{' '.join(('servekit', *path))} has no subcommand {word!r}"]
            path += (word,)
            help_text = help_of(path) or ""
    return problems


def in_process_help(path: tuple[str, ...]) -> str | None:
    parser = build_parser()
    for word in path:
        subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subparsers or word not in subparsers[0].choices:
            return None
        parser = subparsers[0].choices[word]
    return parser.format_help()


def test_inline_make_and_servekit_commands_name_real_targets_and_subcommands(repo_root: Path) -> None:
    targets = makefile_targets(repo_root / "Makefile")
    problems = []
    checked = 0
    for span in inline_spans(repo_root):
        words = span.text.split()
        if words[0] == "make":
            checked += 1
            for word in words[1:]:
                if "=" in word or word.startswith("-"):
                    continue
                problems += [f"{span.where}: `{span.text}`: no target {t!r} in the Makefile"
                             for t in word.split("|") if t not in targets and not is_placeholder(t)]  # fmt: skip
        elif words[0] in ("servekit", ".venv/bin/servekit") and len(words) > 1:
            checked += 1
            problems += [f"{span.where}: `{span.text}`: {p}" for p in servekit_problems(words[1:], in_process_help)]
        elif "-m" in words[:-1] and words[0].endswith(("python", "python3")):
            checked += 1
            module = words[words.index("-m") + 1]
            if not is_placeholder(module) and importlib.util.find_spec(module) is None:
                problems.append(f"{span.where}: `{span.text}`: no module {module}")
    assert checked > 50, f"only {checked} inline commands found: is the span reader broken?"
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ the scratch copy
@dataclass
class Scratch:
    """The scratch copy the docs' commands run in, and the server ``make serve`` started there."""

    root: Path
    env: dict[str, str]  # make serve's and make stop's: no PYTHONPATH, or the workers would import handlers from it
    baseline: dict[str, tuple[str, set[str]]] = field(default_factory=dict)  # model: (default, versions)
    pid: int | None = None

    @property
    def commands_env(self) -> dict[str, str]:
        """The docs' commands': ``.venv/bin/servekit`` imports servekit from the copy, as from a checkout."""
        return {**self.env, "PYTHONPATH": str(self.root)}

    def run(self, *argv: str, timeout: float = BLOCK_TIMEOUT_S, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=self.root, env=env or self.commands_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)  # fmt: skip

    def client(self) -> TorchServeClient:
        ports = default_ports()
        return TorchServeClient(f"http://127.0.0.1:{ports['management']}", f"http://127.0.0.1:{ports['inference']}",
                                self.root / "var" / "key_file.json")  # fmt: skip

    def served(self) -> dict[str, tuple[str, set[str]]]:
        client = self.client()
        served = {}
        for model in client.models():
            versions = {d["modelVersion"] for d in client.describe(model)}
            served[model] = (client.default_version(model), versions)
        return served

    def reset(self) -> None:
        """Back to what ``make serve`` left: no proxy, Prometheus or history; its versions and defaults only."""
        for argv in ((".venv/bin/servekit", "proxy", "stop"), (".venv/bin/python", "-m", "servekit.serving.monitor",
                                                                "stop")):  # fmt: skip
            result = self.run(*argv, timeout=60)
            assert result.returncode == 0, f"{' '.join(argv)}: {result.stdout}"
        client = self.client()
        for model, (default, versions) in self.served().items():
            base_default, base_versions = self.baseline.get(model, (None, set()))
            if base_default is not None and default != base_default:
                client.manage("PUT", f"/models/{model}/{base_default}/set-default")
            for version in sorted(versions - base_versions):
                client.manage("DELETE", f"/models/{model}/{version}")
            if base_default is None:
                client.manage("DELETE", f"/models/{model}/{default}")
        assert self.served() == self.baseline
        for leftover in ("var/deployments.jsonl", "var/proxy"):
            path = self.root / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def copy_repository(repo_root: Path, model_store: Path, root: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo_root,
                            capture_output=True, check=True).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = repo_root / name
        if source.is_file():  # deleted in the working tree: not there
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)  # with its mtime: make must see .venv as up to date
    shutil.copytree(model_store, root / "model_store", dirs_exist_ok=True)
    (root / ".venv").symlink_to(repo_root / ".venv")
    (root / "build").mkdir(exist_ok=True)
    (root / "build" / "cache").symlink_to(repo_root / "build" / "cache")


def ports_in_use() -> list[str]:
    taken = []
    for kind, port in default_ports().items():
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                taken.append(f"{port} ({kind})")
    return taken


def repository_outputs(repo_root: Path) -> dict[str, float | None]:
    """What a doc command run in the repository itself would have written: must not change here."""
    names = ("var", "bundle", "my_project", "model_store/manifest.json", "speed.json", "accuracy.json")
    return {name: (repo_root / name).stat().st_mtime if (repo_root / name).exists() else None for name in names}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, model_store: Path) -> Iterator[Scratch]:
    taken = ports_in_use()
    if taken:
        pytest.fail(f"the docs check needs make serve's own addresses, and 127.0.0.1:{', '.join(taken)} "
                    "is in use (your make serve? make stop it; this check never stops it)", pytrace=False)  # fmt: skip
    before = repository_outputs(repo_root)
    root = tmp_path_factory.mktemp("docs") / "servekit"
    copy_repository(repo_root, model_store, root)
    venv_bin = str(repo_root / ".venv" / "bin")
    env = {key: value for key, value in os.environ.items() if not key.startswith("SERVEKIT_")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p.rstrip("/") != venv_bin)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    scratch = Scratch(root, env)
    stale = scratch.run("make", "-q", ".venv/.installed", timeout=60)
    assert stale.returncode == 0, "the venv is older than pyproject.toml: run make venv first (not from the copy)"
    started = scratch.run("make", "serve", timeout=900, env=env)
    scratch.pid = read_pid(root / "var" / "torchserve.pid")
    try:
        assert started.returncode == 0, f"make serve failed in {root}:\n{started.stdout[-TAIL:]}"
        keys = read_keys(root / "var" / "key_file.json")
        env["INF"], env["MGT"] = keys["inference"], keys["management"]  # as the README's "Try it" sets them
        scratch.baseline = scratch.served()
        yield scratch
    finally:
        stopped = scratch.run("make", "stop", timeout=120, env=env)
        scratch.run(".venv/bin/servekit", "proxy", "stop", timeout=60)
        if scratch.pid is not None and group_alive(scratch.pid):  # make stop did not: ours, by its pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(scratch.pid, signal.SIGKILL)
        assert stopped.returncode == 0, stopped.stdout
    assert not ports_in_use(), f"still listening after make stop: {ports_in_use()}"
    assert repository_outputs(repo_root) == before, "a doc command wrote into the repository, not the copy"


# ------------------------------------------------------------------------------------------ running blocks
PRELUDE = r"""
# The docs check's prelude (docs/tests.md): curl fails on an HTTP error; variables of this page's earlier blocks;
# the script line of the first command that fails goes to $DOCS_CHECK_FAILED (in a function: where it was called).
curl() { command curl --fail-with-body --silent --show-error "$@"; }
__docs_check_failed() {
  [ -s "$DOCS_CHECK_FAILED" ] || { [ -n "$3" ] && echo "$2" || echo "$1"; } > "$DOCS_CHECK_FAILED"
}
set -E
trap '{ set +x; } 2>/dev/null; __docs_check_failed "$LINENO" "${BASH_LINENO[0]:-}" "${FUNCNAME[0]:-}"' ERR
if [ -f "$DOCS_CHECK_VARS" ]; then source "$DOCS_CHECK_VARS"; fi
__docs_check_before=" $(compgen -v | tr '\n' ' ') "
PS4='+ '
set -x
"""
TRAILER = r"""
{ set +x; } 2>/dev/null
for __v in $(compgen -v); do
  case "$__docs_check_before" in *" $__v "*) continue ;; esac
  case "$__v" in __docs_check*|BASH*|PIPESTATUS|OLDPWD|COLUMNS|LINES|_) continue ;; esac
  declare -p "$__v"
done > "$DOCS_CHECK_VARS"
"""
FIXTURE_LINE = re.compile(r"^\s*make (serve|stop)\s*(?:#.*)?$")


def shell_text(block: Block) -> str:
    """The block's shell text; ``make serve`` / ``make stop`` are the fixture's, so they become no-ops here."""
    lines = []
    for line in block.script().splitlines():
        if FIXTURE_LINE.match(line):
            line = ": " + shlex.quote(line.strip())
        elif line.startswith("make serve && "):
            line = line[len("make serve && ") :]
        lines.append(line)
    return "\n".join(lines) + "\n"


def run_block(scratch: Scratch, block: Block, workdir: Path) -> None:
    failed = workdir / "failed_line"
    failed.unlink(missing_ok=True)
    env = {**scratch.commands_env, "DOCS_CHECK_VARS": str(workdir / "vars.sh"), "DOCS_CHECK_FAILED": str(failed)}
    if block.language == "python":
        script = workdir / f"block_{block.line}.py"
        script.write_text(block.text)
        argv, first_line = [".venv/bin/python", str(script)], 1
    else:
        script = workdir / f"block_{block.line}.sh"
        script.write_text(PRELUDE + shell_text(block) + TRAILER)
        argv, first_line = ["bash", "-e", "-o", "pipefail", str(script)], PRELUDE.count("\n") + 1
    started = time.monotonic()
    output, code = run_group(argv, scratch.root, env, BLOCK_TIMEOUT_S)
    if code == 0:
        print(f"{block.where}: ran in {time.monotonic() - started:.1f} s\n{output}")
        return
    lines = re.findall(rf'File "{re.escape(str(script))}", line (\d+)', output)
    if failed.is_file() and failed.read_text().strip().isdigit():
        lines.append(failed.read_text().strip())
    where, what = block.where, f"the {block.language} block at {block.where}"
    if lines and int(lines[-1]) >= first_line:
        line = block.line + int(lines[-1]) - first_line + 1
        where = f"{block.path}:{line}"
        starts = [c for c in block.commands() if c.line <= line]
        what = f"`{starts[-1].text}` ({what})" if starts else what
    status = f"ran over {BLOCK_TIMEOUT_S} s" if code is None else f"exited with {code}"
    pytest.fail(f"{where}: {what} {status}, run in {scratch.root}; its output's tail:\n{output[-TAIL:]}",
                pytrace=False)  # fmt: skip


def run_group(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[str, int | None]:
    """Output and exit status of ``argv`` in a process group of its own; None after ``timeout`` s, the group stopped."""
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
        return output, process.returncode
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGINT, signal.SIGKILL):  # SIGINT first: a pytest or a servekit command cleans up
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                output, _ = process.communicate(timeout=20)
                break
        return output or "", None


def _submodule(package: str, name: str) -> bool:
    """Whether ``from package import name`` names a module of the package (``from handlers import explain``)."""
    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except ModuleNotFoundError:
        return False


def python_problems(source: str) -> list[str]:
    """A python block checked without running: it compiles, and what it imports exists (read, not imported)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return [f"line {exc.lineno}: {exc.msg}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"no module {a.name}" for a in node.names if importlib.util.find_spec(a.name) is None]
        elif isinstance(node, ast.ImportFrom) and node.module:
            spec = importlib.util.find_spec(node.module)
            if spec is None or spec.origin is None:
                problems.append(f"no module {node.module}")
                continue
            module = ast.parse(Path(spec.origin).read_text())
            defined = {n.name for n in module.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {t.id for n in module.body if isinstance(n, ast.Assign) for t in n.targets
                        if isinstance(t, ast.Name)}  # fmt: skip
            problems += [f"{node.module} defines no {a.name}" for a in node.names
                         if a.name not in defined and not _submodule(node.module, a.name)]  # fmt: skip
    return problems


def dry_run_problems(scratch: Scratch, block: Block) -> list[str]:
    """What is wrong with a block checked without running (docs/tests.md, "dry-run")."""
    if block.language == "python":
        return [f"{block.where}: {p}" for p in python_problems(block.text)]
    problems = []
    syntax = scratch.run("bash", "-n", "-c", block.script(), timeout=30)
    if syntax.returncode != 0:
        problems.append(f"{block.where}: bash -n: {syntax.stdout.strip()}")
    helps: dict[tuple[str, ...], str | None] = {}

    def help_of(path: tuple[str, ...]) -> str | None:
        if path not in helps:
            result = scratch.run(".venv/bin/servekit", *path, "--help", timeout=60)
            helps[path] = result.stdout if result.returncode == 0 else None
        return helps[path]

    for command in block.commands():
        for words in simple_commands(command.text):
            problems += [f"{block.path}:{command.line}: {p}" for p in command_problems(scratch, words, help_of)]
    return problems


def simple_commands(text: str) -> list[list[str]]:
    """``text`` split into simple commands at ``&&``, ``||``, ``;`` and ``|``; comments dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def command_problems(scratch: Scratch, words: list[str], help_of) -> list[str]:
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value before the command
        words = words[1:]
    if not words:
        return []
    program, args = words[0], words[1:]
    problems = [f"{path} does not exist" for path in repo_paths(scratch.root, words)]
    if program == "make":
        result = scratch.run("make", "-n", *args, timeout=60)
        if result.returncode != 0:
            problems.append(f"make -n {' '.join(args)}: {result.stdout.strip()[-500:]}")
    elif Path(program).name == "servekit":
        problems += servekit_problems(args, help_of)
    elif Path(program).name.startswith("python") and "-m" in args[:-1]:
        module = args[args.index("-m") + 1]
        if importlib.util.find_spec(module) is None:
            problems.append(f"no module {module} for {program} -m")
    return problems


def repo_paths(root: Path, words: list[str]) -> list[str]:
    """The words that name a path under the copy's top-level entries and do not exist there."""
    missing = []
    for word in words:
        word = word.split("=", 1)[1] if word.startswith("-") and "=" in word else word.lstrip("@")
        if (
            "/" not in word
            or "://" in word
            or "$" in word
            or word.startswith(("-", "/"))
            or any(c in word for c in "*?[")
        ):
            continue
        if (root / word.split("/", 1)[0]).exists() and not (root / word).exists():
            missing.append(word)
    return missing


RUNNABLE_DOCS = [
    str(path)
    for path in doc_files(REPO_ROOT)
    if any(b.is_command and b.kind in ("run", "dry-run") for b in blocks(REPO_ROOT, [path]))
]


@pytest.mark.parametrize("doc", RUNNABLE_DOCS)
def test_the_commands_of_the_doc_run(doc: str, scratch: Scratch, tmp_path: Path) -> None:
    page = blocks(scratch.root, [Path(doc)])
    if any(block.is_command and block.kind == "run" for block in page):
        scratch.reset()
    ran = 0
    for block in page:
        if not block.is_command or block.kind == "test":
            continue
        if block.kind == "run":
            run_block(scratch, block, tmp_path)
            ran += 1
        else:
            problems = dry_run_problems(scratch, block)
            assert not problems, f"in the dry-run block at {block.where}:\n" + "\n".join(problems)
    print(f"{doc}: {ran} blocks run")
