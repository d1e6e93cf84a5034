"""The Gradio Space's logic (app.py lays out the page over it). Lives beside the library, not in it:
it may import paper_cases, which is not part of the installed package.

config (limits, what users may pick) -> state (Space: loaded models, sessions, actions) -> views,
graph_view, grouping, text (what the panels show).
"""

from space.config import (
           CASES,
           CUSTOM,
           ORGANISM,
           ORGANISM_PROMPTS,
           REAL,
           Limits,
           Source,
           pairs,
           source_for,
)
from space.graph_view import GRAPH_CSS, GRAPH_JS
from space.request_limit import RequestSizeLimit
from space.state import LoadedPair, Progress, Session, SessionDropped, Space, user_message
from space.text import without_server_paths

__all__ = ["CASES", "CUSTOM", "GRAPH_CSS", "GRAPH_JS", "ORGANISM", "ORGANISM_PROMPTS", "REAL", "Limits", "LoadedPair",
           "Progress", "RequestSizeLimit", "Session", "SessionDropped", "Source", "Space", "pairs", "source_for",
           "user_message", "without_server_paths"]
