"""``python -m sparsec``: the ``sparsec`` command line."""
import sys

from sparsec.cli import main

sys.exit(main())
