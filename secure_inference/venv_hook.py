"""Make the project's virtual environment work in any import order.

In the venv ``make install`` builds, torchvision is PyPI's CUDA build next to a CPU build of
torch, and ``import torchvision`` fails (``operator torchvision::nms does not exist``) unless
the compatibility fixes of :mod:`secure_inference.mmlab.compat` run first. ``import
secure_inference`` installs them (:mod:`secure_inference._compat_hook`), but a user who writes
``import torchvision`` first never gets there. This module writes a ``.pth`` file into the
venv's site-packages that installs the same import hook at interpreter start-up: cheap (torch
is not imported until someone imports it) and confined to this venv. ``make install`` runs it:

    .venv/bin/python -m secure_inference.venv_hook            # writes the .pth file
    .venv/bin/python -m secure_inference.venv_hook --remove   # takes it away
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "zz_secure_inference_compat.pth"   # after the editable install's .pth (sorted)
DISABLE_ENV = "SI_NO_STARTUP_HOOK"   # set (non-empty) to start an interpreter without it
PTH_LINE = ("import os; exec('try:\\n import secure_inference._compat_hook as _h\\n"
            " _h.install()\\nexcept Exception:\\n pass') "
            "if not os.environ.get('SI_NO_STARTUP_HOOK') else None\n")


def site_packages() -> Path:
    """This interpreter's purelib folder (the venv's site-packages inside a venv)."""
    return Path(sysconfig.get_paths()["purelib"])


def install(folder: Path | None = None) -> Path:
    """Write the start-up hook into ``folder`` (default: :func:`site_packages`)."""
    if sys.prefix == sys.base_prefix and folder is None:
        raise SystemExit("refusing to add a start-up hook outside a virtual environment; "
                         "run this with the project's .venv/bin/python")
    path = (folder or site_packages()) / PTH_NAME
    path.write_text(PTH_LINE)
    return path


def remove(folder: Path | None = None) -> bool:
    """Delete the start-up hook; True if there was one."""
    path = (folder or site_packages()) / PTH_NAME
    if path.exists():
        path.unlink()
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remove", action="store_true", help="remove the start-up hook")
    args = parser.parse_args(argv)
    if args.remove:
        print("removed" if remove() else "no start-up hook was installed")
    else:
        print(f"start-up hook: {install()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
