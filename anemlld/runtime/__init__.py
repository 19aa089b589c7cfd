"""Running converted parts: executors (Core ML, portable) and the generation engine."""
