"""The compiled build's guard (gateway/compiled.py): a stale extension never runs.

Built on a package made for each test (two modules, a subpackage's `__init__` and a module
in it, as the real group has both), whose "extensions" are files that are not extensions: importing
one fails, so a test that imports the module's source proves the extension was passed over.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import cli
from gateway.compiled import MODULES, ROOT, build_of, remove, use_sources_if_stale

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, tuple[str, ...]]]:
    name = f"sg_compiled_probe_{os.getpid()}_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    package = tmp_path / name / "sub"
    package.mkdir()
    (package / "__init__.py").write_text("WHERE = 'source'\n")
    (package / "inner.py").write_text("WHERE = 'source'\n")
    modules = (f"{name}.sub", f"{name}.sub.inner")
    sys.path.insert(0, str(tmp_path))
    before = list(sys.meta_path)
    try:
        yield tmp_path, modules
    finally:
        sys.path.remove(str(tmp_path))
        sys.meta_path[:] = before
        for module in (name, *modules, f"{modules[0]}.other"):
            sys.modules.pop(module, None)


def _extensions(root: Path, modules: tuple[str, ...], *, at: float) -> None:
    package = root.joinpath(*modules[0].split("."))
    for ext in (package / f"__init__{SUFFIX}", package / f"inner{SUFFIX}"):
        ext.write_bytes(b"not an extension module")
        os.utime(ext, (at, at))


def _sources_at(root: Path, modules: tuple[str, ...], at: float) -> None:
    package = root.joinpath(*modules[0].split("."))
    for source in (package / "__init__.py", package / "inner.py"):
        os.utime(source, (at, at))


def test_without_extensions_the_build_is_source(tree: tuple[Path, tuple[str, ...]]) -> None:
    root, modules = tree
    assert build_of(root, modules).state == "source"


def test_extensions_newer_than_every_source_are_the_build(
        tree: tuple[Path, tuple[str, ...]]) -> None:
    root, modules = tree
    _sources_at(root, modules, 1_000_000)
    _extensions(root, modules, at=2_000_000)
    assert build_of(root, modules).state == "compiled"


def test_a_source_changed_after_the_build_makes_it_stale(
        tree: tuple[Path, tuple[str, ...]]) -> None:
    root, modules = tree
    _sources_at(root, modules, 1_000_000)
    _extensions(root, modules, at=2_000_000)
    os.utime(root.joinpath(*modules[0].split(".")) / "inner.py", (3_000_000, 3_000_000))
    build = build_of(root, modules)
    assert build.state == "stale"
    assert "inner.py changed after the build" in build.reason


def test_the_build_command_fails_on_a_stale_build_only(
        tree: tuple[Path, tuple[str, ...]], capsys: pytest.CaptureFixture[str]) -> None:
    # (`make compile` ends with it: a fresh build that reads as stale fails the target)
    root, modules = tree
    assert cli.report_build(build_of(root, modules), modules) == 0  # source
    _sources_at(root, modules, 1_000_000)
    _extensions(root, modules, at=2_000_000)
    assert cli.report_build(build_of(root, modules), modules) == 0  # compiled
    os.utime(root.joinpath(*modules[0].split(".")) / "inner.py", (3_000_000, 3_000_000))
    assert cli.report_build(build_of(root, modules), modules) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"source (2 modules: {', '.join(modules)})",
        f"compiled (2 modules: {', '.join(modules)})",
        (f"stale: {modules[0].replace('.', '/')}/inner.py changed after the build "
         f"(2 modules: {', '.join(modules)})")]


def test_a_missing_extension_makes_the_build_stale(tree: tuple[Path, tuple[str, ...]]) -> None:
    root, modules = tree
    _extensions(root, modules, at=2_000_000)
    (root.joinpath(*modules[0].split(".")) / f"inner{SUFFIX}").unlink()
    build = build_of(root, modules)
    assert build.state == "stale"
    assert f"inner{SUFFIX}" in build.reason


def test_a_stale_group_is_imported_from_source_whole(
        tree: tuple[Path, tuple[str, ...]], caplog: pytest.LogCaptureFixture) -> None:
    root, modules = tree
    _extensions(root, modules, at=1_000_000)  # built before its sources' last change
    _sources_at(root, modules, 2_000_000)
    with pytest.raises(ImportError):  # Python's own choice: the extension, which is stale
        importlib.import_module(modules[1])
    for module in modules:
        sys.modules.pop(module, None)
    with caplog.at_level("WARNING", logger="sluicegate"):
        assert use_sources_if_stale(root, modules).state == "stale"
        use_sources_if_stale(root, modules)  # (once: no second finder, no second warning)
    assert [r.getMessage().startswith("compiled modules are stale") for r in caplog.records] \
        == [True]
    assert importlib.import_module(modules[0]).WHERE == "source"
    assert importlib.import_module(modules[1]).WHERE == "source"


def test_an_extension_the_build_does_not_list_is_stale_and_removed(
        tree: tuple[Path, tuple[str, ...]]) -> None:
    # A build of an earlier module list left an extension behind: importing it would load that
    # build's shared library beside this one's. The build reads as stale, the module is
    # imported from source, and removing the build (`make compile` does first) deletes it.
    root, modules = tree
    _sources_at(root, modules, 1_000_000)
    _extensions(root, modules, at=2_000_000)
    package = root.joinpath(*modules[0].split("."))
    (package / "other.py").write_text("WHERE = 'source'\n")
    (package / f"other{SUFFIX}").write_bytes(b"not an extension module")
    (package / f"orphan{SUFFIX}").write_bytes(b"no source beside it: not the build's")
    build = build_of(root, modules)
    assert build.state == "stale"
    assert f"other{SUFFIX}" in build.reason and "orphan" not in build.reason
    assert use_sources_if_stale(root, modules).state == "stale"
    assert importlib.import_module(f"{modules[0]}.other").WHERE == "source"
    assert importlib.import_module(modules[1]).WHERE == "source"
    assert sorted(path.name for path in remove(root, modules)) == \
        sorted([f"__init__{SUFFIX}", f"inner{SUFFIX}", f"other{SUFFIX}"])
    assert build_of(root, modules).state == "source"
    assert (package / f"orphan{SUFFIX}").exists()


def test_a_current_build_is_left_to_python(tree: tuple[Path, tuple[str, ...]]) -> None:
    root, modules = tree
    _sources_at(root, modules, 1_000_000)
    _extensions(root, modules, at=2_000_000)
    before = list(sys.meta_path)
    assert use_sources_if_stale(root, modules).state == "compiled"
    use_sources_if_stale(root, modules)  # (once: no second finder)
    added = [finder for finder in sys.meta_path if finder not in before]
    assert [type(finder).__name__ for finder in added] == ["_SharedLibraries"]
    assert sys.meta_path[:len(before)] == before  # (last: it never shadows a source)
    with pytest.raises(ImportError):  # the (fake) extension is what Python imports
        importlib.import_module(modules[1])


def test_a_current_builds_shared_library_is_found_off_sys_path(
        tree: tuple[Path, tuple[str, ...]]) -> None:
    # mypyc puts the group's shared library in the root, beside the packages; an editable
    # install by import hook does not put the root on sys.path.
    root, modules = tree
    _sources_at(root, modules, 1_000_000)
    _extensions(root, modules, at=2_000_000)
    name = f"{modules[0].split('.')[0]}_0123abcd__mypyc"
    (root / f"{name}{SUFFIX}").write_bytes(b"not an extension module")
    sys.path.remove(str(root))
    try:
        assert importlib.util.find_spec(name) is None
        use_sources_if_stale(root, modules)
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin == str(root / f"{name}{SUFFIX}")
        assert importlib.util.find_spec(f"{modules[0].split('.')[0]}_other") is None
    finally:
        sys.path.insert(0, str(root))


@pytest.mark.skipif(build_of().state != "compiled",
                    reason="the real build: under `make test-compiled`")
def test_the_compiled_build_imports_from_any_directory(tmp_path: Path) -> None:
    # Started as `sluicegate serve` is, from outside the checkout: the shared library is
    # found wherever the process runs (it was a ModuleNotFoundError at start-up).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", "import middleware.quota as q; print(q.__file__)"],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(SUFFIX)


def test_every_listed_module_has_a_source_and_the_make_target_names_them_all(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["build", "--sources"]) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == len(MODULES)
    for path in paths:
        assert (ROOT / path).is_file(), path


def test_the_build_command_takes_one_of_sources_and_remove(
        capsys: pytest.CaptureFixture[str]) -> None:
    # Both given, --remove was ignored without a word.
    with pytest.raises(SystemExit) as exited:
        cli.main(["build", "--sources", "--remove"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
