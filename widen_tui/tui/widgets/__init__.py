"""Widgets shared by the screens. Each posts messages; none reaches into another widget."""
