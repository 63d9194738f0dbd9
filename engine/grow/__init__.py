"""Growing a model: applying a stage's operators with measurement, carrying the optimizer state
to the grown parameters, the triggers that decide when a stage grows, task-specific modules,
training FLOPs, the mapping sweep and the parameter preview on the meta device."""
