"""quantforge's own distribution: its name on the package index, and the install line that puts exactly this
project on a CI runner.

The index already holds a `quantforge` (an unrelated option-pricing library): `pip install quantforge` installs a
stranger's code, into a job that holds an HF write token. This project's distribution is `quantforge-build` (the
import package and the command stay `quantforge`). It is not published yet, so no line written here names it on
the index either: until it is, anyone could register the name. `ci init` writes, first that applies:

    --install SPEC   the user's own, checked to be this project (a path, a pinned git URL; the name once published)
    -e .             in quantforge's own repository
    git+URL@SHA      the commit of the quantforge that runs: from PEP 610's direct_url.json when it was installed
                     from git, else from its checkout's git remote and HEAD (installed editable, or run from one)
    NAME==VERSION    only once PUBLISHED
and otherwise stops with an error asking for --install.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from . import __version__
from .errors import BadInputError

DISTRIBUTION = "quantforge-build"
PUBLISHED = False  # True once quantforge-build is on the package index: then `quantforge-build==VERSION` is ours
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_SCP_RE = re.compile(r"(?P<user>[^@/:]+@)?(?P<host>[^/:]+):(?P<path>[^/].*)")  # git@github.com:org/repo.git
_REQUIREMENT_RE = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?P<rest>.*)")
_INSTALL_HINT = ("pass --install SPEC: a git URL pinned to a commit of quantforge "
                 "(git+https://HOST/OWNER/quantforge.git@<40-hex sha>), or a path inside the repository")


@dataclass(frozen=True)
class InstallSpec:
    spec: str  # what `pip install` gets: `-e .`, `git+URL@SHA`, ...
    how: str  # where it came from, in words
    warnings: tuple[str, ...] = ()


def canonical_name(name: str) -> str:
    """A distribution name as the index compares names (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version() -> str:
    """This distribution's installed version; the package's own when it runs from a source tree."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return __version__


def install_spec(repo_root: Path, explicit: str | None = None) -> InstallSpec:
    """The install line for a workflow in the repository at `repo_root` (see the module's docstring)."""
    if explicit is not None:
        return InstallSpec(check_ours(explicit, repo_root), "given with --install")
    if is_source_tree(repo_root):
        return InstallSpec("-e .", "quantforge's own repository")
    tree = running_source_tree()
    if tree is not None:
        return from_checkout(tree, f"the quantforge checkout at {tree} that runs")
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise _refuse("cannot tell where this quantforge was installed from", hint=_INSTALL_HINT) from None
    return from_distribution(dist)


def from_distribution(dist: metadata.Distribution) -> InstallSpec:
    """The install line for an installed distribution, from its PEP 610 direct_url.json."""
    text = dist.read_text("direct_url.json")
    if not text:  # installed from an index
        if PUBLISHED:
            return InstallSpec(f"{DISTRIBUTION}=={dist.version}", "the package index")
        raise _refuse(f"{DISTRIBUTION} {dist.version} was installed from a package index, where it is not "
                            "published: the workflow cannot install the same", hint=_INSTALL_HINT)
    try:
        direct = json.loads(text)
        url = str(direct["url"])
    except (ValueError, KeyError, TypeError):
        raise _refuse(f"{DISTRIBUTION}'s direct_url.json is unreadable", hint=_INSTALL_HINT) from None
    vcs = direct.get("vcs_info")
    if isinstance(vcs, dict) and vcs.get("vcs") == "git" and _SHA_RE.fullmatch(str(vcs.get("commit_id", ""))):
        if url.startswith("file:"):
            raise _refuse(f"{DISTRIBUTION} was installed from the local git repository {url}, which a runner "
                                "cannot reach", hint=_INSTALL_HINT)
        sub = direct.get("subdirectory")
        spec = f"git+{url}@{vcs['commit_id']}" + (f"#subdirectory={sub}" if sub else "")
        return InstallSpec(spec, "the git commit it was installed from (direct_url.json)")
    if "dir_info" in direct and url.startswith("file:"):
        folder = Path(unquote(urlparse(url).path))
        return from_checkout(folder, f"the checkout at {folder} it was installed from")
    raise _refuse(f"{DISTRIBUTION} was installed from {url}, which the workflow cannot pin to a commit",
                        hint=_INSTALL_HINT)


def from_checkout(folder: Path, how: str) -> InstallSpec:
    """`git+REMOTE@HEAD` for a quantforge git checkout."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise _refuse(f"{folder} is not a git checkout with a commit ({proc.stderr.strip()[:200]})",
                                hint=_INSTALL_HINT)
        return proc.stdout.strip()

    head = git("rev-parse", "HEAD")
    remotes = git("remote").split()
    remote = "origin" if "origin" in remotes else (remotes[0] if len(remotes) == 1 else None)
    if remote is None:
        raise _refuse(f"{folder} has {'no git remote' if not remotes else 'several git remotes and no origin'}"
                            ", so there is no URL a runner could install this quantforge from", hint=_INSTALL_HINT)
    url = git_url(git("remote", "get-url", remote))
    warnings = []
    if git("status", "--porcelain", "--untracked-files=no"):
        warnings.append(f"{folder} has uncommitted changes; the workflow installs commit {head[:12]} without them")
    if not git("branch", "-r", "--contains", head):
        warnings.append(f"commit {head[:12]} is on no branch of {remote} here: push it before the workflow runs")
    return InstallSpec(f"git+{url}@{head}", how, tuple(warnings))


def git_url(remote: str) -> str:
    """A git remote as pip's URL (without `git+`): scp-like `git@host:path` becomes `ssh://git@host/path`."""
    if "://" in remote:
        scheme = remote.split("://", 1)[0]
        if scheme in ("https", "ssh", "http", "git"):
            return remote
    else:
        match = _SCP_RE.fullmatch(remote)
        if match and not remote.startswith(("/", ".", "~")):
            return f"ssh://{match['user'] or ''}{match['host']}/{match['path']}"
    raise _refuse(f"the git remote {remote} is a local path, which a runner cannot reach", hint=_INSTALL_HINT)


def is_source_tree(folder: Path) -> bool:
    """Whether `folder` holds quantforge's own pyproject.toml."""
    try:
        project = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    except (OSError, ValueError):
        return False
    return canonical_name(str(project.get("name", ""))) == DISTRIBUTION


def running_source_tree() -> Path | None:
    """The source tree this quantforge runs from (an editable install, or PYTHONPATH), if it runs from one."""
    root = Path(__file__).resolve().parents[1]
    return root if is_source_tree(root) else None


def check_ours(spec: str, repo_root: Path) -> str:
    """`spec` if it can only install this project, else BadInputError saying why."""
    try:
        words = shlex.split(spec)
    except ValueError as exc:
        raise _refuse(f"--install {spec!r}: {exc}") from None
    if words[:1] == ["-e"]:
        words = words[1:]
    if len(words) == 3 and words[1] == "@":  # PEP 508: NAME @ URL
        words = ["".join(words)]
    if len(words) != 1:
        raise _refuse(f"--install {spec!r}: expected one thing to install, optionally after -e")
    [what] = words
    if what.startswith("git+") or (canonical_name(what.split("@", 1)[0]) == DISTRIBUTION and "@" in what):
        url = what if what.startswith("git+") else what.split("@", 1)[1]
        _check_git(url, spec)
        return spec
    if what.startswith((".", "/", "~")):
        folder = (repo_root / Path(what).expanduser()).resolve()
        if not is_source_tree(folder):
            raise _refuse(f"--install {spec!r}: {folder} holds no quantforge source tree ({DISTRIBUTION}'s "
                                "pyproject.toml); a runner installs it from the repository's checkout")
        return spec
    match = _REQUIREMENT_RE.fullmatch(what)
    name = canonical_name(match["name"]) if match else what
    if name == "quantforge":
        raise _refuse(f"--install {spec!r}: `quantforge` on the package index is an unrelated project (an "
                            f"option-pricing library); this project's distribution is {DISTRIBUTION}",
                            hint=_INSTALL_HINT)
    if name != DISTRIBUTION:
        raise _refuse(f"--install {spec!r}: not quantforge's distribution ({DISTRIBUTION})", hint=_INSTALL_HINT)
    if not PUBLISHED:
        raise _refuse(f"--install {spec!r}: {DISTRIBUTION} is not published on the package index yet, so the "
                            "name could install anyone's upload", hint=_INSTALL_HINT)
    if not (match and match["rest"].startswith("==")):
        raise _refuse(f"--install {spec!r}: pin the version ({DISTRIBUTION}=={installed_version()})")
    return spec


def _check_git(url: str, spec: str) -> None:
    if not url.startswith("git+"):
        raise _refuse(f"--install {spec!r}: expected a git URL such as git+https://HOST/OWNER/quantforge.git@SHA")
    location = url.split("#", 1)[0]
    path = location.split("://", 1)[-1].partition("/")[2]  # after the host (whose user part may hold an @)
    if "@" not in path or not path.rsplit("@", 1)[1]:
        raise _refuse(f"--install {spec!r}: pin a commit (…@<40-hex sha>) or a tag: an unpinned URL installs "
                            "whatever the branch holds that night, and every night's keys could differ")
    if location.startswith("git+file:"):
        raise _refuse(f"--install {spec!r}: a local repository, which a runner cannot reach")


def _refuse(message: str, hint: str | None = None) -> BadInputError:
    error = BadInputError(message)
    error.hint = hint
    return error


def is_ours(spec: str, repo_root: Path) -> bool:
    """Whether an install line can only install this project (what the tests assert of every workflow)."""
    try:
        check_ours(spec, repo_root)
    except BadInputError:
        return False
    return True
