"""``python -m cli`` runs blobctl."""

from cli.early import run

run()
