"""`python -m fsre_lightning.import_reference` (the command: cli.import_reference)."""

import sys

from fsre_lightning.cli.import_reference import main

if __name__ == "__main__":
    sys.exit(main())
