"""Escaping and shortening text for the page: HTML, gradio Markdown, tokens and model cards."""

from __future__ import annotations

import html


def front_matter(card: str) -> tuple[str, str]:
    """(YAML front matter, Markdown body) of a model card."""
    if card.startswith("---\n"):
        end = card.find("\n---", 4)
        if end > 0:
            return card[4:end].strip(), card[end + 4:].lstrip()
    return "", card


def html_text(s: object) -> str:
    """HTML-escaped text that also survives gradio's template pass (no $, {, }, backtick left)."""
    out = html.escape(str(s), quote=True)
    for ch, ent in (("$", "&#36;"), ("{", "&#123;"), ("}", "&#125;"), ("`", "&#96;")):
        out = out.replace(ch, ent)
    return out


def md(s: object) -> str:
    """Text for gradio Markdown: no HTML, and no character that would start a table cell, emphasis or maths."""
    out = html.escape(str(s), quote=False)
    for ch in "\\`*_[]|$#":
        out = out.replace(ch, "\\" + ch)
    return out


def short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def shown(token: str) -> str:
    return token.replace("\n", "\\n").replace("Ġ", " ").replace("▁", " ")


def without_server_paths(text: str) -> str:
    """`text` with this server's folders named by what they are (`<clt_hub cache>`, `<hub cache>`, `<app>`,
    `<tmp>`, `~`): an error about a file in the cache or a scratch folder would otherwise show a visitor where
    the Space keeps its files, which helps nobody and tells an attacker about the machine."""
    import tempfile
    from pathlib import Path

    from huggingface_hub import constants

    from clt_hub.artifacts.hub import cache_root

    places = [(cache_root(), "<clt_hub cache>"), (Path(constants.HF_HUB_CACHE), "<hub cache>"),
              (Path(constants.HF_HOME), "<hub cache>"), (Path(__file__).resolve().parents[1], "<app>"),
              (Path(tempfile.gettempdir()), "<tmp>"), (Path.home(), "~")]
    spellings: dict[str, str] = {}
    for path, name in places:
        for spelling in {str(path), str(path.expanduser().resolve())}:
            if len(spelling) > 1:  # never "/" alone
                spellings.setdefault(spelling, name)
    for spelling in sorted(spellings, key=len, reverse=True):  # the deepest folder first: the cache inside ~
        text = text.replace(spelling, spellings[spelling])
    return text
