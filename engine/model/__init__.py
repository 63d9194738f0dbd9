"""Models: the family table (one data entry per family), the uniform view over a model (blocks,
FFNs, attention, config fields), one forward pass for every kind of model, and the sources a
model is loaded from (built-in configurations, local directories, hub names)."""
