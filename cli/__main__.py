"""``python -m cli`` runs blobctl."""

from cli.main import run

run()
