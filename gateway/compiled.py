"""The hot-path modules mypyc can compile (`make compile`), and what keeps a stale build out.

`make compile` compiles `MODULES` in place with mypyc (shipped with mypy): each gets a C
extension beside its source, which Python imports instead of the `.py`. The code is the same
Python, type-checked by `mypy --strict`; compiled, its native classes and typed locals run as
C. `make uncompile` removes the extensions, and the sources run again.

An extension built from an older source would run the older code. Python prefers an extension
to a source beside it, so when any compiled module's source is newer than its extension (or
an extension of the group is missing) `use_sources_if_stale` imports every one of `MODULES`
from source, and says so once: the group is compiled together and calls across itself in C,
so one module from source and another compiled would mix two versions. `gateway/__init__`
runs it before any of them is imported.

`sluicegate build` prints the state, and exits 1 when it is stale (`--sources`: the paths `make compile` gives mypyc;
`--remove`: deletes the extensions, `make uncompile`); `sluicegate check-config` prints it too.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["MODULES", "ROOT", "Build", "build_of", "remove", "sources", "strays",
           "use_sources_if_stale"]

logger = logging.getLogger("sluicegate")

ROOT = Path(__file__).resolve().parent.parent

# What runs on every request of the auth and quota layers. Not here: modules whose objects the
# interpreted kernel reads on every request (gateway/context.py: from interpreted code, a
# native class's attributes are slower than __slots__), and the cache layer (compiled, its
# miss path counted the same: its work is in orjson, hashlib and the store).
MODULES = (
    "gateway.policy",
    "gateway.pricing",
    "gateway.resp",
    "gateway.tokens",
    "middleware.auth",
    "middleware.auth.keys",
    "middleware.quota",
    "middleware.quota.lane",
    "middleware.quota.plan",
    "middleware.quota.store_redis",
)


def sources(root: Path = ROOT) -> list[Path]:
    """The sources of `MODULES`, relative to `root` (what `make compile` gives mypyc)."""
    return [_source(root, module).relative_to(root) for module in MODULES]


def _source(root: Path, module: str) -> Path:
    path = root.joinpath(*module.split("."))
    package = path / "__init__.py"
    return package if package.exists() else path.with_suffix(".py")


_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _extension(source: Path) -> Path:
    return source.with_name(source.stem + _SUFFIX)


class Build:
    """What is on disk for `modules` under `root`: `compiled` (every extension there and none
    older than any source), `source` (no extension) or `stale` (the rest), with `reason`;
    `strays`: the modules whose extensions are not the group's (`strays`)."""

    def __init__(self, state: str, reason: str = "",
                 strays: tuple[str, ...] = ()) -> None:
        self.state = state
        self.reason = reason
        self.strays = strays

    def __repr__(self) -> str:
        return f"Build({self.state!r}, {self.reason!r})"


def strays(root: Path = ROOT, modules: Sequence[str] = MODULES) -> dict[str, Path]:
    """Extensions beside a source in the group's packages that are not the group's (a build
    of an earlier `MODULES`), by module name. Python would import one, and with it the other
    group's shared library, which fails ("native module ... replaced after
    initialization") or runs code of another build."""
    listed = {_extension(_source(root, module)) for module in modules}
    found: dict[str, Path] = {}
    for package in sorted({module.split(".")[0] for module in modules}):
        for extension in sorted((root / package).rglob("*" + _SUFFIX)):
            stem = extension.name[:-len(_SUFFIX)]
            if extension in listed or not extension.with_name(stem + ".py").exists():
                continue
            parts = extension.relative_to(root).parent.parts
            found[".".join(parts if stem == "__init__" else (*parts, stem))] = extension
    return found


def build_of(root: Path = ROOT, modules: Sequence[str] = MODULES) -> Build:
    stray = strays(root, modules)
    if stray:
        return Build("stale", "extensions of modules the build does not list: " +
                     ", ".join(str(path.relative_to(root)) for path in stray.values()),
                     tuple(stray))
    sources = [_source(root, module) for module in modules]
    built = [(source, _extension(source)) for source in sources]
    present = [(source, ext) for source, ext in built if ext.exists()]
    if not present:
        return Build("source")
    if len(present) < len(built):
        missing = [str(ext.relative_to(root)) for _, ext in built if not ext.exists()]
        return Build("stale", f"no extension for {', '.join(missing)}")
    oldest = min(ext.stat().st_mtime for _, ext in present)
    changed = [str(source.relative_to(root)) for source, _ in present
               if source.stat().st_mtime > oldest]
    if changed:
        return Build("stale", f"{', '.join(changed)} changed after the build")
    return Build("compiled")


class _SourcesOnly(importlib.abc.MetaPathFinder):
    """Finds `names` as their `.py` (or cached bytecode), never as an extension."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names or not path:
            return None
        finder = importlib.machinery.FileFinder(
            path[0],
            (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
            (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES))
        return finder.find_spec(fullname, target)


class _SharedLibraries(importlib.abc.MetaPathFinder):
    """Finds a build's shared library (`<hash>__mypyc`, which mypyc puts in `root`, not in a
    package) when `root` is not on sys.path: an editable install made by an import hook (what
    current setuptools makes) finds the packages, not what lies beside them. Without it the
    first compiled module's import fails with "No module named '<hash>__mypyc'"."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if path is not None or not fullname.endswith("__mypyc"):
            return None
        finder = importlib.machinery.FileFinder(
            str(self.root),
            (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
        return finder.find_spec(fullname, target)


def use_sources_if_stale(root: Path = ROOT, modules: Sequence[str] = MODULES) -> Build:
    """Imports `modules` from source from now on when their build is stale (see the module
    docstring); the build's state either way. A current build's shared library is found in
    `root` whether or not `root` is on sys.path (`_SharedLibraries`)."""
    build = build_of(root, modules)
    if build.state == "compiled" and not any(isinstance(finder, _SharedLibraries)
                                             and finder.root == root
                                             for finder in sys.meta_path):
        sys.meta_path.append(_SharedLibraries(root))
    names = frozenset(modules) | frozenset(build.strays)
    if build.state == "stale" and not any(isinstance(finder, _SourcesOnly)
                                          and finder.names == names for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourcesOnly(names))
        logger.warning("compiled modules are stale (%s): running them from source; "
                       "`make compile` builds them again, `make uncompile` removes them",
                       build.reason)
    return build


def remove(root: Path = ROOT, modules: Sequence[str] = MODULES) -> list[Path]:
    """Deletes the group's extensions, any stray one (`strays`) and the shared libraries;
    what it deleted. (`make compile` runs it first: a build never leaves another's behind.)"""
    removed = []
    for extension in [_extension(_source(root, module)) for module in modules] + \
            list(strays(root, modules).values()):
        if extension.exists():
            extension.unlink()
            removed.append(extension)
    for shared in root.glob("*__mypyc" + _SUFFIX):
        shared.unlink()
        removed.append(shared)
    return removed
