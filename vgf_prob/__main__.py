"""``python -m vgf_prob``: the ``vgf-prob`` command."""

import sys

from vgf_prob.cli import main

sys.exit(main())
