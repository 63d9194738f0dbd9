"""The app's screens, one module each (with its own .tcss beside it)."""
