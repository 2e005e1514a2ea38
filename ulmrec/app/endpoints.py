"""The public API (/rank, /ladder, /decode, /catalogue; /recommend is ulmrec.app.newuser.api).

Gradio names an endpoint's parameters after its function's own and describes the endpoint
with the docstring's first line (the MCP tools read the Args too): so each endpoint is a
function of its own, a closure over the app's data, never a functools.partial, whose
signature is `partial(func, *args, **keywords)` and whose docstring is partial's.
Every one answers with a plain-text status first: empty, or the warning.
"""
from __future__ import annotations

from .handlers import on_catalogue, on_decode, on_ladder, on_rank
from .logic import AppData

def rank_endpoint(data: AppData):
    def rank(user: str, no_history: bool = False):
        """Rank one user's 20 candidates with the LLM: chart, table, metrics and history.

        Args:
            user: a reviewerID, '#id' or the dense id (e.g. '#7' or '7').
            no_history: rank from the user index alone, the history left out of the prompt
                (the paper's ULMRec-uid).

        Returns:
            status (empty, or the warning), the chart, the candidates by LLM rank, the user's
            metrics beside the retriever's, the history panel.
        """
        return on_rank(data, user, no_history)
    return rank


def ladder_endpoint(data: AppData):
    def ladder(user: str):
        """Decode a user's index level by level: <a>, <a><b>, ... the full index.

        Args:
            user: a reviewerID, '#id' or the dense id (e.g. '#7' or '7').

        Returns:
            status (empty, or the warning), one row per prefix: users sharing it, the
            generated preference and what those users share in the data.
        """
        return on_ladder(data, user)
    return ladder


def decode_endpoint(data: AppData):
    def decode(prefix: str):
        """Write the preference text the LLM associates with any index prefix.

        Args:
            prefix: level tokens from level a on, e.g. '<a_12>' or '<a_12><b_3>'.

        Returns:
            status (empty, or why the prefix is refused), the generated preference.
        """
        return on_decode(data, prefix)
    return decode


def catalogue_endpoint(data: AppData):
    def catalogue(user: str):
        """Recommend 10 items from the whole catalogue with LC-Rec, no retriever.

        Args:
            user: a reviewerID, '#id' or the dense id (e.g. '#7' or '7').

        Returns:
            status (empty, or the warning), a summary, the generated items best first.
        """
        return on_catalogue(data, user)
    return catalogue
