"""The Gradio Space's logic (app.py lays out the page over it). Lives beside the library, not in it:
it may import paper_cases, which is not part of the installed package."""
