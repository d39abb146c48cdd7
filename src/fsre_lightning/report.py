"""`python -m fsre_lightning.report` (the command: `fsre_lightning.cli.report`)."""

import sys

from fsre_lightning.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
