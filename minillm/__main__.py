"""``python -m minillm ...``: the ``minillm`` command, for when the console script is not on PATH."""

import sys

from minillm.cli import main

if __name__ == "__main__":
    sys.exit(main())
