"""Build the API reference from the docstrings with pdoc: ``make docs`` (into ``build/api/``).

    python scripts/build_docs.py [OUT_DIR]

Docstrings are read as reStructuredText. Every module is documented: pdoc walks the package, and
the modules it does not reach (those of packages whose ``__all__`` lists only the main names)
are named to it as well. Any warning — a module that fails to import, an annotation that does
not resolve, a name in ``__all__`` that does not exist — fails the build, so CI keeps it clean.
One kind is not ours and is let through: pdoc cannot resolve the postponed annotations of a
``NamedTuple``'s generated ``__init__`` (its namespace is not the module's); the fields are still
documented, with their annotations as written.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMEDTUPLE_INIT = re.compile(r"Error parsing type annotation .* for ([\w.]+)\.__init__\. ")


def modules() -> list[str]:
    """The specs to give pdoc: ``neuroplex`` and every module its walk does not reach."""
    from pdoc.extract import walk_specs

    import neuroplex

    found = pkgutil.walk_packages(neuroplex.__path__, prefix="neuroplex.")
    every = {m.name for m in found if m.name != "neuroplex.__main__"}
    return ["neuroplex", *sorted(every - set(walk_specs(["neuroplex"])))]


def is_namedtuple_init(message: str) -> bool:
    """Whether ``message`` is pdoc failing on a NamedTuple's generated ``__init__``."""
    match = NAMEDTUPLE_INIT.match(message)
    if match is None:
        return False
    module, _, name = match.group(1).rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "build" / "api"
    os.environ.setdefault("MPLBACKEND", "Agg")
    import pdoc

    pdoc.render.configure(docformat="restructuredtext")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules(), output_directory=out)
    messages = {str(w.message) for w in caught}
    problems = sorted(m for m in messages if not is_namedtuple_init(m))
    for line in problems:
        print(f"docs: {' '.join(line.split())}", file=sys.stderr)
    if problems:
        raise SystemExit(f"docs: {len(problems)} warning(s); the API reference must build cleanly")
    print(f"API reference: {out / 'index.html'}")


if __name__ == "__main__":
    main()
