"""Input and output, kept apart from the math: adapter files, model folders,
atomic output folders and provenance."""
