"""``python -m carv_pyro`` runs the ``carv-pyro`` command."""

from .cli import main

raise SystemExit(main())
