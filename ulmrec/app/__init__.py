"""The Gradio app over an ULMRec bundle: `python app.py [--bundle DIR|repo-id]`.

logic.py / ranking.py / overview.py compute what the page shows (plain functions, tested
without a browser); ui.py lays out the page; cli.py loads the bundle once and serves it.
"""
from .cli import main

__all__ = ["main"]
