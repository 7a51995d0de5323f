"""``python -m tm_sidecar`` runs the daemon."""

from ._cli import main

main()
