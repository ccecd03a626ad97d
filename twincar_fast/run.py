"""`python -m twincar_fast.run CONFIG [key=value ...]`: run one whole experiment."""

import sys

from twincar_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
