"""``python -m tm_sidecar`` runs the daemon."""

from .ops._cli import main

main()
