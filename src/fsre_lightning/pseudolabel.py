"""`python -m fsre_lightning.pseudolabel` (the command: `fsre_lightning.cli.pseudolabel`)."""

import sys

from fsre_lightning.cli.pseudolabel import main

if __name__ == "__main__":
    sys.exit(main())
