"""A sweep's worker process: `python -m twincar_fast.lab.worker reports/<sweep>/sweep.json`."""

from __future__ import annotations

import sys

from twincar_fast.lab.sweep import die_with_parent, load_sweep, run_worker


def main(argv: list[str] | None = None) -> int:
    """Run trials of the sweep in sweep.json until none is left."""
    args = sys.argv[1:] if argv is None else argv
    die_with_parent()
    run_worker(load_sweep(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
