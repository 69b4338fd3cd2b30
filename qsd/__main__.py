# SPDX-License-Identifier: GPL-2.0-or-later
"""``python -m qsd`` runs the daemon, like the ``qsd`` console script."""

from qsd.cli.daemon import main

raise SystemExit(main())
