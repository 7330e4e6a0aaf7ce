"""``python -m sparsec``: the ``sparsec`` command line."""
import sys

from sparsec.tools.cli import main

sys.exit(main())
