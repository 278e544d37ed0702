"""Typer front end (installed as the ``repair_cli`` package; console script ``repair``)."""
