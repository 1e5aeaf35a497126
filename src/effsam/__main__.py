"""The ``effsam`` command (also ``python -m effsam``).

This module imports nothing of the toolkit until it has checked that the toolkit's
dependencies are installed, so a core-only install (``pip install effsam``) gets a message
saying what to install instead of an ImportError.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: Import names of the ``toolkit`` extra and the packages that provide them.
TOOLKIT_MODULES = {"yaml": "PyYAML", "tqdm": "tqdm"}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns its exit status."""
    missing = [pkg for mod, pkg in TOOLKIT_MODULES.items() if not _importable(mod)]
    args = list(sys.argv[1:] if argv is None else argv)
    if missing and not any(a in ("--version", "-h", "--help") for a in args[:1]):
        print(
            "effsam: error: the command line needs the toolkit extra, which is not installed "
            f"(missing: {', '.join(missing)}). Install it with:  pip install 'effsam[toolkit]'\n"
            "(the library itself, `import effsam`, needs torch only)",
            file=sys.stderr,
        )
        return 2
    if missing:  # --version / --help work without the extra
        from effsam import __version__

        print(f"effsam {__version__}; the command line needs: pip install 'effsam[toolkit]'")
        return 0
    from effsam.train.cli import main as cli_main

    return cli_main(argv)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
