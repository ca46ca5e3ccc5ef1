"""Validate the docstrings of skdkvb's public API with numpydoc; exit 1 on any listed error.

Public API: every name in ``__all__`` of skdkvb and of each public submodule
(no leading underscore anywhere in its dotted name), or, for a module without
``__all__``, every public class and function defined in it; for classes, the
public methods and properties that skdkvb itself defines (inherited
scikit-learn or torch members are theirs to document). Each object is checked
once, under its first public path.

Usage: ``python .ci/numpydoc_check.py [--codes PR01,RT01,...] [--summary]``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import re
import sys
from collections import Counter, defaultdict

from numpydoc.validate import validate

# GL08: no docstring at all. PR01: a parameter is not documented. PR02: a
# documented parameter does not exist. PR07: a parameter has no description.
# RT01: no Returns section. RT03: a return value has no description.
# SKD01 (ours): the docstring sends the reader to a file of the repository,
# which an installed package does not have.
DEFAULT_CODES = ("GL08", "PR01", "PR02", "PR07", "RT01", "RT03", "SKD01")
REPO_PATH = re.compile(r"(?<![\w/.])(?:tests|benchmarks|docs|examples|\.ci)/[\w./-]*\w")


def repository_paths(obj) -> list[tuple[str, str]]:
    """``("SKD01", message)`` for each repository path in ``obj``'s docstring."""
    target = obj.fget if isinstance(obj, property) else obj
    doc = inspect.getdoc(target) or ""
    return [
        ("SKD01", f"Docstring points at repository file {path!r}; say it in the docstring or link the online docs")
        for path in dict.fromkeys(REPO_PATH.findall(doc))
    ]


def _public_modules(package: str = "skdkvb") -> list[str]:
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(root.__path__, prefix=package + "."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        names.append(info.name)
    return sorted(names)


def _exported(module) -> list[str]:
    if hasattr(module, "__all__"):
        return [name for name in module.__all__ if not name.startswith("_")]
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", "") == module.__name__
    ]


def _own_members(cls) -> list[str]:
    """Public methods and properties defined by skdkvb classes in ``cls``'s MRO."""
    seen: dict[str, None] = {}
    for klass in cls.__mro__:
        if not getattr(klass, "__module__", "").startswith("skdkvb"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            # scikit-learn generates set_{fit,score,...}_request methods; not ours.
            if name.startswith("set_") and name.endswith("_request"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if inspect.isfunction(member) or isinstance(member, property):
                seen[name] = None
    return list(seen)


def public_api() -> list[tuple[str, object]]:
    """``(dotted public path, object)`` for every object to validate, each once."""
    out: list[tuple[str, object]] = []
    done: set[int] = set()

    def add(path, obj):
        if id(obj) not in done:
            done.add(id(obj))
            out.append((path, obj))

    for modname in _public_modules():
        module = importlib.import_module(modname)
        for name in _exported(module):
            obj = getattr(module, name, None)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                continue
            path = f"{modname}.{name}"
            add(path, obj)
            if inspect.isclass(obj):
                for member in _own_members(obj):
                    attr = inspect.getattr_static(obj, member)
                    if isinstance(attr, (staticmethod, classmethod)):
                        attr = attr.__func__
                    add(f"{path}.{member}", attr)
    return out


def _source_file(obj) -> str:
    target = obj.fget if isinstance(obj, property) else obj
    try:
        path = inspect.getsourcefile(inspect.unwrap(target))
    except TypeError:
        return "?"
    return os.path.relpath(path) if path else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", default=",".join(DEFAULT_CODES), help="comma-separated error codes that fail")
    parser.add_argument("--summary", action="store_true", help="print only the counts per file and per code")
    args = parser.parse_args(argv)
    codes = {c.strip() for c in args.codes.split(",") if c.strip()}

    per_file: dict[str, list[str]] = defaultdict(list)
    per_code: Counter = Counter()
    objects = public_api()
    for path, obj in objects:
        result = validate(path)
        for code, message in result["errors"] + repository_paths(obj):
            if code in codes:
                per_file[_source_file(obj)].append(f"{path}: {code} {message}")
                per_code[code] += 1

    n_errors = sum(per_code.values())
    for filename in sorted(per_file):
        print(f"{filename}: {len(per_file[filename])} error(s)")
        if not args.summary:
            for line in per_file[filename]:
                print(f"    {line}")
    counts = ", ".join(f"{code} x{n}" for code, n in sorted(per_code.items())) or "none"
    print(
        f"numpydoc: {len(objects)} public objects checked for {','.join(sorted(codes))}; {n_errors} error(s): {counts}"
    )
    return 1 if n_errors else 0


if __name__ == "__main__":
    sys.exit(main())
