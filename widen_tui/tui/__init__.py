"""`widen tui`: the Textual app (screens/, widgets/, app.tcss) and its view-models."""
