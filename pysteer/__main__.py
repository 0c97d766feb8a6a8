"""``python -m pysteer`` runs the CLI."""

import sys

from pysteer.cli import main

sys.exit(main())
